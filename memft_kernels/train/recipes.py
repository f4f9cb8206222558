"""`--recipe`: the authors' released hyperparameters as defaults (docs/TRAINING.md, "Paper recipes").

A recipe is plain data: each TrainConfig option it sets, with the place in the authors' release
(GitHub zjunlp/ParametricMemoryLaw) it comes from. Flags given on the command line (or keyword
overrides in Python) still win. Names: ``paper-phonebook`` and ``paper-longcontext``, optionally
``:llama`` / ``:qwen`` (default llama: Llama-3.1-8B) and ``:LENGTH`` (a length of the authors'
sweep: answer tokens for PhoneBook, tokens for long context), e.g. ``paper-phonebook:qwen:8000``.

On a built-in model (random-init tiny Llama, CPU) the recipe keeps every optimization value and
scales only what the small model cannot hold: the LoRA layer goes to the same relative depth, and
the long-context length to ``SCALED_LONGCONTEXT_LENGTH`` tokens. The resolved table says which.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from .config import TrainConfig, TrainInputError

RECIPES = ("paper-phonebook", "paper-longcontext")
SRC = "zjunlp/ParametricMemoryLaw"
PB_SH, LC_SH = "script/pb/common.sh", "script/long_context/common.sh"
PB_YAML, LC_YAML = "hparams/context2vec_pb/pb_memft_lora.yaml", "hparams/context2vec_long/long_context_memft_lora.yaml"
TRAINER = "steer/trainer/MemFTModelTrainer.py"

# family -> (model, its layer count, the LoRA layer, where the layer is set)
FAMILIES = {
    "llama": ("Llama-3.1-8B-Instruct", 32, 18, f"{PB_SH}:63, {LC_SH}:61"),
    "qwen": ("Qwen3-8B", 36, 24, f"{PB_SH}:58, {LC_SH}:53"),
}
# PhoneBook answer tokens per entry with each family's tokenizer (the datasets' target_len).
PB_ANSWER_TOKENS = {"llama": 4, "qwen": 10}

# PhoneBook "MemFT" (their METHOD=memft_sw = memft_curriculum): length -> (lr, epochs, batch, accum, boundaries, lines)
PB_TABLE = {
    "llama": {
        1000: (1e-2, 300, 25, 1, [20, 40, 60, 80, 300], "192-195"),
        2000: (1e-2, 400, 25, 1, [40, 80, 120, 160, 400], "196-199"),
        4000: (7e-3, 400, 50, 1, [40, 80, 120, 160, 400], "200-203"),
        8000: (5e-3, 600, 50, 2, [80, 160, 240, 320, 600], "204-207"),
        12000: (5e-3, 700, 50, 2, [100, 200, 300, 400, 700], "208-211"),
        16000: (5e-3, 700, 50, 2, [100, 200, 300, 400, 700], "208-211"),
        24000: (3e-3, 700, 50, 4, [100, 200, 300, 400, 700], "212-215"),
        32000: (3e-3, 800, 50, 4, [120, 240, 360, 480, 800], "216-219"),
    },
    "qwen": {
        1000: (1e-2, 300, 10, 1, [20, 40, 60, 80, 300], "143-146"),
        2000: (1e-2, 300, 10, 1, [20, 40, 60, 80, 300], "143-146"),
        4000: (1e-2, 350, 10, 1, [30, 60, 90, 120, 350], "147-150"),
        8000: (7e-3, 350, 20, 2, [30, 60, 90, 120, 350], "151-154"),
        12000: (5e-3, 500, 40, 2, [60, 120, 180, 240, 500], "155-158"),
        16000: (5e-3, 600, 40, 2, [80, 160, 240, 320, 600], "159-162"),
        24000: (5e-3, 600, 40, 2, [80, 160, 240, 320, 600], "159-162"),
        32000: (5e-3, 700, 40, 2, [100, 200, 300, 400, 700], "163-166"),
    },
}
LC_LENGTHS = (50, 100, 200, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)  # long_context/common.sh:140, 143
DEFAULT_LENGTH = {"paper-phonebook": 1000, "paper-longcontext": 1000}
SCALED_LONGCONTEXT_LENGTH = 128
PB_BUILTIN_SCALE = 5  # built-in model: 1/5 of the entries and of the batch (the same batches per epoch)

Settings = Dict[str, Tuple[object, str]]  # option -> (value, where it comes from)


def _common(family: str, n_layers: Optional[int], yaml: str) -> Settings:
    """The LoRA and optimizer settings both benchmarks share."""
    _, paper_layers, layer, layer_src = FAMILIES[family]
    if n_layers is None or n_layers == paper_layers:
        layers = ([layer], f"{layer_src} (LAYER)")
    else:  # the same relative depth in a model with fewer layers
        scaled = min(n_layers - 1, layer * n_layers // paper_layers)
        layers = ([scaled], f"scaled: layer {layer} of {paper_layers} ({layer_src}) -> {scaled} of {n_layers}")
    return {
        "layers": layers,
        "target_modules": (["down_proj"], f"{yaml}:{52 if yaml == PB_YAML else 51} intervention_components=mlp "
                                          "(stand-in: that layer's MLP output projection)"),
        "rank": (2, f"{yaml}:{50 if yaml == PB_YAML else 49} low_rank_dimension (the scripts sweep RANKS)"),
        "alpha": (32.0, f"{PB_YAML}:16 lora_alpha (not passed on by steer/trainer/MemFTTrainer.py:55-62)"),
        "dropout": (0.1, f"{yaml}:12 dropout"),
        "grad_clip": (1.0, f"{TRAINER}:619 clip_grad_norm_(..., 1.0)"),
        "threshold": (0.5, f"{PB_SH}:331" if yaml == PB_YAML else f"{LC_SH}:265"),
        "seed": (42, f"{PB_SH}:9, {LC_SH}:8 SEED"),
    }


def _layer_count(model: str) -> Optional[int]:
    from .models import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]["num_hidden_layers"]
    path = os.path.join(model, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("num_hidden_layers")
    return None


def parse_name(name: str) -> Tuple[str, str, Optional[int]]:
    parts = name.split(":")
    base = parts[0]
    if base not in RECIPES or len(parts) > 3:
        raise TrainInputError(f"recipe={name!r} is not known; choose {' or '.join(RECIPES)}, optionally "
                              f"followed by :llama or :qwen and :LENGTH (e.g. paper-phonebook:qwen:8000)")
    family = parts[1] if len(parts) > 1 and parts[1] else "llama"
    if family not in FAMILIES:
        raise TrainInputError(f"recipe={name!r}: model family {family!r} is not one of {', '.join(FAMILIES)}")
    length = None
    if len(parts) > 2:
        try:
            length = int(parts[2])
        except ValueError:
            raise TrainInputError(f"recipe={name!r}: length {parts[2]!r} is not an integer") from None
    return base, family, length


def recipe_settings(name: str, model: str = "tiny") -> Settings:
    """Every option ``name`` sets for ``model``, with its source."""
    from .models import is_builtin

    base, family, length = parse_name(name)
    n_layers = _layer_count(model)
    builtin = is_builtin(model)
    if base == "paper-phonebook":
        table = PB_TABLE[family]
        length = DEFAULT_LENGTH[base] if length is None else length
        if length not in table:
            raise TrainInputError(f"recipe={name!r}: PhoneBook length {length} is not in the authors' table "
                                  f"({', '.join(map(str, table))})")
        lr, epochs, batch, accum, bounds, lines = table[length]
        where = f"{PB_SH}:{lines}"
        s = _common(family, n_layers, PB_YAML)
        entries = length // PB_ANSWER_TOKENS[family]
        samples = (entries, f"PB{length}: {length} answer tokens / {PB_ANSWER_TOKENS[family]} per entry (target_len)")
        batch_size = (batch, where)
        if builtin:
            k = PB_BUILTIN_SCALE
            samples = (entries // k, f"scaled for a built-in model: PB{length}'s {entries} entries / {k}")
            batch_size = (batch // k, f"scaled for a built-in model: {batch} ({where}) / {k}, same batches per epoch")
        s.update({
            "task": ("phonebook", "PhoneBook"),
            "samples": samples,
            "loss": ("memft-ot", f"{PB_SH}:327-332 METHOD=memft_sw -> memft_method=memft_curriculum: hard threshold"),
            "fallback": ("zero", f"{PB_SH}:332 memft_zero_bp=true; {TRAINER}:189-195"),
            "curriculum": (True, f"{PB_SH}:333-338 curriculum_enabled, prefix_ratio"),
            "curriculum_style": ("paper", f"{PB_SH}:337-338 shuffle once, drop_last; {TRAINER}:51-84"),
            "curriculum_ratios": ([0.2, 0.4, 0.6, 0.8, 1.0], f"{PB_SH}:335"),
            "curriculum_boundaries": (bounds, where),
            "lr": (lr, where),
            "epochs": (epochs, where),
            "batch_size": batch_size,
            "grad_accum": (accum, where),
        })
        return s
    # paper-longcontext: MemFT-SW (the sliding window), one random sequence, batch 1, 2000 epochs.
    length = DEFAULT_LENGTH[base] if length is None else length
    if length not in LC_LENGTHS:
        raise TrainInputError(f"recipe={name!r}: long-context length {length} is not in the authors' sweep "
                              f"({', '.join(map(str, LC_LENGTHS))})")
    s = _common(family, n_layers, LC_YAML)
    if builtin:
        length_setting = (SCALED_LONGCONTEXT_LENGTH, f"scaled for a built-in model: {length} -> "
                          f"{SCALED_LONGCONTEXT_LENGTH} tokens ({LC_SH}:143 LENGTHS)")
    else:
        length_setting = (length, f"{LC_SH}:143 LENGTHS")
    s.update({
        "task": ("random", f"{LC_SH}:127 MemFT runs r100: 100% random tokens"),
        "length": length_setting,
        "samples": (1, "one sequence per run"),
        "loss": ("memft-sw", f"{LC_SH}:261-269 memft_method=sliding, use_sliding_window=true"),
        "sharpness": (10.0, f"{LC_YAML}:41 sliding_scale"),
        "window_span": (50.0, f"{LC_SH}:267 memory_window_size=50"),
        "window_decay": (20.0, f"{LC_YAML}:39 sliding_tau"),
        "window_floor": (0.01, f"{LC_YAML}:40 sliding_base_floor"),
        "window_patience": (3, f"{TRAINER}:240 batch_patience >= 3"),
        "window_growth": (0.5, f"{TRAINER}:243 + 0.5"),
        "window_max": (4.0, f"{TRAINER}:243 max=4.0"),
        "window_state": ("row", f"{TRAINER}:230-233 state per batch row"),
        "fallback": ("mean", f"{TRAINER}:272-275 falls back to the model's mean CE"),
        "lr": (1e-2, f"{LC_SH}:250"),
        "epochs": (2000, f"{LC_SH}:247"),
        "batch_size": (1, f"{LC_SH}:248"),
        "grad_accum": (1, f"{LC_SH}:249"),
    })
    return s


def recipe_config(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of recipe ``name``; keyword overrides win (as flags do)."""
    settings = recipe_settings(name, overrides.get("model", TrainConfig.model))
    options = {k: v for k, (v, _) in settings.items()}
    options.update(overrides)
    if "steps" in overrides and "epochs" not in overrides:
        options["epochs"] = 0  # a step count given wins over the recipe's epochs (it used to be ignored)
    if not options.get("curriculum", False) or options.get("curriculum_style", "paper") != "paper":
        for key in ("curriculum_ratios", "curriculum_boundaries"):  # the recipe's lists go with its curriculum
            if key not in overrides:
                options.pop(key, None)
    options["recipe"] = name
    return TrainConfig(**options).validate()


def describe(config: TrainConfig, given=()) -> str:
    """The resolved settings of a recipe run, one option a line, with where each value comes from."""
    settings = recipe_settings(config.recipe, config.model)
    lines = [f"recipe {config.recipe} (values from {SRC}; flags win):"]
    names = list(settings) + [n for n in sorted(given) if n not in settings and n != "recipe"]
    for key in names:
        value = getattr(config, key)
        source = "flag" if key in given else settings[key][1]
        if key == "epochs" and "steps" in given and "epochs" not in given:
            source = "flag --steps (the run is that many steps, not the recipe's epochs)"
        lines.append(f"  {key:<22} {value!r:<28} {source}")
    lines.append(f"  {'optimizer':<22} {'AdamW, weight_decay 0':<28} {PB_YAML}:18; {TRAINER}:349-353")
    lines.append(f"  {'lr schedule':<22} {'linear to 0, no warmup':<28} {TRAINER}:356-370 (steps = sum of batches // accum)")
    lines.append(f"  {'loss per micro-batch':<22} {'mean / grad_accum':<28} {TRAINER}:603 (accum_normalize={config.accum_normalize})")
    return "\n".join(lines)
