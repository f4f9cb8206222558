"""The authors' method in the loop (issue 16): the sliding window on this forward's predictions,
the curriculum, gradient accumulation and the --recipe presets. References are written here from
the formulas in docs/TRAINING.md, independently of memft_kernels.train."""
import math

import pytest
import torch

from memft_kernels import memft_loss
from memft_kernels.cli import main as memft_main
from memft_kernels.train import TrainConfig, TrainInputError
from memft_kernels.train.data import to_batch
from memft_kernels.train.loop import Sampler, memorization_loss, schedule_length, setup, train_step
from memft_kernels.train.recipes import recipe_config, recipe_settings
from memft_kernels.train.windows import SlidingWindow, curriculum_active, curriculum_ratio


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# An independent reference of the authors' window: plain Python, float64, one row at a time.
# ---------------------------------------------------------------------------------------------
class RefWindow:
    def __init__(self, span=50, decay=20.0, floor=0.01, patience=3, growth=0.5, max_expand=4.0):
        self.p = dict(span=span, decay=decay, floor=floor, patience=patience, growth=growth, max_expand=max_expand)
        self.state = {}  # key -> [last anchor or None, repeats, e]

    def __call__(self, key, pred_row, target_row, ignore=-100):
        p = self.p
        anchor = next((t for t, (a, b) in enumerate(zip(pred_row, target_row)) if b != ignore and a != b), None)
        last, repeats, e = self.state.get(key, [None, 0, 1.0])
        repeats = repeats + 1 if (anchor is not None and anchor == last) else 0
        e = min(e + p["growth"], p["max_expand"]) if repeats >= p["patience"] else 1.0
        self.state[key] = [anchor, repeats, e]
        if anchor is None:
            return [1.0] * len(target_row), e
        w = []
        for t in range(len(target_row)):
            if t < anchor:
                w.append(1.0)
            elif t < anchor + p["span"] * e:
                w.append(math.exp(-(t - anchor) / p["decay"]))
            else:
                w.append(p["floor"])
        return w, e


def _pred_with_errors(target, errors):
    """pred equal to target except at the positions in errors[row] (+1 mod 50)."""
    pred = target.clone()
    for row, positions in enumerate(errors):
        for t in positions:
            pred[row, t] = (target[row, t] + 1) % 50
    return pred


class Stats:
    def __init__(self, pred):
        self.pred = pred


def test_window_over_a_multi_step_sequence_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    width = 260
    target = torch.randint(0, 50, (3, width), generator=g)
    target[:, :4] = -100  # prompt
    target[2, 200:] = -100  # padding
    # Per step, the wrong positions of each row (the first valid one is the anchor).
    # row 0: anchor stays at 10 (e grows from the 4th sighting, capped at 4), moves to 30, no error, back at 30.
    # row 1: no error, then 5 (with later errors too), moves to 7 and stays.
    # row 2: a wrong prediction on an ignored position is no error; anchor 150 stays.
    steps = []
    for k in range(14):
        row0 = [10, 40] if k < 10 else ([30] if k in (10, 11, 13) else [])
        row1 = [] if k == 0 else ([5, 6, 90] if k < 5 else [7])
        row2 = [2, 210] + ([150] if k >= 1 else [])
        steps.append([row0, row1, row2])
    window, ref = SlidingWindow(), RefWindow()
    expands = []
    for errors in steps:
        pred = _pred_with_errors(target, errors)
        got = window(target, Stats(pred))
        assert got.dtype == torch.float32 and got.shape == target.shape
        for row in range(3):
            want, e = ref(row, pred[row].tolist(), target[row].tolist())
            torch.testing.assert_close(got[row].double(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0)
        expands.append(window.last["expand"].tolist())
    assert [e[0] for e in expands] == [1, 1, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4, 1, 1, 1, 1]
    assert [e[1] for e in expands] == [1, 1, 1, 1, 1.5, 1, 1, 1, 1.5, 2, 2.5, 3, 3.5, 4]
    assert window.last["anchor"].tolist() == [30, 7, 150]
    # Spot values from the formula: e = 4 at row 1 (anchor 7): inside up to 7 + 200.
    w = window.last
    final = got[1]
    assert final[6].item() == 1.0 and final[7].item() == 1.0
    assert final[27].item() == pytest.approx(math.exp(-1.0), rel=1e-6)
    assert final[206].item() == pytest.approx(math.exp(-199 / 20), rel=1e-5) and final[207].item() == pytest.approx(0.01)
    assert w["repeats"].tolist()[1] == 8


def test_window_state_per_row_and_per_sample():
    target = torch.randint(0, 50, (2, 80), generator=torch.Generator().manual_seed(1))
    errors = {0: [3], 1: [20]}  # sample -> its (constant) wrong position

    def batch(order):
        return _pred_with_errors(target[order], [errors[i] for i in order]), target[order]

    by_sample, by_row = SlidingWindow(), SlidingWindow()
    for step in range(6):
        order = [0, 1] if step % 2 == 0 else [1, 0]
        pred, tgt = batch(order)
        by_sample(tgt, Stats(pred), sample_ids=torch.tensor(order))
        by_row(tgt, Stats(pred))
    # Per sample: each anchor was seen 6 times in a row -> e = 1 + 0.5 * 3.
    assert by_sample.last["expand"].tolist() == [2.5, 2.5]
    # Per row (the authors'): each row alternates between two anchors -> never repeats.
    assert by_row.last["expand"].tolist() == [1.0, 1.0]
    # A batch of another size starts the row state over; per-sample state survives it.
    pred, tgt = batch([0])
    by_row(tgt, Stats(pred))
    assert by_row.last["repeats"].tolist() == [0]
    by_sample(tgt, Stats(pred), sample_ids=[0])
    assert by_sample.last["repeats"].tolist() == [6]
    with pytest.raises(ValueError, match="distinct"):
        by_sample(target, Stats(target), sample_ids=[1, 1])
    with pytest.raises(ValueError, match="2 rows"):
        by_sample(target, Stats(target), sample_ids=[1])


def test_window_state_dict_continues_exactly():
    target = torch.randint(0, 50, (2, 60), generator=torch.Generator().manual_seed(2))
    seq = [[[4], [9]]] * 5 + [[[4], []]] * 2
    a = SlidingWindow(span=10, decay=5.0)
    b = SlidingWindow(span=10, decay=5.0)
    outs_a, outs_b = [], []
    for k, errors in enumerate(seq):
        pred = _pred_with_errors(target, errors)
        outs_a.append(a(target, Stats(pred)))
        if k == 3:
            saved = b.state_dict()
            b = SlidingWindow(span=10, decay=5.0)
            b.load_state_dict(saved)
        outs_b.append(b(target, Stats(pred)))
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[4])  # e grew: the test sees the state


@pytest.mark.parametrize("kwargs,needle", [
    (dict(span=0), "span=0"), (dict(decay=-1), "decay=-1"), (dict(floor=2), "floor=2"),
    (dict(patience=0), "patience=0"), (dict(growth=-0.5), "growth=-0.5"), (dict(max_expand=0.5), "max_expand=0.5"),
])
def test_window_bad_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SlidingWindow(**kwargs)


# ---------------------------------------------------------------------------------------------
# weight_fn sees this forward's predictions
# ---------------------------------------------------------------------------------------------
def test_weight_fn_sees_this_forwards_pred(monkeypatch):
    from memft_kernels.train import head

    def no_extra_pass(self):
        raise AssertionError("the window must come from the loss's own stats, not another argmax of the logits")

    monkeypatch.setattr(head.LogitsHead, "argmax", no_extra_pass)
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 16, (2, 40), generator=g)
    target[:, :2] = -100
    seen = []
    window, ref = SlidingWindow(span=8, decay=4.0), RefWindow(span=8, decay=4.0)

    def recording(tgt, stats):
        seen.append(stats.pred.clone())
        return window(tgt, stats)

    config = TrainConfig(loss="memft-sw", backend="torch")
    for step, right_until in enumerate((0, 25, 12, 30)):  # the first wrong prediction moves every step
        logits = torch.randn(2, 40, 16, generator=g) * 3
        rows, pos = torch.arange(2)[:, None], torch.arange(right_until)[None, :]
        logits[rows, pos, target.clamp_min(0)[:, :right_until]] += 50.0
        wrong = torch.arange(2), torch.full((2,), right_until), (target[:, right_until] + 1) % 16
        logits[wrong] += 80.0  # make sure position right_until is wrong
        _, stats, _ = memorization_loss(logits, target, None, config, weight_fn=recording)
        assert len(seen) == step + 1 and torch.equal(seen[-1], logits.argmax(-1))
        assert window.last["anchor"].tolist() == [max(right_until, 2)] * 2
        # The final weight is the gate times the window of this very forward.
        ce = torch.logsumexp(logits.double(), -1) - logits.double().gather(-1, target.clamp_min(0)[..., None])[..., 0]
        win = torch.tensor([ref(r, seen[-1][r].tolist(), target[r].tolist())[0] for r in range(2)], dtype=torch.float64)
        expected = torch.where(target != -100, torch.sigmoid(10 * (ce - math.log(2))) * win, torch.zeros_like(ce))
        torch.testing.assert_close(stats.weight.double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The loop: memft-sw step for step against the authors' computation
# ---------------------------------------------------------------------------------------------
NANO = dict(model="nano", vocab_size=64, length=20, lr=3e-2, threads=1, progress=False, plots=False,
            save_adapter=False, backend="torch", eval_every=0)


def _reference_grads(run, batches, loss_of_batch):
    params = [p for p in run.model.parameters() if p.requires_grad]
    total = 0.0
    for b in batches:
        batch = to_batch(run.task, b.tolist(), run.task.max_len)
        logits = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total = total + loss_of_batch(logits.double(), batch.labels)
    return torch.autograd.grad(total, params)


def _check_grads(run, ref):
    params = [p for p in run.model.parameters() if p.requires_grad]
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    want = torch.cat([r.reshape(-1) for r in ref]).double()
    assert want.norm() > 0
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("head", [dict(backend="torch"), dict(backend="auto", fused_head=True)])
def test_memft_sw_in_the_loop_is_the_authors_step_for_step(tmp_path, head):
    """The loss's weight_fn (logits or the fused head, whose logits are never materialized) gives
    the authors' update: the window from this very forward's argmax."""
    run = setup(TrainConfig(**dict(NANO, **head), samples=2, batch_size=2, loss="memft-sw", window_span=6,
                            window_decay=3.0, steps=7, run_dir=str(tmp_path / "run")))
    assert run.fused_head == bool(head.get("fused_head"))
    ref = RefWindow(span=6, decay=3.0)
    anchors = []

    def loss_of_batch(logits, labels):
        valid = labels != -100
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               reduction="none", ignore_index=-100).reshape(labels.shape)
        pred = logits.argmax(-1)
        win = torch.tensor([ref(r, pred[r].tolist(), labels[r].tolist())[0] for r in range(labels.shape[0])],
                           dtype=torch.float64)
        anchors.append([ref.state[r][0] for r in range(labels.shape[0])])
        w = (torch.sigmoid(10 * (ce.detach() - math.log(2))) * win * valid).detach()
        return (w * ce).sum() / w.sum()

    for step in range(7):
        batches = run.sampler.epoch_batches(run.sampler.epoch)[run.sampler.pos:run.sampler.pos + 1]
        train_step(run, on_grads=lambda r: _check_grads(r, _reference_grads(r, batches, loss_of_batch)))
    assert len({tuple(a) for a in anchors}) > 1  # the anchors moved during these steps


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["mean", "tokens"])
def test_accumulation_equals_one_call_per_micro_batch(tmp_path, normalize):
    run = setup(TrainConfig(**NANO, task="phonebook", samples=6, batch_size=2, grad_accum=2,
                            accum_normalize=normalize, loss="memft-ot", steps=4, run_dir=str(tmp_path / "run")))
    sizes = []
    for step in range(4):
        batches = run.sampler.epoch_batches(run.sampler.epoch)[run.sampler.pos:run.sampler.pos + 2]
        sizes.append(len(batches))
        n_tokens = sum(len(run.task.samples[i].answer) for b in batches for i in b.tolist())

        def loss_of_batch(logits, labels):
            if normalize == "mean":  # each micro-batch's MemFT mean / K (K even for a short last step)
                return memft_loss(logits.float(), labels, policy="hard", backend="torch") / 2
            return memft_loss(logits.float(), labels, policy="hard", reduction="sum", backend="torch") / n_tokens

        info = train_step(run, on_grads=lambda r: _check_grads(r, _reference_grads(r, batches, loss_of_batch)))
        assert info["micro_batches"] == len(batches) and info["batch"] == 2 * len(batches)
    assert sizes == [2, 1, 2, 1]  # 3 batches an epoch: a step never crosses the epoch's end


@pytest.mark.parametrize("threshold,fallback", [(0.5, "mean"), (1e-9, "mean"), (1e-9, "zero")])
def test_active_accumulation_equals_one_call_over_the_whole_step(tmp_path, threshold, fallback):
    """--accum-normalize active: sum w l / sum w over all the step's micro-batches, i.e. one
    memft_loss call over the whole step; threshold 1e-9 makes every token "recalled", so the
    fallback applies to the whole step (plain CE mean, or no gradient at all)."""
    run = setup(TrainConfig(**NANO, task="phonebook", samples=6, batch_size=2, grad_accum=3, threshold=threshold,
                            fallback=fallback, accum_normalize="active", loss="memft-ot", steps=2,
                            run_dir=str(tmp_path / "run")))
    params = [p for p in run.model.parameters() if p.requires_grad]
    for step in range(2):
        batches = run.sampler.epoch_batches(run.sampler.epoch)[run.sampler.pos:run.sampler.pos + 3]
        rows = to_batch(run.task, torch.cat(batches).tolist(), run.task.max_len)
        logits = run.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
        ref_loss = memft_loss(logits.double(), rows.labels, policy="hard", threshold=threshold, fallback=fallback,
                              backend="torch")
        grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
        want = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])

        def check(r):
            got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]).double()
            if fallback == "zero" and threshold < 1e-3:
                assert got.abs().max().item() == 0.0 and want.abs().max().item() == 0.0
            else:
                assert want.norm() > 0 and ((got - want).norm() / want.norm()).item() < 1e-5

        info = train_step(run, on_grads=check)
        assert info["micro_batches"] == 3
        assert info["fell_back"] == (threshold < 1e-3)
        assert info["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch,ratios,boundaries,expected", [
    # expected: active samples per epoch 0..len-1 (int(n * ratio) floored to batches, >= 1 batch, <= complete)
    (250, 25, None, None, {0: 50, 19: 50, 20: 100, 40: 150, 60: 200, 80: 250, 199: 250, 500: 250}),
    (10, 3, [0.2, 0.7, 1.0], [1, 2, 3], {0: 3, 1: 6, 2: 9, 3: 9}),
    (7, 7, [0.5, 1.0], [2, 4], {0: 7, 1: 7, 2: 7, 5: 7}),
    (50, 5, [0.3, 0.6], [3, 5], {0: 15, 2: 15, 3: 30, 4: 30, 9: 30}),
])
def test_curriculum_subsets_and_batches(n, batch, ratios, boundaries, expected):
    sampler = Sampler(n, batch, seed=42, curriculum=True, style="paper", ratios=ratios, boundaries=boundaries)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(42))  # one seeded order, as the authors'
    for epoch, active in expected.items():
        batches = sampler.epoch_batches(epoch)
        assert [len(b) for b in batches] == [batch] * (active // batch)  # whole batches only (drop_last)
        assert torch.equal(torch.cat(batches), order[:active])  # the prefix of the same order every epoch
        kwargs = {} if ratios is None else dict(ratios=ratios, boundaries=boundaries)
        assert curriculum_active(n, batch, curriculum_ratio(epoch, **kwargs)) == active


def test_curriculum_length_of_a_run_and_errors():
    config = TrainConfig(samples=10, batch_size=2, curriculum=True, curriculum_ratios=[0.5, 1.0],
                         curriculum_boundaries=[1, 2], epochs=3, grad_accum=2)
    sampler = Sampler(10, 2, seed=0, curriculum=True, ratios=[0.5, 1.0], boundaries=[1, 2])
    # batches per epoch 2, 5, 5 -> steps 1 + 3 + 3; the lr decays over 1 + 2 + 2 (the authors' count)
    assert schedule_length(config, sampler) == (7, 5)
    with pytest.raises(ValueError, match="at least one full batch"):
        curriculum_active(5, 6, 1.0)
    with pytest.raises(TrainInputError, match="whole batches"):
        TrainConfig(task="phonebook", samples=8, curriculum=True).validate()
    with pytest.raises(TrainInputError, match="need --curriculum"):
        TrainConfig(curriculum_ratios=[0.5, 1.0]).validate()
    with pytest.raises(TrainInputError, match="same, non-zero length"):
        TrainConfig(samples=4, batch_size=2, curriculum=True, curriculum_ratios=[1.0], curriculum_boundaries=[1, 2]).validate()


def test_stages_curriculum_is_kept_on_request():
    sampler = Sampler(10, 0, seed=0, curriculum=True, epochs_per_stage=1, style="stages")
    seen = [set(sampler.next_batch().tolist()) for _ in range(5)]
    assert [len(s) for s in seen] == [2, 4, 6, 8, 10]
    assert seen[0] < seen[1] < seen[2] < seen[3]


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------
def test_recipe_values_and_overrides():
    pb = recipe_config("paper-phonebook")
    assert (pb.loss, pb.fallback, pb.curriculum, pb.curriculum_style) == ("memft-ot", "zero", True, "paper")
    assert (pb.lr, pb.epochs, pb.grad_accum, pb.curriculum_boundaries) == (1e-2, 300, 1, [20, 40, 60, 80, 300])
    assert (pb.samples, pb.batch_size, pb.layers) == (50, 5, [2])  # built-in tiny: 250 / 5 entries, layer 18/32 -> 2/4
    big = recipe_settings("paper-phonebook:llama:24000", model="/nonexistent")  # a folder: the authors' values
    assert big["samples"][0] == 6000 and big["batch_size"][0] == 50 and big["grad_accum"][0] == 4
    assert big["layers"][0] == [18] and big["lr"][0] == 3e-3
    qwen = recipe_settings("paper-phonebook:qwen:8000", model="/nonexistent")
    assert (qwen["samples"][0], qwen["batch_size"][0], qwen["grad_accum"][0], qwen["layers"][0]) == (800, 20, 2, [24])
    lc = recipe_config("paper-longcontext", rank=8)
    assert (lc.loss, lc.window_span, lc.window_decay, lc.window_floor, lc.window_patience) == ("memft-sw", 50, 20, 0.01, 3)
    assert (lc.epochs, lc.batch_size, lc.length, lc.rank, lc.task) == (2000, 1, 128, 8, "random")
    sft = recipe_config("paper-phonebook", loss="ce", curriculum=False, epochs=200, batch_size=2)
    assert (sft.curriculum, sft.curriculum_ratios, sft.fallback, sft.lr) == (False, None, "zero", 1e-2)
    for bad, needle in (("paper-x", "not known"), ("paper-phonebook:gpt", "family"), ("paper-phonebook:llama:999", "999")):
        with pytest.raises(TrainInputError, match=needle):
            recipe_config(bad)


@pytest.mark.parametrize("recipe,extra", [
    ("paper-phonebook", ["--epochs", "1"]),  # epoch 0 trains 20% of the 50 entries: 2 batches of 5
    ("paper-longcontext", ["--epochs", "3", "--length", "24"]),
])
def test_each_recipe_parses_and_runs_a_few_steps(tmp_path, capsys, recipe, extra):
    run_dir = tmp_path / "run"
    code = memft_main(["train", "--recipe", recipe, "--model", "nano", "--rank", "4", "--eval-every", "0",
                       "--no-progress", "--no-plots", "--no-save-adapter", "--backend", "torch",
                       "--run-dir", str(run_dir), *extra])
    out = capsys.readouterr().out
    assert code == 0
    assert f"recipe {recipe}" in out and "script/" in out
    import json

    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert config["recipe"] == recipe and config["rank"] == 4  # a flag wins over the recipe's rank 2
    assert report["steps"] == (2 if recipe == "paper-phonebook" else 3)
    assert config["layers"] == [1]  # nano has 2 layers: the authors' relative depth


@pytest.mark.parametrize("args,needle", [
    (["--recipe", "paper-nope"], "not known"),
    (["--recipe", "paper-phonebook:llama:1234"], "1234"),
    (["--recipe", "paper-phonebook", "--batch-size", "0"], "whole batches"),
    (["--grad-accum", "0"], "grad_accum=0"),
    (["--accum-normalize", "sum"], "accum_normalize='sum'"),
])
def test_recipe_and_accumulation_bad_input_is_one_line(args, needle, capsys, tmp_path):
    code = memft_main(["train", "--out-dir", str(tmp_path / "runs"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


# ---------------------------------------------------------------------------------------------
# Accumulation under torchrun: the gradients are all-reduced once, after the K micro-batches
# ---------------------------------------------------------------------------------------------
DDP_WORKER = r'''
import json, sys, torch
import torch.distributed as dist
from memft_kernels.train import TrainConfig
from memft_kernels.train.loop import setup, train_step, trainable_parameters


def collect(options, out):
    run = setup(TrainConfig(**options, run_dir=out))
    grads = []
    for _ in range(options["steps"]):
        train_step(run, on_grads=lambda r: grads.append(torch.cat([p.grad.reshape(-1) for p in trainable_parameters(r.model)])))
    return grads


if __name__ == "__main__":
    grads = collect(json.loads(sys.argv[1]), sys.argv[2])
    if dist.get_rank() == 0:
        torch.save(grads, sys.argv[2] + ".pt")
    dist.destroy_process_group()
'''


def test_accumulation_under_two_ranks_matches_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    options = dict(NANO, task="phonebook", samples=8, batch_size=2, grad_accum=2, loss="memft-sw",
                   window_state="sample", steps=3)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(options), str(tmp_path / "ddp")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    namespace = {}
    exec(compile(DDP_WORKER, str(script), "exec"), namespace)
    single = namespace["collect"](options, str(tmp_path / "single"))
    assert len(ddp) == len(single) == 3
    diffs = [((a - b).norm() / a.norm()).item() for a, b in zip(single, ddp)]
    # Step 1 is summation-order noise only; after it Adam's sign-like first updates amplify that noise.
    assert diffs[0] < 1e-5 and max(diffs) < 1e-3, diffs
