"""Training large models: the fused head, gradient checkpointing, autocast, greedy evaluation with the
KV cache, and the memory plan (estimate vs measured peak, the refusal)."""
import json
import os
import types

import pytest
import torch

from memft_kernels import memft_loss
from memft_kernels.train import TrainConfig, TrainInputError, loop, train
from memft_kernels.train.data import to_batch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


BASE = dict(model="nano", vocab_size=256, length=32, samples=3, batch_size=2, steps=8, lr=1e-2, eval_every=4,
            threads=1, progress=False, plots=False, backend="torch")


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _same_run(a_dir, b_dir, tol):
    """Every logged number and the adapter agree to ``tol`` (relative); counts exactly."""
    ra, rb = _rows(a_dir), _rows(b_dir)
    assert [r["kind"] for r in ra] == [r["kind"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key, u in x.items():
            v = y[key]
            if isinstance(u, float):
                assert abs(u - v) <= tol * max(1.0, abs(u)), (x["kind"], x["step"], key, u, v)
            else:
                assert u == v, (x["kind"], x["step"], key, u, v)
    wa, wb = _adapter(a_dir), _adapter(b_dir)
    assert wa.keys() == wb.keys()
    assert max(_rel(wa[k], wb[k]) for k in wa) < tol


# ---------------------------------------------------------------------------------------------
# The fused head: same loop, no logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,extra", [("memft-sw", {}), ("memft-ot", dict(dropout=0.1, threshold=0.01))])
def test_fused_head_gives_the_unfused_run(loss, extra, tmp_path):
    """Loss, stats (ce, recall, n_active, the memft-sw window from pred), evaluation and adapter
    after k steps equal the materialized-logits run to float32 rounding. threshold=0.01 makes
    memft-ot drop tokens (and fall back) within the few steps."""
    config = TrainConfig(**BASE, loss=loss, **extra)
    unfused = train(config.replace(fused_head=False, run_dir=str(tmp_path / "unfused")))
    fused = train(config.replace(fused_head=True, run_dir=str(tmp_path / "fused")))
    _same_run(str(tmp_path / "unfused"), str(tmp_path / "fused"), tol=2e-5)
    assert unfused["exact_recall"] == fused["exact_recall"] and unfused["first_wrong"] == fused["first_wrong"]
    if loss == "memft-ot":
        assert any(r.get("n_active", 1) < r.get("n_valid", 0) for r in _rows(str(tmp_path / "fused")))


def test_the_fused_head_never_builds_logits(tmp_path):
    """With --fused-head the lm_head module is never called in training or teacher-forced evaluation."""
    from memft_kernels.train import loop
    from memft_kernels.train.head import head_module

    run = loop.setup(TrainConfig(**dict(BASE, out_dir=str(tmp_path)), fused_head=True))
    calls = []
    head_module(run.model).register_forward_hook(lambda *a: calls.append(1))
    loop.train_step(run)
    loop._teacher_forced(run)
    assert calls == []


def test_fused_head_default_rule():
    from torch import nn

    from memft_kernels.train.head import FUSED_HEAD_AUTO_ELEMENTS, use_fused_head

    class Base(nn.Module):
        def __init__(self, head, model_type="llama"):
            super().__init__()
            self.lm_head = head
            self.config = types.SimpleNamespace(model_type=model_type)

    small, large = Base(nn.Linear(8, 1000, bias=False)), Base(nn.Linear(8, 32000, bias=False))
    auto = TrainConfig()
    assert not use_fused_head(auto, small, 1024)  # 1e6 elements
    assert use_fused_head(auto, large, 4096)  # 32000 x 4096 > 2^26
    assert not use_fused_head(auto, large, FUSED_HEAD_AUTO_ELEMENTS // 32000)
    assert use_fused_head(auto, large, FUSED_HEAD_AUTO_ELEMENTS // 32000 + 1)
    assert use_fused_head(TrainConfig(fused_head=True), small, 1)
    assert not use_fused_head(TrainConfig(fused_head=False), large, 10**6)

    class Wrapped(nn.Module):  # a LoRA-wrapped head is not a plain Linear
        def __init__(self):
            super().__init__()
            self.weight = torch.zeros(32000, 8)

    odd = Base(Wrapped())
    assert not use_fused_head(auto, odd, 10**6)
    with pytest.raises(TrainInputError, match="needs a plain nn.Linear lm_head"):
        use_fused_head(TrainConfig(fused_head=True), odd, 1)

    # A family whose forward changes the logits after the head (Cohere's logit_scale): never fused.
    scaled = Base(nn.Linear(8, 256000, bias=False), model_type="cohere")
    assert not use_fused_head(auto, scaled, 4096)
    with pytest.raises(TrainInputError, match="'cohere'.*use --no-fused-head"):
        use_fused_head(TrainConfig(fused_head=True), scaled, 1)


def test_fused_head_and_compile_refused_for_a_scaled_head(tmp_path):
    """A Cohere model folder (logits = logit_scale x lm_head(h)): --fused-head and --compile would
    compute the loss of unscaled logits (a silently wrong run); both are refused before any file,
    and the logits path gives the model's own loss."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=300, max_position_embeddings=64,
                                       logit_scale=0.25, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    transformers.CohereForCausalLM(config).save_pretrained(tmp_path / "cohere")
    options = dict(model=str(tmp_path / "cohere"), tokenizer="byte", length=16, steps=1, threads=1, progress=False,
                   plots=False, save_adapter=False, backend="torch")
    for flag in ("fused_head", "compile"):
        with pytest.raises(TrainInputError, match="'cohere'"):
            loop.setup(TrainConfig(**options, **{flag: True}, run_dir=str(tmp_path / flag)))
        assert not (tmp_path / flag).exists()
    run = loop.setup(TrainConfig(**options), make_dir=False)
    assert not run.fused_head
    batch = to_batch(run.task, [0], run.task.max_len)
    own = run.model(input_ids=batch.input_ids, labels=batch.input_ids).logits  # the model's own (scaled) logits
    ref = memft_loss(own.double(), batch.labels, policy="none")
    assert abs(loop._teacher_forced(run)["loss"] - float(ref)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing, autocast, attention implementation
# ---------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    config = TrainConfig(**BASE, loss="memft-ot", dropout=0.1)  # dropout: the recompute must replay the RNG
    train(config.replace(run_dir=str(tmp_path / "plain")))
    train(config.replace(gradient_checkpointing=True, fused_head=True, run_dir=str(tmp_path / "ckpt")))
    _same_run(str(tmp_path / "plain"), str(tmp_path / "ckpt"), tol=2e-5)


def test_autocast_bf16_and_eager_attention_run_close_to_float32(tmp_path):
    config = TrainConfig(**dict(BASE, steps=4, eval_every=0), loss="ce")
    ref = train(config.replace(run_dir=str(tmp_path / "ref")))
    bf16 = train(config.replace(autocast="bf16", fused_head=True, run_dir=str(tmp_path / "bf16")))
    eager = train(config.replace(attn="eager", run_dir=str(tmp_path / "eager")))
    assert abs(bf16["base_loss"] - ref["base_loss"]) < 0.02 * ref["base_loss"]
    assert abs(bf16["final_loss"] - ref["final_loss"]) < 0.05 * ref["final_loss"]
    assert abs(eager["final_loss"] - ref["final_loss"]) < 1e-4 * ref["final_loss"]


def test_unavailable_attention_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash_attn is installed")
    except ImportError:
        pass
    with pytest.raises(TrainInputError, match="attn='flash'"):
        train(TrainConfig(**BASE, attn="flash", run_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Greedy evaluation: KV cache and batched prompts
# ---------------------------------------------------------------------------------------------
def test_kv_cache_generation_equals_uncached_greedy_and_batching_changes_nothing():
    from memft_kernels.train.evaluate import greedy_generate
    from memft_kernels.train.models import add_lora, build_model

    model = build_model("nano", 256, 0.2, 0, "float32", {"bos": 1, "eos": 2, "pad": 0})
    model = add_lora(model, 2, None, 0.0, ["q_proj", "v_proj"], None, 0).eval()
    with torch.no_grad():  # a non-zero adapter, so that generation goes through it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 6, 3, 11)]
    cached = greedy_generate(model, prompts, 48, "cpu")
    uncached = greedy_generate(model, prompts, 48, "cpu", use_cache=False)
    one_by_one = torch.cat([greedy_generate(model, [p], 48, "cpu", use_cache=False) for p in prompts])
    assert cached.shape == (4, 48)
    assert torch.equal(cached, uncached) and torch.equal(cached, one_by_one)
    assert len({tuple(r) for r in cached.tolist()}) == 4  # four different continuations


def test_cached_recall_calls_the_model_once_per_generated_token(monkeypatch):
    """A recall of N tokens costs one prompt forward + N - 1 one-position forwards: about one generation."""
    from memft_kernels.train.evaluate import greedy_generate
    from memft_kernels.train.models import build_model

    model = build_model("nano", 64, 0.2, 0).eval()
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    greedy_generate(model, [[1, 2, 3]], 40, "cpu")
    assert seen == [3] + [1] * 39


@pytest.mark.parametrize("checkpointing,calls", [(False, 1), (True, 2)])
def test_gradient_checkpointing_recomputes_each_layer_in_the_backward(checkpointing, calls, monkeypatch, tmp_path):
    """Each decoder layer's MLP runs once per step, twice under checkpointing (the backward's recompute;
    module hooks do not see the recompute, so the class's forward is counted)."""
    from transformers.models.llama import modeling_llama

    from memft_kernels.train import loop

    seen = []
    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: seen.append(1) or forward(self, x))
    run = loop.setup(TrainConfig(**dict(BASE, out_dir=str(tmp_path)), gradient_checkpointing=checkpointing))
    seen.clear()  # the memory plan's probe forwards
    loop.train_step(run)
    assert len(seen) == calls * run.model.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused,checkpointing", [(False, False), (True, False), (True, True)])
def test_plan_estimate_within_20_percent_of_the_measured_step_peak(fused, checkpointing):
    """One step's extra peak (CPU: peak RSS rise, glibc returning freed buffers) vs the plan's step_peak."""
    from memft_kernels.bench.timing import rss_tracking_available, tune_malloc_for_rss
    from memft_kernels.train import loop
    from memft_kernels.train.plan import measure

    if not (tune_malloc_for_rss() and rss_tracking_available()):
        pytest.skip("peak RSS cannot be measured in this process")
    config = TrainConfig(model="tiny", vocab_size=8192, length=384, steps=4, threads=1, progress=False,
                         backend="cpu", fused_head=fused, gradient_checkpointing=checkpointing)
    run = loop.setup(config, make_dir=False)
    loop.train_step(run)  # AdamW's states exist from here on
    measured = measure(lambda: loop.train_step(run), "cpu")
    estimate = run.plan.step_peak()
    assert 0.8 <= estimate / measured <= 1.2, (estimate / 2**20, measured / 2**20)


def test_plan_names_the_switch_that_makes_a_run_fit():
    from memft_kernels.train.plan import MemoryPlan, check_fits

    mib = 2**20
    plan = MemoryPlan(device="cuda:0", tokens=4096, weights=1000 * mib, lora_params=10 * mib, lora_grads=10 * mib,
                      optimizer=20 * mib, activations=600 * mib, activations_plain=600 * mib,
                      activations_checkpointed=50 * mib, recompute=70 * mib, head=1500 * mib, head_logits=1500 * mib,
                      head_fused=40 * mib, fused_head=False, gradient_checkpointing=False, free=4000 * mib)
    check_fits(plan)  # 2130 MiB of 4000 free: fits
    plan.free = 1000 * mib  # the fused head (680 MiB) fits, checkpointing alone (1650) does not
    with pytest.raises(TrainInputError, match="add --fused-head \\(see memft train --plan\\)"):
        check_fits(plan)
    plan.free = 220 * mib  # only both together (190 MiB; 92% of the free memory is the budget)
    with pytest.raises(TrainInputError, match="add --fused-head --gradient-checkpointing"):
        check_fits(plan)
    plan.free = 100 * mib
    with pytest.raises(TrainInputError, match="does not fit even with"):
        check_fits(plan)
    plan.free = None  # CPU: no check
    check_fits(plan)


def test_plan_flag_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from memft_kernels.cli import main

    assert main(["train", "--model", "nano", "--vocab-size", "64", "--length", "16", "--plan",
                 "--out-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "memory plan, per device (cpu" in out and "activations" in out and "fused chunk" in out
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Longer than the context: windows
# ---------------------------------------------------------------------------------------------
def test_long_samples_are_split_into_windows_that_fit_and_cover_the_sequence():
    from memft_kernels.train.data import Sample, Task
    from memft_kernels.train.longcontext import split_long_samples

    answer = list(range(10, 110))
    task = Task("random", [Sample([1], answer), Sample([1], [7, 8, 9])], tokenizer=None)
    out = split_long_samples(task, 16)
    windows = out.samples[:-1]
    assert out.samples[-1].answer == [7, 8, 9]  # short samples are kept as they are
    assert sum((w.answer for w in windows), []) == answer
    assert all(len(w.prompt) + len(w.answer) <= 16 for w in out.samples)
    start = 0
    for w in windows:  # each prompt: bos and the true tokens just before the window
        assert w.prompt[0] == 1 and w.prompt[1:] == answer[max(0, start - 7):start]
        start += len(w.answer)
    assert split_long_samples(task, 200) is task


def test_a_sequence_longer_than_the_context_is_memorized_in_windows(tmp_path):
    # nano's context is 1024: 1100 tokens -> windows of 512, 512 and 76 answer tokens
    report = train(TrainConfig(**dict(BASE, samples=1, batch_size=0, length=1100, steps=2, eval_every=0),
                               run_dir=str(tmp_path / "long")))
    assert report["samples"] == 3 and report["answer_tokens"] == 1100 and report["exact_recall"] is not None


def test_compile_wraps_the_decoder_of_the_training_forward(monkeypatch, tmp_path):
    """--compile: the training forward goes through torch.compile(decoder) (here a recording stand-in:
    compiling on the CPU costs a minute), generation and evaluation through the eager model."""

    compiled, calls = [], []

    def fake_compile(module, **kwargs):
        compiled.append(module)

        def forward(*args, **kw):
            calls.append(kw["input_ids"].shape)
            return module(*args, **kw)

        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    report = train(TrainConfig(**dict(BASE, steps=2, eval_every=0), compile=True, run_dir=str(tmp_path / "c")))
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "LlamaModel"
    assert len(calls) == 2  # one training forward per step (batch 2 of 3 samples, no accumulation)
    assert report["exact_recall"] is not None
