"""Every flag of `memft law sweep|fit|predict` and `memft phase`, fed bad values: exit 2, one line on
stderr naming the problem, no traceback, and nothing run."""
import json

import numpy as np
import pytest

from memft_kernels.cli import main as memft_main
from memft_kernels.law import fit_law

SWEEP = ["law", "sweep", "--out", "{dir}/s.jsonl", "--ranks", "1,2", "--lengths", "64", "--model", "nano"]


def rows():
    out = []
    for r in (1, 2, 4, 8):
        for length in (64, 128, 256):
            dl = 0.8 * r ** 0.5 * length ** -0.35 * (1 + 0.03 * np.sin(r * length)) + 0.05
            out.append({"rank": r, "length": length, "task": "random", "replace_rate": 0.0, "loss": "ce",
                        "seed": 0, "dL": dl, "base_loss": 8.0, "lora_params": 100 * r})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("law_cli")
    results = d / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    fit = d / "fit.json"
    fit.write_text(json.dumps(fit_law(rows(), n_boot=0).to_json()))
    stats = d / "stats.jsonl"
    stats.write_text("".join(json.dumps({"prob": float(p), "correct": bool(p > 0.4)}) + "\n" for p in np.linspace(0, 1, 11)))
    (d / "a_file").write_text("x")
    (d / "bad_correct.csv").write_text("prob,correct\n0.7,1\n0.2,x\n")
    return {"dir": str(d), "results": str(results), "fit": str(fit), "stats": str(stats), "file": str(d / "a_file")}


BAD = [
    # memft law sweep: every flag
    (SWEEP[:2] + ["--ranks", "1"], "required: --out"),
    (SWEEP[:4] + ["--ranks", "1", "--lengths", "64"] + ["--out", "{file}/x.jsonl"], "--out"),
    (SWEEP[:2] + ["--out", "{dir}", "--ranks", "1", "--lengths", "64"], "not a file"),
    (SWEEP + ["--ranks", "1,x"], "--ranks"),
    (SWEEP + ["--ranks", "0"], "ranks must be positive"),
    (SWEEP + ["--ranks", ","], "--ranks: expected a comma-separated list"),
    (SWEEP + ["--lengths", "-64"], "lengths must be positive"),
    (SWEEP + ["--lengths", "1.5"], "--lengths"),
    (SWEEP + ["--tasks", "bogus"], "task='bogus' is not supported"),
    (SWEEP + ["--replace-rates", "abc"], "--replace-rates"),
    (SWEEP + ["--replace-rates", "2"], "replace rates must be numbers in [0, 1]"),
    (SWEEP + ["--losses", "mse"], "loss='mse' is not supported"),
    (SWEEP + ["--seeds", "x"], "--seeds"),
    (SWEEP + ["--seeds", "-1"], "seeds must be integers >= 0"),
    (SWEEP + ["--steps", "0"], "steps=0 must be > 0"),
    (SWEEP + ["--steps", "many"], "argument --steps: invalid int value"),
    (SWEEP + ["--model", "/nonexistent"], "neither a built-in model"),
    (SWEEP + ["--model", "{dir}"], "has no config.json"),
    (SWEEP + ["--set", "lr"], "--set: expected KEY=VALUE"),
    (SWEEP + ["--set", "nonsense=1"], "unknown training option 'nonsense'"),
    (SWEEP + ["--set", "lr=abc"], "expected float"),
    (SWEEP + ["--set", "lr=-1"], "lr=-1 must be > 0"),
    (SWEEP + ["--set", "backend=bogus"], "backend='bogus' is not supported"),
    (SWEEP + ["--set", "rank=4"], "'rank' is a grid parameter"),
    (SWEEP + ["--set", "target_modules=[1]"], "expected List[str]"),
    (SWEEP + ["--set", "vocab_size=2"], "vocab_size=2 must be >= 3"),  # every cell failed in random
    (SWEEP + ["--set", "recipe=paper-phonebook"], "a recipe is not applied by the sweep"),  # ran, recipe unused
    (SWEEP + ["--set", "fsdp=true"], "--fsdp needs torchrun"),  # every cell failed after the sweep started
    (SWEEP + ["--set", "model=tiny"], "--model nano and --set model=tiny contradict"),  # --model won silently
    (SWEEP + ["--steps", "3", "--set", "steps=5"], "--steps 3 and --set steps=5 contradict"),
    (SWEEP + ["--threads-per-worker", "-1"], "--threads-per-worker must be >= 0"),
    (SWEEP + ["--run-root", "{file}"], "cannot make the run folder root"),
    (SWEEP + ["--retries", "-1"], "--retries must be an integer >= 0"),
    (SWEEP + ["--retries", "x"], "argument --retries: invalid int value"),
    (SWEEP + ["--engine", "spark"], "argument --engine: invalid choice"),
    (SWEEP + ["--workers", "-1"], "--workers must be an integer >= 0"),
    (SWEEP + ["--workers", "two"], "argument --workers: invalid int value"),
    (SWEEP + ["--gpus", "0,a"], "--gpus: expected device numbers"),
    (SWEEP + ["--gpus", "0,0"], "listed twice"),
    (SWEEP + ["--gpus", "0", "--workers", "0"], "--gpus pins worker processes"),
    (SWEEP + ["--address", "auto"], "--address is an option of the ray engine"),
    (SWEEP + ["--gpus-per-cell", "1"], "--gpus-per-cell is an option of the ray engine"),
    (SWEEP + ["--cpus-per-cell", "1"], "--cpus-per-cell is an option of the ray engine"),
    (SWEEP + ["--max-in-flight", "4"], "--max-in-flight is an option of the ray engine"),
    (SWEEP + ["--engine", "ray", "--gpus-per-cell", "-1"], "--gpus-per-cell must be a number >= 0"),
    (SWEEP + ["--engine", "ray", "--cpus-per-cell", "nan"], "--cpus-per-cell must be a number >= 0"),
    (SWEEP + ["--engine", "ray", "--max-in-flight", "0"], "--max-in-flight must be an integer >= 1"),
    (SWEEP + ["--engine", "ray", "--workers", "2"], "--workers is an option of the local engine"),
    (SWEEP + ["--engine", "ray", "--gpus", "0"], "--gpus is an option of the local engine"),
    # memft law fit
    (["law", "fit", "{dir}/missing.jsonl"], "no such file"),
    (["law", "fit", "{results}", "--capacity", "bytes"], "argument --capacity: invalid choice"),
    (["law", "fit", "{results}", "--where", "loss"], "--where: expected KEY=VALUE"),
    (["law", "fit", "{results}", "--where", "loss=mse"], "no cell matches loss=mse"),
    (["law", "fit", "{results}", "--bootstrap", "-5"], "--bootstrap must be >= 0"),
    (["law", "fit", "{results}", "--bootstrap", "lots"], "argument --bootstrap: invalid int value"),
    (["law", "fit", "{results}", "--ci", "1.5"], "--ci must be in (0, 1)"),
    (["law", "fit", "{results}", "--ci", "nan"], "--ci must be in (0, 1)"),
    (["law", "fit", "{results}", "--seed", "-1"], "--seed must be >= 0"),
    (["law", "fit", "{results}", "--bootstrap", "0", "--json", "{file}/fit.json", "--png", "none"], "cannot write the fit"),
    (["law", "fit", "{results}", "--bootstrap", "0", "--png", "{file}/fit.png"], "cannot write the plot"),
    (["law", "fit", "{results}", "--bootstrap", "0", "--png", "{dir}/fit.bogus"], "cannot write the plot"),
    (["law", "fit", "{results}", "--no-offset", "--keep-saturated", "--where", "rank=1"], "too few cells"),
    # memft law predict
    (["law", "predict", "{dir}/missing.json", "--rank", "4", "--target-dL", "0.3"], "no such file"),
    (["law", "predict", "{fit}", "--rank", "4", "--target-dL", "x"], "argument --target-dL: invalid float value"),
    (["law", "predict", "{fit}", "--rank", "4", "--target-dL", "-1"], "--target-dL must be a finite positive number"),
    (["law", "predict", "{fit}", "--rank", "4", "--target-dL", "inf"], "--target-dL must be a finite positive number"),
    (["law", "predict", "{fit}", "--rank", "0", "--target-dL", "0.3"], "--rank must be a finite positive number"),
    (["law", "predict", "{fit}", "--rank", "inf", "--target-dL", "0.3"], "--rank must be a finite positive number"),
    (["law", "predict", "{fit}", "--params", "400", "--target-dL", "0.3"], "--params needs a fit made with"),
    (["law", "predict", "{fit}", "--params", "nan", "--target-dL", "0.3"], "--params must be a finite positive number"),
    (["law", "predict", "{fit}", "--length", "-3", "--target-dL", "0.3"], "--length must be a finite positive number"),
    (["law", "predict", "{fit}", "--rank", "1e300", "--target-dL", "0.06"], "beyond floating point range"),
    (["law", "predict", "{fit}", "--target-dL", "0.3"], "give --rank"),
    # memft phase
    (["phase", "{dir}/missing.jsonl"], "no such file or folder"),
    (["phase", "{stats}", "--bins", "3"], "even count"),
    (["phase", "{stats}", "--bins", "x"], "--bins: expected a count"),
    (["phase", "{stats}", "--bins", "0.2,0.1"], "bin edges must rise"),
    (["phase", "{stats}", "--bins", "0,0.3,1"], "must include 0.5 (the phase threshold), got [0.0, 0.3, 1.0]"),
    (["phase", "{stats}", "--png", "{file}/p.png"], "cannot write the plot"),
    (["phase", "{stats}", "--png", "none", "--json", "{file}/p.json"], "cannot write the table"),
    (["phase", "{dir}/bad_correct.csv", "--png", "none"], "line 3: a value is not a number"),  # read as False
    # memft law
    (["law"], "required: law_command"),
    (["law", "bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[1:] if a[0] == "law" else a)[:60] for a, _ in BAD])
def test_bad_value_is_one_line_exit_2(files, capsys, argv, message):
    argv = [a.format(**files) for a in argv]
    try:
        code = memft_main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0] and message in err[0], err
    assert err[0].startswith("memft ")
    assert not list(__import__("pathlib").Path(files["dir"]).glob("s_runs/*/*")), "a cell ran"


def test_engine_ray_without_ray_says_how_to_install_it(files, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    argv = [a.format(**files) for a in SWEEP] + ["--engine", "ray"]
    assert memft_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and 'pip install "memft_kernels[cluster]"' in err[0], err


def test_phase_csv_reads_correct_written_as_float_or_words(tmp_path, capsys):
    """A float 'correct' column ("1.0", as pandas writes one) used to read as False: a token with
    p > 0.5 predicted right was reported as a violation (exit 1)."""
    path = tmp_path / "stats.csv"
    path.write_text("prob,correct\n0.9,1.0\n0.7,True\n0.6,yes\n0.3,0.0\n0.2,false\n0.45,1\n")
    assert memft_main(["phase", str(path), "--png", "none"]) == 0
    out = capsys.readouterr().out
    assert "all 3 tokens with p > 0.5 are predicted correctly" in out and "1 of 3 tokens with p <= 0.5" in out, out
