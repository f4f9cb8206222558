"""The loss documentation runs as written: every Python snippet of README.md, docs/DISTRIBUTED.md and
docs/ARCHITECTURE.md, the signature in docs/SPEC.md, and SPEC.md's bad-input table row by row
(each row's cases raise the error type the row names, and every row of the table has cases here:
a row added to the docs without a case, or a case whose row was reworded, fails)."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from memft_kernels import MemFTLoss, dispatch, memft_linear_loss, memft_loss

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(name: str):
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), re.S)


def test_readme_snippet_runs_on_a_tiny_causal_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    (code,) = python_blocks("README.md")
    exec(code, {"model": transformers.LlamaForCausalLM(config), "input_ids": torch.randint(0, 40, (2, 9))})


def test_distributed_snippet_runs_on_a_one_process_group():
    import torch.distributed as dist

    from helpers import free_port

    code = python_blocks("docs/DISTRIBUTED.md")[0]  # the second one (DTensor logits) runs in tests/test_dtensor.py
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        hidden = torch.randn(2, 3, 8, requires_grad=True)
        w_local = torch.randn(11, 8, requires_grad=True)
        exec(code, {"hidden": hidden, "W_local": w_local, "labels": torch.randint(0, 11, (2, 3)), "tp_group": None})
        assert hidden.grad is not None and w_local.grad is not None
    finally:
        dist.destroy_process_group()


def test_architecture_backend_template_runs_in_the_ops_package():
    (code,) = python_blocks("docs/ARCHITECTURE.md")
    namespace = {"__name__": "memft_kernels.ops.mine", "__package__": "memft_kernels.ops"}
    exec(code, namespace)
    assert namespace["BACKEND"].name == "mine" and callable(namespace["row_forward"])


def test_spec_signature_is_memft_loss_signature():
    text = (ROOT / "docs/SPEC.md").read_text()
    block = re.search(r"## Signature\n\n```\n(memft_loss\(.*?\))\n```", text, re.S).group(1)
    documented = re.findall(r"(\w+)=([^,)]+)", block)
    actual = [(n, p.default) for n, p in inspect.signature(memft_loss).parameters.items()
              if p.default is not inspect.Parameter.empty]
    assert [n for n, _ in documented] == [n for n, _ in actual]
    assert [eval(v) for _, v in documented] == [d for _, d in actual]


# ------------------------------------------------------------------------ the bad-input table
def _x():
    return torch.randn(4, 5)


def _y():
    return torch.tensor([0, 1, 2, 3])


def _fn_returning(value):
    return lambda target, stats: value


# first cell of each row of SPEC.md's table -> cases: (keywords of memft_loss, or a callable, the
# error type, a pattern the message must contain: the argument's name at least).
CASES = {
    "a target outside [0, V) that is not `ignore_index` (with `validate=True`)": [
        (dict(target=torch.tensor([0, 1, 9, 3])), ValueError, r"9.*V=5"),
        (dict(target=torch.tensor([0, -3, 2, 3])), ValueError, r"-3.*V=5"),
    ],
    "logits not floating point, or target not int64 / int32 / uint8": [
        (dict(logits=torch.ones(4, 5, dtype=torch.long)), TypeError, "logits"),
        (dict(target=_y().float()), TypeError, "target"),
        (dict(target=_y().to(torch.int16)), TypeError, "target"),
        (dict(target=_y() > 1), TypeError, "target"),
    ],
    "`target.shape != logits.shape[:-1]`, V == 0": [
        (dict(target=_y()[:3]), ValueError, "target.shape"),
        (dict(logits=torch.randn(4, 0)), ValueError, "V=0"),
    ],
    "logits and target (or token_weight) on different devices": [
        (dict(target=_y().to("meta")), ValueError, "target is on meta"),
        (dict(token_weight=torch.ones(4, device="meta")), ValueError, "token_weight is on meta"),
    ],
    "threshold not in (0, 1]; sharpness <= 0; label_smoothing not in [0, 1); z_loss < 0; softcap <= 0; "
    "denominator <= 0": [
        (dict(threshold=0.0), ValueError, "threshold"), (dict(threshold=1.01), ValueError, "threshold"),
        (dict(sharpness=0.0), ValueError, "sharpness"), (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(z_loss=-1e-3), ValueError, "z_loss"), (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(denominator=0), ValueError, "denominator"), (dict(denominator=torch.tensor(-1.0)), ValueError,
                                                             "denominator"),
    ],
    "a positive float option that float32 (the kernels' arithmetic) makes 0 or inf: sharpness, z_loss, softcap, "
    "denominator outside [1.18e-38, 3.4e38], threshold below 1.18e-38; a non-finite denominator": [
        (dict(sharpness=1e39), ValueError, "sharpness"), (dict(z_loss=1e39), ValueError, "z_loss"),
        (dict(softcap=1e-40), ValueError, "softcap"), (dict(denominator=1e-300), ValueError, "denominator"),
        (dict(threshold=1e-40), ValueError, "threshold"),
        (dict(denominator=torch.tensor(math.inf)), ValueError, "denominator"),
    ],
    "a bool or a string where a number is expected (`threshold=True`, `threshold=\"0.5\"`, `denominator=\"3\"`), "
    "or not an int where an int is (`ignore_index=1.5`), or an int outside int64's range (`ignore_index=2**63`)": [
        (dict(threshold=True), ValueError, "threshold"), (dict(threshold="0.5"), ValueError, "threshold"),
        (dict(denominator="3"), ValueError, "denominator"), (dict(ignore_index=1.5), ValueError, "ignore_index"),
        (dict(ignore_index=True), ValueError, "ignore_index"),
        # the native backends' int64 argument cannot hold it (a RuntimeError from pybind11 before)
        (dict(ignore_index=2 ** 63), ValueError, "ignore_index"),
        (dict(ignore_index=-(2 ** 63) - 1), ValueError, "ignore_index"),
    ],
    "`weight_fn` not callable, or its result of the wrong type, dtype, device or shape (see `weight_fn`)": [
        (dict(weight_fn=3), TypeError, "weight_fn"),
        (dict(weight_fn=_fn_returning([1.0] * 4)), TypeError, "weight_fn"),
        (dict(weight_fn=_fn_returning(torch.ones(4, dtype=torch.long))), TypeError, "weight_fn"),
        (dict(weight_fn=_fn_returning(torch.ones(4, device="meta"))), ValueError, "weight_fn"),
        (dict(weight_fn=_fn_returning(torch.ones(3))), ValueError, "weight_fn"),
        (dict(weight_fn=_fn_returning(torch.tensor([1.0, -1.0, 1.0, 1.0]))), ValueError, "weight_fn"),
    ],
    "token_weight of the wrong shape, not floating point, negative or non-finite, or requiring grad (with grad "
    "mode on)": [
        (dict(token_weight=torch.ones(3)), ValueError, "token_weight"),
        (dict(token_weight=torch.ones(4, dtype=torch.long)), ValueError, "token_weight"),
        (dict(token_weight=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError, "token_weight"),
        (dict(token_weight=torch.tensor([1.0, math.nan, 1.0, 1.0])), ValueError, "token_weight"),
        (dict(token_weight=torch.ones(4, requires_grad=True)), ValueError, "token_weight"),
    ],
    "`inplace_backward=True` on logits that are an `nn.Parameter` or a view of one (with grad mode on)": [
        (dict(logits=torch.nn.Parameter(torch.randn(4, 5)), inplace_backward=True), ValueError, "inplace_backward"),
        (dict(logits=torch.nn.Parameter(torch.randn(2, 4, 5))[1], inplace_backward=True), ValueError,
         "inplace_backward"),
    ],
    "unknown `policy`, `reduction`, `normalize`, `fallback` or `backend`": [
        (dict(policy="soft"), ValueError, "policy='soft'.*choose one of 'none', 'hard', 'sigmoid'"),
        (dict(reduction="avg"), ValueError, "reduction='avg'.*choose one of"),
        (dict(normalize="all"), ValueError, "normalize='all'.*choose one of"),
        (dict(fallback="skip"), ValueError, "fallback='skip'.*choose one of"),
        (dict(backend="CPU"), ValueError, "backend='CPU'.*choose one of .*'cpu'"),
    ],
    "a backend that is not available here (e.g. `\"cuda\"` without the compiled extension)": [
        (dict(backend="unavailable"), RuntimeError, "backend="),
    ],
}


def _table():
    text = (ROOT / "docs/SPEC.md").read_text()
    table = text.split("## Bad input", 1)[1].split("\n\n")[2]
    rows = [line.split(" | ") for line in table.strip().splitlines()[2:]]
    return {cells[0].lstrip("| "): cells[1].rstrip(" |") for cells in rows}


def test_every_row_of_the_bad_input_table_has_cases():
    assert sorted(_table()) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_bad_input_table_row(row):
    allowed = {name for name in ("TypeError", "ValueError", "RuntimeError") if name in _table()[row]}
    raised = set()
    for kwargs, error, pattern in CASES[row]:
        kwargs = dict(kwargs)
        if kwargs.get("backend") == "unavailable":
            missing = [name for name in dispatch._MODULES if dispatch.availability(name) is not None]
            if not missing:
                continue  # every backend runs here (a GPU host with everything built)
            kwargs["backend"] = missing[0]
        logits, target = kwargs.pop("logits", _x()), kwargs.pop("target", _y())
        before = logits.detach().clone()
        with pytest.raises(error, match=pattern):
            memft_loss(logits, target, **kwargs)
        assert torch.equal(logits.detach(), before)  # nothing was computed into the logits
        raised.add(error.__name__)
        option_only = set(kwargs) - {"token_weight", "weight_fn", "inplace_backward"} and kwargs.get("backend") in (None, "CPU")
        if option_only and error is ValueError:  # options are checked at MemFTLoss's construction, and by the linear loss
            with pytest.raises(error, match=pattern):
                MemFTLoss(**kwargs)
            with pytest.raises(error, match=pattern):
                memft_linear_loss(torch.randn(4, 3), torch.randn(5, 3), _y(), **kwargs)
    assert raised <= allowed and (raised == allowed or "unavailable" in str(CASES[row]))
