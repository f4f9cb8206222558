"""The Parametric Memory Law toolkit: fit, predict, phase, sweep and their command lines.

Synthetic data come from the law itself with fixed-seed noise, so the true parameters are known.
"""
import json
import os

import numpy as np
import pytest

from memft_kernels.cli import main as memft_main
from memft_kernels.law import (
    LawInputError, SweepGrid, analyze_phase, fit_law, load_fit, load_results, load_token_stats,
    longest_length, phase_from_path, run_sweep, smallest_capacity,
)
from memft_kernels.law.fit import LawFit, law

TRUE = dict(C=0.8, alpha=0.5, beta=0.35, b=0.05)
RANKS = (1, 2, 4, 8, 16, 32)
LENGTHS = (64, 128, 256, 512, 1024)
PARAMS_PER_RANK = 384  # e.g. one down_proj of a hidden-128, mlp-256 model: r * (256 + 128)


def synthetic_cells(noise=0.02, seed=0, **true):
    true = {**TRUE, **true}
    rng = np.random.default_rng(seed)
    cells = []
    for r in RANKS:
        for length in LENGTHS:
            dl = float(law(r, length, **true)) * (1 + noise * rng.standard_normal())
            cells.append({"rank": r, "lora_params": r * PARAMS_PER_RANK, "length": length, "task": "random",
                          "loss": "ce", "seed": 0, "base_loss": 8.0, "final_loss": 8.0 - dl, "dL": dl,
                          "token_accuracy": 0.1, "recalled_frac": 0.0, "exact_recall": 0.0,
                          "steps_to_full_recall": None, "_line": len(cells) + 1})
    return cells


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "_line"}) + "\n")
    return path


# --- fit ---------------------------------------------------------------------------------------

def test_fit_exact_data_recovers_parameters():
    fit = fit_law(synthetic_cells(noise=0.0), n_boot=0)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)


def test_fit_noisy_data_within_tolerance_and_cis_cover_truth():
    # 2% multiplicative noise on 30 cells: exponents within 0.05, C within 25%, b within 0.03
    fit = fit_law(synthetic_cells(noise=0.02, seed=3), n_boot=200, seed=0)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.05
    assert abs(fit.beta - TRUE["beta"]) < 0.05
    assert abs(fit.C / TRUE["C"] - 1) < 0.25
    assert abs(fit.b - TRUE["b"]) < 0.03
    assert fit.r2 > 0.98
    assert fit.n_boot_used > 150
    for name, value in TRUE.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, lo, hi)
        assert lo <= getattr(fit, name) <= hi
    assert len(fit.residuals) == 30
    assert sum(r["residual"] ** 2 for r in fit.residuals) == pytest.approx(fit.rmse ** 2 * 30)


def test_fit_on_lora_params_rescales_only_c():
    cells = synthetic_cells(noise=0.0)
    by_rank = fit_law(cells, n_boot=0)
    by_params = fit_law(cells, capacity="lora_params", n_boot=0)
    assert by_params.alpha == pytest.approx(by_rank.alpha, rel=1e-5)
    assert by_params.C * PARAMS_PER_RANK ** by_params.alpha == pytest.approx(by_rank.C, rel=1e-5)
    assert by_params.params_per_rank == PARAMS_PER_RANK


def test_fit_without_offset():
    fit = fit_law(synthetic_cells(noise=0.0, b=0.0), fit_offset=False, n_boot=0)
    assert (fit.C, fit.alpha, fit.beta, fit.b) == pytest.approx((0.8, 0.5, 0.35, 0.0), rel=1e-5, abs=1e-8)


def test_saturated_cells_are_left_out():
    cells = synthetic_cells(noise=0.0)
    extra = [
        {**cells[0], "seed": 1, "dL": 7.9, "exact_recall": 1.0, "_line": 101},
        {**cells[1], "seed": 1, "dL": 5.0, "recalled_frac": 0.995, "_line": 102},
        {**cells[2], "seed": 1, "dL": 7.7, "_line": 103},  # dL >= 0.95 * base_loss (8.0)
    ]
    fit = fit_law(cells + extra, n_boot=0)
    assert sorted(fit.excluded_lines) == [101, 102, 103]
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=1e-5)
    assert fit_law(cells + extra, n_boot=0, keep_saturated=True).n_cells == len(cells) + 3


@pytest.mark.parametrize("mutate, message", [
    (lambda cells: cells[:4], "too few cells"),
    (lambda cells: [c for c in cells if c["rank"] == 4], "same capacity"),
    (lambda cells: [c for c in cells if c["length"] == 256], "same length"),
    (lambda cells: [dict(c, dL=-0.1) if c["_line"] == 7 else c for c in cells], "line 7: dL"),
    (lambda cells: [dict(c, loss="memft-ot") if c["_line"] == 2 else c for c in cells], "mix loss"),
])
def test_fit_refuses_degenerate_input(mutate, message):
    with pytest.raises(LawInputError, match=message):
        fit_law(mutate(synthetic_cells()), n_boot=0)


@pytest.mark.parametrize("line, message", [
    ('{"rank": 2, "length": 128, "base_loss": 8.0}', "line 3: missing field 'dL'"),
    ('{"rank": 0, "length": 128, "dL": 0.3, "base_loss": 8.0}', "line 3: field 'rank' must be positive"),
    ('{"rank": 2, "length": "long", "dL": 0.3, "base_loss": 8.0}', "line 3: field 'length' must be a finite number"),
    ('{"rank": 2, "length": 128, "dL": NaN, "base_loss": 8.0}', "line 3: field 'dL' must be a finite number"),
    ('{"rank": 2, "length": 128,', "line 3: not valid JSON"),
    ('[1, 2]', "line 3: expected a JSON object"),
    ('{"rank": 2, "length": 128, "dL": 0.3, "base_loss": 8.0, "exact_recall": 3}', "line 3: field 'exact_recall'"),
])
def test_results_file_errors_name_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "r.jsonl", synthetic_cells()[:2])
    with open(path, "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(LawInputError, match=message):
        load_results(path)


# --- predict ---------------------------------------------------------------------------------

def test_predict_inverts_fit():
    fit = fit_law(synthetic_cells(noise=0.01), n_boot=0)
    length = longest_length(fit, 4, 0.3)
    assert float(fit.predict(4, length)) == pytest.approx(0.3, rel=1e-9)
    rank = smallest_capacity(fit, 512, 0.3)
    assert float(fit.predict(rank, 512)) == pytest.approx(0.3, rel=1e-9)
    # monotone: more rank -> longer text for the same target
    assert longest_length(fit, 8, 0.3) > length


def test_predict_refuses_unreachable_targets():
    fit = LawFit(C=0.8, alpha=0.5, beta=0.35, b=0.05, r2=1.0, capacity="rank", fit_offset=True, n_cells=30, rmse=0.0)
    with pytest.raises(LawInputError, match="at or below the fit's floor"):
        longest_length(fit, 4, 0.05)
    with pytest.raises(LawInputError, match="at or below the fit's floor"):
        smallest_capacity(fit, 256, 0.01)
    with pytest.raises(LawInputError, match="positive"):
        longest_length(fit, 4, -1.0)
    flat = LawFit(**{**fit.to_json(), "beta": -0.1})
    with pytest.raises(LawInputError, match="no longest length"):
        longest_length(flat, 4, 0.3)


def test_fit_json_round_trip(tmp_path):
    fit = fit_law(synthetic_cells(), n_boot=20)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit.to_json()))
    again = load_fit(path)
    assert (again.C, again.alpha, again.beta, again.b, again.r2) == (fit.C, fit.alpha, fit.beta, fit.b, fit.r2)
    path.write_text(json.dumps({"C": 1.0, "alpha": 0.5, "beta": 0.3, "b": 0.0}))
    with pytest.raises(LawInputError, match="'r2'"):
        load_fit(path)


# --- phase -----------------------------------------------------------------------------------

def test_phase_table_on_hand_made_stats():
    prob = [0.001, 0.02, 0.3, 0.45, 0.5, 0.51, 0.7, 0.99, 1.0]
    correct = [False, False, True, False, True, True, True, True, True]
    report = analyze_phase(prob, correct, edges=(0, 0.25, 0.5, 0.75, 1.0))
    assert [(r["n"], r["n_correct"]) for r in report.rows] == [(2, 0), (3, 2), (2, 2), (2, 2)]
    assert report.n_above == 4 and report.n_violations == 0
    assert report.n_below == 5 and report.n_below_correct == 2  # p = 0.5 exactly is not above
    assert "all 4 tokens with p > 0.5 are predicted correctly" in report.verdict()
    assert "| (0.5, 0.75] | 2 | 2 | 100.0% |" in report.table()


def test_phase_reports_violations():
    report = analyze_phase([0.9, 0.6, 0.2], [True, False, False], edges=(0, 0.5, 1))
    assert report.n_violations == 1 and report.violations == [1]
    assert report.verdict().startswith("VIOLATION")


def test_phase_reads_files_and_run_folders(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random(50)
    target = rng.integers(0, 10, 50)
    pred = np.where(prob > 0.5, target, rng.integers(0, 10, 50))
    expected = analyze_phase(prob, pred == target)
    # one token per line, with pred and target
    with open(tmp_path / "a.jsonl", "w") as fh:
        for p, q, t in zip(prob, pred, target):
            fh.write(json.dumps({"prob": float(p), "pred": int(q), "target": int(t)}) + "\n")
    # one sample per line, with lists and "correct"
    with open(tmp_path / "b.jsonl", "w") as fh:
        for s in range(2):
            sl = slice(25 * s, 25 * (s + 1))
            fh.write(json.dumps({"prob": prob[sl].tolist(), "correct": (pred == target)[sl].tolist()}) + "\n")
    with open(tmp_path / "c.csv", "w") as fh:
        fh.write("prob,correct\n" + "".join(f"{p},{int(c)}\n" for p, c in zip(prob, pred == target)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.savez(run_dir / "tokens.npz", prob=prob.astype(np.float32), pred=pred, target=target)
    for path in ("a.jsonl", "b.jsonl", "c.csv", "run"):
        got = phase_from_path(tmp_path / path)
        assert got.rows == expected.rows if path != "run" else [r["n"] for r in got.rows] == [r["n"] for r in expected.rows]
        assert got.n_violations == 0


@pytest.mark.parametrize("content, message", [
    ('{"prob": 1.5, "correct": true}', "line 1: probability 1.5"),
    ('{"correct": true}', "line 1: missing field 'prob'"),
    ('{"prob": 0.2}', "line 1: needs 'correct'"),
    ('{"prob": [0.2, 0.3], "correct": [true]}', "line 1: 2 probabilities but 1"),
])
def test_phase_bad_stats(tmp_path, content, message):
    path = tmp_path / "s.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(LawInputError, match=message):
        load_token_stats(path)


@pytest.mark.parametrize("argv", [
    ["law", "fit", "{junk}.jsonl"],
    ["law", "predict", "{junk}.json", "--rank", "4", "--target-dL", "0.5"],
    ["phase", "{junk}.jsonl"],
    ["phase", "{junk}.csv"],
    ["phase", "{junk}.npz"],
    ["phase", "{junk}.safetensors"],
    ["phase", "{junk}.pt"],
])
def test_cli_damaged_file_is_one_line_exit_2(tmp_path, capsys, argv):
    """A binary or damaged file (not UTF-8, not the format its name says) is bad input, not a crash."""
    junk = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)) + b"\xff\xfe"
    for suffix in (".jsonl", ".json", ".csv", ".npz", ".safetensors", ".pt"):
        (tmp_path / ("junk" + suffix)).write_bytes(junk)
    argv = [a.format(junk=tmp_path / "junk") for a in argv]
    assert memft_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk" in err[0] and "Traceback" not in err[0], err


# --- sweep -----------------------------------------------------------------------------------

def fake_cell(cell, base, run_root):
    """Stand-in for train(): the law's value, and a marker file per call (counts across processes)."""
    os.makedirs(run_root, exist_ok=True)
    with open(os.path.join(run_root, f"calls-{os.getpid()}.txt"), "a") as fh:
        fh.write(json.dumps(cell, sort_keys=True) + "\n")
    dl = float(law(cell["rank"], cell["length"], **TRUE))
    return {"rank": cell["rank"], "lora_params": cell["rank"] * PARAMS_PER_RANK, "length": cell["length"],
            "task": cell["task"], "loss": cell["loss"], "seed": cell["seed"], "base_loss": 8.0,
            "final_loss": 8.0 - dl, "dL": dl, "token_accuracy": 0.2, "recalled_frac": 0.0,
            "exact_recall": 0.0, "steps_to_full_recall": None, "run_dir": run_root, "steps": base["steps"]}


def calls(run_root):
    lines = []
    for name in os.listdir(run_root):
        if name.startswith("calls-"):
            lines += open(os.path.join(run_root, name)).read().splitlines()
    return lines


def test_sweep_resumes_without_repeating_cells(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    grid = SweepGrid(ranks=[1, 2], lengths=[64, 128], losses=["ce", "memft-ot"], base={"steps": 5})
    first = run_sweep(grid, out, workers=0, run_root=root, run_cell=fake_cell, progress=False)
    assert first == {"ran": 8, "skipped": 0, "failed": []}
    again = run_sweep(grid, out, workers=0, run_root=root, run_cell=fake_cell, progress=False)
    assert again == {"ran": 0, "skipped": 8, "failed": []}
    bigger = SweepGrid(ranks=[1, 2, 4], lengths=[64, 128], losses=["ce", "memft-ot"], replace_rates=[0],
                       base={"steps": 5})  # replace_rate 0 is the 0.0 of the first run
    assert run_sweep(bigger, out, workers=0, run_root=root, run_cell=fake_cell, progress=False)["ran"] == 4
    assert len(calls(root)) == 12 and len(set(calls(root))) == 12
    records = load_results(out, required=("rank", "length", "dL", "base_loss", "lora_params"))
    assert len(records) == 12
    assert all(r["sweep"] == {"steps": 5} and "wall_s" in r and r["replace_rate"] == 0.0 for r in records)
    fit = fit_law(records, where={"loss": "ce", "replace_rate": 0}, n_boot=0)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=1e-5)
    with pytest.raises(LawInputError, match="other fixed settings \\(steps: 5 there, 6 now\\)"):
        run_sweep(SweepGrid(ranks=[1], lengths=[64], base={"steps": 6}), out, workers=0, run_root=root,
                  run_cell=fake_cell, progress=False)


def test_sweep_in_worker_processes(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    grid = SweepGrid(ranks=[1, 2, 4], lengths=[64], base={"steps": 5})
    summary = run_sweep(grid, out, workers=2, run_root=root, run_cell=fake_cell, progress=False)
    assert summary == {"ran": 3, "skipped": 0, "failed": []}
    assert len(calls(root)) == 3
    assert sorted(r["rank"] for r in load_results(out)) == [1, 2, 4]


def failing_cell(cell, base, run_root):
    if cell["rank"] == 2:
        raise RuntimeError("out of memory")
    return fake_cell(cell, base, run_root)


def test_sweep_failed_cell_is_retried_next_time(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    grid = SweepGrid(ranks=[1, 2], lengths=[64], base={"steps": 5})
    summary = run_sweep(grid, out, workers=0, run_root=root, run_cell=failing_cell, progress=False)
    assert summary["ran"] == 1 and summary["failed"][0]["error"] == "RuntimeError: out of memory"
    assert run_sweep(grid, out, workers=0, run_root=root, run_cell=fake_cell, progress=False)["ran"] == 1


def crashing_cell(cell, base, run_root):
    """Dies like a segfault the first time it runs rank 2 (a marker file remembers across processes)."""
    marker = os.path.join(run_root, "crashed-once")
    if cell["rank"] == 2 and not os.path.exists(marker):
        os.makedirs(run_root, exist_ok=True)
        open(marker, "w").close()
        os._exit(3)
    return fake_cell(cell, base, run_root)


def test_sweep_survives_a_dying_worker(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    grid = SweepGrid(ranks=[1, 2], lengths=[64], base={"steps": 5})
    summary = run_sweep(grid, out, workers=1, run_root=root, run_cell=crashing_cell, progress=False)
    assert summary["ran"] == 2 and summary["failed"] == []
    assert sorted(r["rank"] for r in load_results(out)) == [1, 2]


def test_sweep_with_the_real_training_loop(tmp_path):
    """Two tiny cells through train(): the keys the fit needs are there, and a re-run skips them."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    base = {"model": "nano", "vocab_size": 64, "steps": 3, "eval_every": 0, "plots": False,
            "save_adapter": False, "save_tokens": True, "backend": "torch", "threads": 1}
    grid = SweepGrid(ranks=[1, 2], lengths=[12], base=base)
    assert run_sweep(grid, out, workers=0, run_root=root, progress=False) == {"ran": 2, "skipped": 0, "failed": []}
    records = load_results(out, required=("rank", "length", "dL", "base_loss", "lora_params"))
    for r in records:
        for key in ("final_loss", "token_accuracy", "recalled_frac", "exact_recall", "steps_to_full_recall", "run_dir"):
            assert key in r, key
        assert r["lora_params"] > 0 and r["base_loss"] > 0
        assert os.path.isdir(r["run_dir"])
        assert phase_from_path(r["run_dir"]).n_tokens == 12
    params = {r["rank"]: r["lora_params"] for r in records}
    assert params[2] == 2 * params[1]
    assert run_sweep(grid, out, workers=0, run_root=root, progress=False)["skipped"] == 2


# --- command line ------------------------------------------------------------------------------

def test_cli_fit_and_predict(tmp_path, capsys):
    results = write_jsonl(tmp_path / "r.jsonl", synthetic_cells())
    fit_json, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert memft_main(["law", "fit", str(results), "--json", str(fit_json), "--png", str(png), "--bootstrap", "20"]) == 0
    data = json.loads(fit_json.read_text())
    assert {"C", "alpha", "beta", "b", "r2", "ci", "residuals"} <= set(data)
    assert png.stat().st_size > 1000
    capsys.readouterr()
    assert memft_main(["law", "predict", str(fit_json), "--rank", "4", "--target-dL", "0.3"]) == 0
    out = capsys.readouterr().out
    length = float(out.split(": ")[1].split(" tokens")[0])
    assert length == pytest.approx(longest_length(load_fit(fit_json), 4, 0.3), rel=1e-3)


def test_cli_phase(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"prob": float(p), "correct": bool(p > 0.3)}) + "\n" for p in np.linspace(0, 1, 21)))
    assert memft_main(["phase", str(path), "--bins", "4", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "all 10 tokens with p > 0.5 are predicted correctly" in out
    assert (tmp_path / "s_phase.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["law", "fit", "{missing}"], "no such file"),
    (["law", "fit", "{bad}"], "line 2: missing field 'dL'"),
    (["law", "fit", "{few}"], "too few cells"),
    (["law", "predict", "{fit}", "--rank", "4", "--target-dL", "0.001"], "at or below the fit's floor"),
    (["law", "predict", "{fit}", "--target-dL", "0.3"], "give --rank"),
    (["law", "predict", "{fit}", "--rank", "1", "--target-dL", "1000"], "no text of one token or more reaches"),
    (["phase", "{missing}"], "no such file or folder"),
    (["phase", "{run}"], "memft train writes tokens.npz with --save-tokens"),
    (["phase", "{bad}", "--png", "none"], "line 1: missing field 'prob'"),
    (["phase", "{stats}", "--bins", "3"], "even count"),
    (["law", "sweep", "--out", "{out}", "--ranks", "1,x", "--lengths", "64"], "--ranks"),
    (["law", "sweep", "--out", "{out}", "--ranks", "1", "--lengths", "64", "--set", "nonsense=1"], "unknown training option"),
    (["law", "sweep", "--out", "{out}", "--ranks", "1", "--lengths", "64,128", "--tasks", "random,phonebook"],
     "a phonebook has no length"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    cells = synthetic_cells()
    files = {
        "missing": tmp_path / "nope.jsonl",
        "bad": write_jsonl(tmp_path / "bad.jsonl", [cells[0], {"rank": 2, "length": 64, "base_loss": 8.0}]),
        "few": write_jsonl(tmp_path / "few.jsonl", cells[:3]),
        "fit": tmp_path / "fit.json",
        "stats": write_jsonl(tmp_path / "stats.jsonl", [{"prob": 0.7, "correct": True}]),
        "out": tmp_path / "sweep.jsonl",
        "run": tmp_path / "run",  # a run folder trained without --save-tokens
    }
    files["run"].mkdir()
    (files["run"] / "config.json").write_text("{}")
    files["fit"].write_text(json.dumps(fit_law(cells, n_boot=0).to_json()))
    argv = [a.format(**files) for a in argv]
    assert memft_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
