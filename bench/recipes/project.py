"""Training throughput of the project's own recipes, measured through `python training.py`.

A run has fixed costs that are not training (start-up, model load, first steps, the eval pass and
checkpoint save of each epoch). Two runs that differ only in the number of training examples (N and
3N, the same eval set, the same epochs) have the same fixed costs, so the extra examples over the extra
time is the training rate, with no access to the script's insides.

The first training process on a fresh machine pays one-time costs that later processes do not (its
first step and eval took seconds longer), which would fall on the N run alone: a short warm-up run
goes first, once per work folder.
"""

from __future__ import annotations

from bench.gpu_build import write_split_file
from bench.gpu_common import Paths, logged_rate, python_command, run_logged, write_json
from qexpand import rundir, runcheck


def timed_run(opts, paths: Paths, name: str, train_count: int, flags: list[str], left_s: float,
              epochs: int = 1) -> dict:
    """One `training.py` run on the first `train_count` examples; its finished.json and token count."""
    split, tokens = write_split_file(paths, f"{name}-{train_count}", train_count, opts.seed)
    run_name = f"{name}-{train_count}"
    command = python_command("training.py", "--model", paths.model, "--split-file", split, "--epochs", str(epochs),
                             "--output-dir", paths.runs, "--run-name", run_name, "--overwrite", *flags)
    result = run_logged(command, paths, f"train-{run_name}", left_s)
    if "error" in result:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result['log_tail']}")
    finished = rundir.read_run_file(paths.runs / run_name, rundir.FINISHED_FILE)
    config = runcheck.read_record(paths.runs / run_name).config
    return {"examples": train_count, "tokens": tokens, "wall_s": result["wall_s"], "finished": finished,
            "config": config, "logged": logged_rate(paths.runs / run_name, train_count * epochs,
                                                    finished["global_steps"])}


def compiles(flags) -> bool:
    """Whether these training.py flags turn compiled blocks on."""
    flags = list(flags)
    return "--compile" in flags and flags[flags.index("--compile") + 1:][:1] == ["on"]


def warm_up_once(opts, paths: Paths, left_s: float, flags: tuple[str, ...] = ()) -> dict | None:
    """One optimizer step of the default recipe, unless a training process already ran in this work folder.

    With compiled blocks (--compile on) a second warm-up runs with those flags: it fills the compile
    caches on disk, so the N and 3N runs after it pay the same (warm) compilation."""
    compiled = compiles(flags)
    marker = paths.work / ("warmed-up-compiled.json" if compiled else "warmed-up.json")
    if marker.is_file():
        return None
    run = timed_run(opts, paths, "warm-up-compiled" if compiled else "warm-up", min(32, opts.train_examples),
                    [*(flags if compiled else ()), "--max-steps", "1"], left_s)
    summary = {"train_seconds": run["finished"]["train_seconds"], "wall_s": run["wall_s"]}
    write_json(marker, summary)
    return summary


def throughput(opts, paths: Paths, name: str, flags: list[str], base_count: int, left_s, epochs: int = 1) -> dict:
    """Samples and real tokens per second of training, from runs on N and 3N examples."""
    warm_up = warm_up_once(opts, paths, left_s())
    if compiles(flags):
        warm_up = {"plain": warm_up, "compiled": warm_up_once(opts, paths, left_s(), tuple(flags))}
    small = timed_run(opts, paths, name, base_count, flags, left_s(), epochs)
    large = timed_run(opts, paths, name, 3 * base_count, flags, left_s(), epochs)
    seconds = large["finished"]["train_seconds"] - small["finished"]["train_seconds"]
    if seconds <= 0:
        raise RuntimeError(f"the run on {3 * base_count} examples was not slower than the one on {base_count} "
                           f"({seconds:.2f} s): too few examples to see the training rate")
    settled = large["config"]  # the run's TrainConfig with every default decided
    extra = 2 * base_count * epochs
    return {
        "method": f"training.py on {base_count} and {3 * base_count} examples, {epochs} epoch(s) each; "
                  "rates from the difference",
        "flags": flags, "epochs": epochs, "warm_up": warm_up, "samples_per_s": round(extra / seconds, 2),
        "real_tokens_per_s": round((large["tokens"] - small["tokens"]) * epochs / seconds, 1),
        "seconds": round(seconds, 2), "peak_gb": large["finished"].get("peak_gpu_memory_gb"),
        "checkpointing": settled.gradient_checkpointing == "on",
        "batch_size": settled.batch_size, "grad_accum": settled.grad_accum, "optimizer": settled.optimizer,
        "best_eval_loss": large["finished"].get("best_eval_loss"),
        # A second reading of the rate, from the step times in the larger run's loss log.
        "logged": large["logged"],
        "runs": {str(r["examples"]): {"train_seconds": r["finished"]["train_seconds"], "wall_s": r["wall_s"],
                                      "global_steps": r["finished"].get("global_steps"),
                                      "model_load_s": r["finished"].get("model_load_seconds")}
                 for r in (small, large)},
    }
