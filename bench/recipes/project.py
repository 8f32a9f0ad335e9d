"""This project's two recipes, `default` (`python training.py` with no recipe flags) and `original`
(`--recipe original`: lr 2.5e-5, at most 100 steps, batch 2 x accumulation 4, paged 8-bit AdamW,
LoRA incl. lm_head, padding to 512), timed through `python training.py` itself.

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

# The default; the same with peft's own LoRA layers instead of the fused ones; the same on the stock path
# (`--stock`: peft's layers, the library's norm and rotary embedding, the stock Trainer). "-again": a second
# measurement in the same call, for an A-B-B-A order (gpu_bench.py --in-order) against the host's drift.
VARIANTS = {"default": [], "default-peft": ["--lora-kernels", "peft"], "default-stock": ["--stock"]}
VARIANTS.update({f"{name}-again": VARIANTS[name] for name in ("default", "default-peft", "default-stock")})
# The original preset caps training at 100 optimizer steps; the cap is lifted so that the number of
# examples sets the number of steps (the timed runs stay far below 100 steps anyway).
ORIGINAL_FLAGS = ["--recipe", "original", "--max-steps", "0"]


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


def warm_up_once(opts, paths: Paths, left_s: float) -> dict | None:
    """One optimizer step of the default recipe, unless a training process already ran in this work folder."""
    marker = paths.work / "warmed-up.json"
    if marker.is_file():
        return None
    run = timed_run(opts, paths, "warm-up", min(32, opts.train_examples), ["--max-steps", "1"], left_s)
    summary = {"train_seconds": run["finished"]["train_seconds"], "wall_s": run["wall_s"]}
    write_json(marker, summary)
    return summary


def throughput(opts, paths: Paths, name: str, flags: list[str], base_count: int, left_s, epochs: int = 1) -> dict:
    """Samples and real tokens per second of training, from runs on N and 3N examples."""
    warm_up = warm_up_once(opts, paths, left_s())
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


def run_default(opts, paths, left_s, variant: str = "default") -> dict:
    # N and 3N distinct topics (93 and 279 of the 300): repeated examples would let length-grouped
    # batches pair each example with its own copies, with no padding, which real epochs do not get.
    # Three epochs, as training.py runs by default: one epoch of 186 more examples is only 6 more
    # steps, too few beside the run-to-run spread of the fixed costs.
    return throughput(opts, paths, variant, VARIANTS[variant], opts.train_examples // 3, left_s, epochs=3)


def run_original(opts, paths, device, left_s) -> dict:
    # Paged 8-bit AdamW needs CUDA; the CPU check of the code path trains with plain AdamW.
    flags = ORIGINAL_FLAGS if device == "cuda" else [*ORIGINAL_FLAGS, "--optimizer", "adamw"]
    # Every batch has the same shape (padded to 512), so few examples give a steady rate.
    return throughput(opts, paths, "original", flags, opts.original_examples, left_s)
