"""The training loop's logic on tiny settings (seconds): recall, the MemFT-OT gradient, the window,
the curriculum, the outputs of a run and the bad-input errors of `memft train`."""
import json
import math

import pytest
import torch

from memft_kernels.cli import main as memft_main
from memft_kernels.train import TrainConfig, TrainInputError, train
from memft_kernels.train.loop import memorization_loss

@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs here use threads=1 (TrainConfig.threads sets torch's global count): restore it after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = dict(model="nano", vocab_size=256, length=32, steps=40, lr=1e-2, eval_every=10, threads=1,
            progress=False, backend="torch")


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------
def test_recall_reaches_100_percent_and_writes_the_run_folder(tmp_path):
    report = train(TrainConfig(**TINY, loss="memft-ot", run_dir=str(tmp_path / "run"), save_tokens=True))
    assert report["exact_recall"] == 1.0 and report["whole_exact"]
    assert report["token_accuracy"] == 1.0 and report["recalled_frac"] == 1.0
    assert report["steps_to_full_recall"] is not None and report["steps_to_full_recall"] <= 40
    assert report["base_loss"] > math.log(256) and report["dL"] == pytest.approx(report["base_loss"] - report["final_loss"])
    # r = 4 per layer: q, o (64 -> 64), k, v (64 -> 32, 2 kv heads), gate, up, down (64 <-> 128).
    assert report["lora_params"] == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "report.json", "report.md", "loss.png", "recall.png",
                 "tokens.npz", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "report.json").read_text())["final_loss"] == report["final_loss"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 41))
    import numpy as np

    tokens = np.load(run / "tokens.npz")
    assert tokens["prob"].shape == (32,) and tokens["correct"].all() and (tokens["prob"] > 0.5).all()
    assert tokens["first_wrong"].tolist() == [-1]


def test_same_seed_same_report(tmp_path):
    config = TrainConfig(**dict(TINY, steps=6), loss="memft-sw", plots=False, save_adapter=False)
    a = train(config.replace(run_dir=str(tmp_path / "a")))
    b = train(config.replace(run_dir=str(tmp_path / "b")))
    keys = ("base_loss", "final_loss", "token_accuracy", "recalled_frac")
    assert [a[k] for k in keys] == [b[k] for k in keys]


@pytest.mark.parametrize("task,extra", [
    ("text", dict(length=48, tokenizer="byte", replace_rate=0.25)),
    ("text", dict(length=24, tokenizer="trained", trained_vocab=300)),
    ("phonebook", dict(samples=6, batch_size=3, curriculum=True)),
])
def test_other_tasks_run(tmp_path, task, extra):
    config = TrainConfig(**dict(TINY, steps=4, eval_every=0, **extra), task=task, loss="memft-sw",
                         plots=False, save_adapter=False, run_dir=str(tmp_path / "run"))
    report = train(config)
    assert report["task"] == task and 0.0 <= report["exact_recall"] <= 1.0
    assert report["final_loss"] < report["base_loss"]


def test_single_layer_lora(tmp_path):
    config = TrainConfig(**dict(TINY, steps=2), target_modules=["down_proj"], layers=[1], rank=2,
                         plots=False, save_adapter=False, run_dir=str(tmp_path / "run"))
    assert train(config)["lora_params"] == 2 * (128 + 64)


# ---------------------------------------------------------------------------------------------
# The loss of a step
# ---------------------------------------------------------------------------------------------
def _logits_with_confident_rows(n=64, v=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    confident = torch.arange(n) % 3 == 0
    logits[confident, target[confident]] += 8.0  # p well above 0.5 on every third row
    target[5] = -100
    return logits, target


def test_memft_ot_gives_zero_gradient_to_tokens_with_p_at_least_half():
    logits, target = _logits_with_confident_rows()
    x = logits.clone().requires_grad_(True)
    loss, stats, info = memorization_loss(x, target, None, TrainConfig(loss="memft-ot", backend="torch"))
    loss.backward()
    valid = target != -100
    prob = torch.softmax(logits.double(), -1).gather(1, target.clamp_min(0)[:, None])[:, 0]
    above = (prob >= 0.5) & valid
    active = (prob < 0.5) & valid
    assert above.sum() > 10 and active.sum() > 10
    assert torch.all(x.grad[above] == 0) and torch.all(x.grad[~valid] == 0)
    assert torch.all(x.grad[active].abs().sum(-1) > 0)
    # The loss is the mean CE over the active tokens only, and the log says how many were active.
    ce = torch.logsumexp(logits.double(), -1) - logits.double().gather(1, target.clamp_min(0)[:, None])[:, 0]
    assert loss.item() == pytest.approx(float(ce[active].mean()), rel=1e-5)
    assert info["n_active"] == int(active.sum()) and not info["fell_back"]


def test_memft_ot_fallback_when_no_token_is_active():
    logits, target = _logits_with_confident_rows()
    logits[torch.arange(64), target.clamp_min(0)] += 30.0  # every token far above 0.5
    for fallback, expect_grad in (("mean", True), ("zero", False)):
        x = logits.clone().requires_grad_(True)
        loss, _, info = memorization_loss(x, target, None, TrainConfig(loss="memft-ot", fallback=fallback, backend="torch"))
        loss.backward()
        assert info["fell_back"]
        assert bool(x.grad.abs().sum() > 0) == expect_grad


def test_memft_sw_weight_is_gate_times_window():
    logits, target = _logits_with_confident_rows()
    tw = torch.rand(64, generator=torch.Generator().manual_seed(3))
    _, stats, _ = memorization_loss(logits, target, tw, TrainConfig(loss="memft-sw", backend="torch"))
    ce = torch.logsumexp(logits, -1) - logits.gather(1, target.clamp_min(0)[:, None])[:, 0]
    gate = torch.sigmoid(10 * (ce - math.log(2)))
    expected = torch.where(target != -100, gate * tw, torch.zeros_like(tw))
    torch.testing.assert_close(stats.weight, expected, rtol=1e-5, atol=1e-7)


# The window and the curriculum: tests/test_train_recipe.py


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    return str(path)


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank=0"),
    (["--rank", "-3"], "rank=-3"),
    (["--loss", "focal"], "loss='focal'"),
    (["--task", "poems"], "task='poems'"),
    (["--task", "text", "--data", "/nonexistent/file.txt"], "does not exist"),
    (["--task", "text", "--data", "EMPTY"], "is empty"),
    (["--task", "text", "--data", "NOMODEL"], "is a folder, not a text file"),
    (["--model", "NOMODEL"], "no config.json"),
    (["--compare", "ce,focal"], "unknown loss 'focal'"),
    (["--resume", "/nonexistent/run"], "no such run folder"),
    (["--resume", "TMP", "--steps", "300"], "--steps cannot be changed"),
    (["--model", "nano", "--steps", "1", "--out-dir", "EMPTY"], "cannot create the run folder"),
    (["--model", "nano", "--steps", "1", "--run-dir", "EMPTY"], "cannot create the run folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path, empty_file):
    args = [a.replace("EMPTY", empty_file).replace("NOMODEL", str(tmp_path)).replace("TMP", str(tmp_path))
            for a in args]
    code = memft_main(["train", "--out-dir", str(tmp_path / "runs"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("memft train: error:")


def test_model_folder_without_a_causal_lm(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert memft_main(["train", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "not a causal LM" in capsys.readouterr().err


def test_bad_input_from_the_api_is_a_value_error():
    with pytest.raises(TrainInputError, match="rank"):
        train(TrainConfig(rank=0))
    assert issubclass(TrainInputError, ValueError)


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "memft_kernels", "train", "--loss", "focal"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memft train: error: loss='focal'")


def test_local_model_folder_with_its_own_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from memft_kernels.train.data import TrainedTokenizer, read_text

    tok = TrainedTokenizer([read_text(None)], 300)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    report = train(TrainConfig(**dict(TINY, steps=2, eval_every=0, model=str(tmp_path / "model"), length=20),
                               task="text", plots=False, save_adapter=False, run_dir=str(tmp_path / "run")))
    assert report["answer_tokens"] == 20 and report["final_loss"] < report["base_loss"]
    # longer than the context of 64: memorized in windows of 32 tokens (train/longcontext.py)
    report = train(TrainConfig(**dict(TINY, steps=2, eval_every=0, model=str(tmp_path / "model"), length=100),
                               task="text", plots=False, save_adapter=False, run_dir=str(tmp_path / "long")))
    assert report["answer_tokens"] == 100 and report["samples"] == 4


def test_a_step_with_nothing_to_train_leaves_the_weights_alone():
    """--fallback zero (the authors' zero_bp, the paper-phonebook recipe): a step whose micro-batches
    have no active token anywhere has no gradient, as theirs (a constant's backward), so AdamW leaves
    the weights and their moments alone. A zero gradient used to move them by momentum."""
    from memft_kernels.train import loop

    run = loop.setup(TrainConfig(model="nano", vocab_size=128, length=8, samples=4, steps=12, lr=3e-2, threads=1,
                                 backend="torch", loss="memft-ot", fallback="zero", threshold=0.02, batch_size=2,
                                 grad_accum=2, eval_every=0, progress=False, plots=False), make_dir=False)
    seen = set()
    for _ in range(12):
        params = loop.trainable_parameters(run.model)
        before = [p.detach().clone() for p in params]
        moments = [run.optimizer.state[p]["exp_avg"].clone() if p in run.optimizer.state else None for p in params]
        info = loop.train_step(run)
        moved = [not torch.equal(a, p) for a, p in zip(before, params)]
        if info["skipped"]:
            assert info["fell_back"] and info["loss"] == 0.0 and not any(moved)
            assert all(torch.equal(m, run.optimizer.state[p]["exp_avg"]) for m, p in zip(moments, params))
        else:
            assert any(moved)
        seen.add(info["skipped"])
    assert seen == {True, False}


def test_text_task_memorizes_the_file_verbatim(tmp_path):
    """The byte tokens of the text task are the file's bytes: unicode (a character split across
    samples) and Windows line endings kept (\r\n was read as \n), from the first byte."""
    from memft_kernels.train.data import build_task

    raw = "na\u00efve caf\u00e9 \u2713 \u65e5\u672c\r\nline two\r\n\U0001f389 end".encode("utf-8")
    (tmp_path / "t.txt").write_bytes(raw)
    task = build_task(TrainConfig(task="text", data=str(tmp_path / "t.txt"), length=7, samples=len(raw) // 7))
    assert b"".join(bytes(s.answer) for s in task.samples) == raw[: 7 * (len(raw) // 7)]
    assert all(s.prompt == [task.tokenizer.bos] for s in task.samples)


def test_compare_runs_each_loss_and_prints_one_table(tmp_path, capsys):
    code = memft_main(["train", "--model", "nano", "--vocab-size", "64", "--length", "8", "--steps", "2",
                       "--backend", "torch", "--no-progress", "--no-save-adapter",
                       "--compare", "ce,memft-ot,memft-sw", "--run-dir", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["ce", "memft-ot", "memft-sw"]
    for name in ("compare.md", "compare.png", "ce/report.json", "memft-ot/report.json", "memft-sw/report.json"):
        assert (tmp_path / "cmp" / name).is_file(), name


@pytest.mark.gpu
def test_recall_on_cuda_with_the_auto_backend(tmp_path):
    """The same easy case on the GPU (Triton/CUDA loss backend): run by benchmarks/gpu_check.sh."""
    report = train(TrainConfig(**dict(TINY, backend="auto"), device="cuda", loss="memft-sw",
                               plots=False, save_adapter=False, run_dir=str(tmp_path / "run")))
    assert report["device"].startswith("cuda")
    assert report["token_accuracy"] == 1.0 and report["exact_recall"] == 1.0
