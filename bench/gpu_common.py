"""What every stage of the GPU benchmark shares: the work folder's layout, device timing, peak
memory, the step timer for trainers, model FLOP utilisation, running a project script."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

from qexpand import data, rundir
from qexpand.rundir import atomic_write_json, read_json

REPO = Path(__file__).resolve().parent.parent
# Web 2009 + Robust04 of the offline topic sets: the 300 topics the recorded token counts and the
# earlier results are of.
OFFLINE_DATASETS = data.OFFLINE_DATASETS[:2]
H100_SXM_BF16_DENSE_TFLOPS = 989.0
MODEL_META = "bench_meta.json"  # written last into the model folder: the folder is complete


class Paths:
    """Where everything lives under --work-dir."""

    def __init__(self, opts):
        self.work = Path(opts.work_dir)
        self.model = self.work / ("model-tiny" if opts.tiny else "model-mistral-7b")
        self.data = self.work / "data.json"
        self.options = self.work / "options.json"
        self.results = self.work / "stage-results"
        self.logs = self.work / "logs"
        self.adapter = self.work / "adapter"
        self.sbert = self.work / "sbert-tiny"
        self.irds = self.work / "irds"
        self.runs = self.work / "runs"
        self.trainer_out = self.work / "trainer-out"


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_gb(device: str, peak: bool) -> float | None:
    if device != "cuda":
        return None
    import torch

    value = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    return round(value / 1024**3, 2)


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def timed(function, device: str):
    """(result, seconds) of function(), GPU work included."""
    sync(device)
    started = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - started


def write_json(path: Path, payload) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), payload)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_without_hub(paths: Paths) -> dict:
    """Subprocess environment: no hub access, the copied topic files, unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "IR_DATASETS_HOME": str(paths.irds)}


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(text[-lines:])


def run_logged(command: list[str], paths: Paths, log_name: str, timeout: float, cwd: Path | None = None) -> dict:
    """A command with its output in logs/<log_name>.log; exit code, wall seconds, the log's end on failure."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_file = paths.logs / f"{log_name}.log"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                  env=environment_without_hub(paths), cwd=str(cwd or paths.work)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"exit": code, "wall_s": round(time.perf_counter() - started, 2)}
    if code != 0:
        result.update(error=f"{Path(command[1]).name if len(command) > 1 else command[0]} exit {code}",
                      log_tail=log_tail(log_file))
    return result


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


# ----------------------------------------------------------------------------------------------
# Timing a trainer of the peer libraries over a window of optimizer steps
# ----------------------------------------------------------------------------------------------

class CountingCollator:
    """Wraps a data collator and records (examples, real tokens, padded tokens) of every batch.

    Batches are consumed in the order they are collated, so batch i belongs to optimizer step
    i // grad_accum + 1 even though the data loader fetches one batch ahead.
    """

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # A padding-free collator puts all examples in one row and gives no mask: every token is real.
        real = int(mask.sum()) if mask is not None else ids.numel()
        self.batches.append((len(features), real, int(ids.numel())))
        return batch


def step_timer(device: str):
    """A TrainerCallback that records the wall-clock time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())

    return StepTimer()


def measure_trainer(trainer, collator: CountingCollator, timer, warmup: int, steps: int, grad_accum: int) -> dict:
    """Train warmup + steps optimizer steps; rates over the last `steps` steps only."""
    train_result, train_s = timed(trainer.train, trainer.args.device.type)
    if len(timer.ends) < warmup + steps:
        raise RuntimeError(f"only {len(timer.ends)} optimizer steps ran, {warmup + steps} needed")
    seconds = timer.ends[warmup + steps - 1] - timer.ends[warmup - 1]
    window = collator.batches[warmup * grad_accum:(warmup + steps) * grad_accum]
    samples, real, padded = (sum(b[i] for b in window) for i in range(3))
    return {
        "method": f"{steps} optimizer steps timed after {warmup} warm-up steps", "seconds": round(seconds, 3),
        "samples": samples, "real_tokens": real, "padded_tokens": padded,
        "samples_per_s": round(samples / seconds, 2), "real_tokens_per_s": round(real / seconds, 1),
        "padding_share": round(1 - real / padded, 3), "train_call_s": round(train_s, 2),
        "train_loss": train_result.training_loss, "step_s": [round(b - a, 3) for a, b in zip(timer.ends, timer.ends[1:])],
    }


def logged_step_seconds(run_dir: Path, skip: int = 3) -> list[float]:
    """How long each optimizer step of a training.py run took, read off its loss log (every entry
    carries the seconds since training began): the time from one step's entry to the next step's,
    for steps after the first `skip` and not right after an eval pass or checkpoint save."""
    log = read_json(Path(run_dir) / rundir.LOSS_LOG_FILE)
    seconds = []
    for before, after in zip(log, log[1:]):
        if "loss" in before and "loss" in after and after["step"] == before["step"] + 1 and after["step"] > skip:
            seconds.append(after["elapsed_s"] - before["elapsed_s"])
    return seconds


def logged_rate(run_dir: Path, examples: int, steps: int) -> dict | None:
    """Mean optimizer step time of a finished training.py run, and the samples per second it gives
    (samples per step averaged over the run, the shorter last batch of each epoch included); None for
    a run too short to have steady steps (a one-step warm-up)."""
    seconds = logged_step_seconds(run_dir)
    if not seconds:
        return None
    mean = sum(seconds) / len(seconds)
    return {"steps_read": len(seconds), "mean_step_s": round(mean, 4),
            "samples_per_s": round(examples / steps / mean, 2)}


def mfu(result: dict, n_params: int, peak_tflops: float) -> dict:
    """Model FLOP utilisation on real tokens: LoRA costs ~4N FLOPs a token (forward 2N, input
    gradients 2N, no weight gradients for the frozen base), ~6N with activation recomputation."""
    k = 6 if result["checkpointing"] else 4
    value = k * n_params * result["real_tokens_per_s"] / (peak_tflops * 1e12)
    return {"k": k, "n_params": n_params, "peak_tflops": peak_tflops, "mfu": round(value, 4)}


def model_params(paths: Paths) -> int:
    return read_json(paths.model / MODEL_META)["n_params"]
