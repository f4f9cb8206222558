"""Base models (built-in tiny Llama configs or a local Hugging Face folder) and the peft LoRA.

Built-in models are random-init ``LlamaForCausalLM`` built from a config; the vocabulary comes from
the task's tokenizer, so they are made after the data. No download is ever attempted.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .config import TrainInputError

# hidden, layers, heads, kv heads, mlp, context. "tiny" is the embedded default (docs/TRAINING.md,
# "Facts the defaults rest on").
BUILTIN_MODELS = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=1024),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=688, max_position_embeddings=2048),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376, max_position_embeddings=4096),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def check_model_dir(path: str) -> None:
    """ValueError unless ``path`` is a folder holding a causal LM config (checked before loading)."""
    if not os.path.isdir(path):
        raise TrainInputError(
            f"model={path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a folder"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainInputError(f"model folder {path!r} has no config.json: not a transformers model")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad model folder
        raise TrainInputError(f"model folder {path!r}: cannot read its config ({_first_line(exc)})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise TrainInputError(f"model folder {path!r} holds a {config.model_type!r} model, which is not a causal LM")


def build_model(name: str, vocab_size: int, init_range: float, seed: int, dtype: str = "float32",
                special_ids: Optional[dict] = None):
    """A random-init built-in Llama (seeded: the same name and seed give the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    special_ids = special_ids or {}
    config = LlamaConfig(
        vocab_size=vocab_size,
        initializer_range=init_range,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        **BUILTIN_MODELS[name],
    )
    # Seed on a private generator state so model init never shifts the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(_DTYPES[dtype])


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (transformers' messages run over several lines)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as exc:  # no weights file, a truncated one, a shape that does not fit the config
        raise TrainInputError(f"model folder {path!r}: cannot load its weights ({_first_line(exc)})") from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # safetensors' own error type (not an OSError)
            raise TrainInputError(f"model folder {path!r}: cannot load its weights ({_first_line(exc)})") from None
        raise


def context_length(model) -> Optional[int]:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_layers(model) -> Optional[int]:
    return getattr(model.config, "num_hidden_layers", None)


def add_lora(model, rank: int, alpha: Optional[float], dropout: float, target_modules, layers, seed: int):
    """Freeze the base and wrap it in a peft LoRA; returns the PeftModel.

    peft initializes B = 0, so the adapted model starts exactly at the base model.
    """
    from peft import LoraConfig, get_peft_model

    n_layers = num_layers(model)
    if layers is not None and n_layers is not None:
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise TrainInputError(f"layers={list(layers)} includes {bad[0]}, but the model has {n_layers} layers")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise TrainInputError(f"target module(s) {missing} not found in the model")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=None if layers is None else list(layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question here; the warning is not the user's business.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed + 1)
        peft_model = get_peft_model(model, config)
    return peft_model


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


def configure_model(model, attn: str = "auto", gradient_checkpointing: bool = False) -> None:
    """Attention implementation and gradient checkpointing of the (not yet LoRA-wrapped) model."""
    if attn != "auto":
        name = ATTN_IMPLEMENTATIONS[attn]
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainInputError(f"attn={attn!r} ({name}) is not available for this model here: {first}") from None
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainInputError(f"{type(model).__name__} does not support gradient checkpointing")
        # non-reentrant: works with a frozen embedding (no input grads needed) and with LoRA
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_module(model):
    """The decoder stack under the causal-LM head (``model.model`` for Llama), through peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def compile_decoder(model):
    """``torch.compile`` of the decoder, used for the training forward only (generation keeps the
    eager model: its KV-cache shapes change every token)."""
    return torch.compile(decoder_module(model))
