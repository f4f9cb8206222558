"""Cell functions for the sweep tests: stand-ins for train() that worker processes (local and Ray)
import by name. Each call appends a line to calls-<pid>.txt under the run root, so tests count the
calls made in every process."""
import json
import os
import signal
import time

TRUE = dict(C=0.8, alpha=0.5, beta=0.35, b=0.05)
PARAMS_PER_RANK = 384


def _mark(run_root, name, cell):
    os.makedirs(run_root, exist_ok=True)
    mark = {**cell, "device": os.environ.get("CUDA_VISIBLE_DEVICES"), "device_at_exec": _exec_env("CUDA_VISIBLE_DEVICES")}
    with open(os.path.join(run_root, f"{name}-{os.getpid()}.txt"), "a") as fh:
        fh.write(json.dumps(mark, sort_keys=True) + "\n")


def calls(run_root, name="calls"):
    lines = []
    if os.path.isdir(run_root):
        for entry in sorted(os.listdir(run_root)):
            if entry.startswith(name + "-"):
                with open(os.path.join(run_root, entry)) as fh:
                    lines += fh.read().splitlines()
    return lines


def fake_cell(cell, base, run_root):
    """The law's value for the cell, with the keys train() reports."""
    _mark(run_root, "calls", cell)
    dl = TRUE["C"] * cell["rank"] ** TRUE["alpha"] * cell["length"] ** -TRUE["beta"] + TRUE["b"]
    return {"rank": cell["rank"], "lora_params": cell["rank"] * PARAMS_PER_RANK, "length": cell["length"],
            "task": cell["task"], "loss": cell["loss"], "seed": cell["seed"], "base_loss": 8.0,
            "final_loss": 8.0 - dl, "dL": dl, "token_accuracy": 0.2, "recalled_frac": 0.0,
            "exact_recall": 0.0, "steps_to_full_recall": None, "steps": base.get("steps"),
            "device": os.environ.get("CUDA_VISIBLE_DEVICES"), "device_at_exec": _exec_env("CUDA_VISIBLE_DEVICES")}


def _exec_env(name):
    """The variable as this process's environment held it when the program started (Linux)."""
    try:
        with open("/proc/self/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                key, _, value = item.partition(b"=")
                if key.decode() == name:
                    return value.decode()
    except OSError:
        pass
    return None


def sleepy_cell(cell, base, run_root):
    """Writes its pid to started-<pid>.txt, then sleeps for base["sleep"] seconds (a long cell)."""
    _mark(run_root, "started", cell)
    time.sleep(base.get("sleep", 60))
    return fake_cell(cell, base, run_root)


def killed_once_cell(cell, base, run_root):
    """SIGKILLs its own worker process the first time it runs rank 2 (a marker file remembers)."""
    marker = os.path.join(run_root, "killed-once")
    if cell["rank"] == 2 and not os.path.exists(marker):
        os.makedirs(run_root, exist_ok=True)
        open(marker, "w").close()
        _mark(run_root, "calls", cell)
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_cell(cell, base, run_root)


def always_failing_cell(cell, base, run_root):
    """Raises for rank 2, every time."""
    if cell["rank"] == 2:
        _mark(run_root, "calls", cell)
        raise RuntimeError("CUDA out of memory (simulated)")
    return fake_cell(cell, base, run_root)


def bad_input_cell(cell, base, run_root):
    """Raises a bad-input error for rank 2 (not worth a retry)."""
    if cell["rank"] == 2:
        _mark(run_root, "calls", cell)
        from memft_kernels.train import TrainInputError

        raise TrainInputError("length is longer than the model's context (simulated)")
    return fake_cell(cell, base, run_root)


def slow_big_cell(cell, base, run_root):
    """Sleeps base["sleep"] seconds for ranks >= 4 (after writing started-<pid>.txt); quick otherwise."""
    if cell["rank"] >= 4:
        _mark(run_root, "started", cell)
        time.sleep(base.get("sleep", 60))
    return fake_cell(cell, base, run_root)
