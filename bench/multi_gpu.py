"""Data-parallel scaling of training.py: one GPU against several, on the 7B Mistral architecture.

Run on a machine with 2 GPUs (the random 7B folder is built by gpu_bench.py's build stage first):

    python bench/multi_gpu.py --tokenizer TOKENIZER_DIR --topics-home IRDS_DIR --repeat 10 --abba 10 \
        --out bench/results/multi_gpu.json

The real training.py runs under `accelerate launch --num_processes N` (N = 1 and --gpus), default
recipe (batch 32 per GPU, recomputation), 3 epochs with the eval pass and checkpoint save of each
epoch, on the 280 training examples repeated --repeat times (each copy a distinct record), after a
one-step warm-up run, so that no timed run pays the first process's one-time costs.

The runs go in the order 1 GPU, N GPUs (both on --repeat copies), N GPUs, 1 GPU (on --abba copies).
Each run's rate per optimizer step is read off its own loss log (training.py stamps every step), and
pooling the two pairs cancels a steady drift of the host's speed during the call, which a sequential
order puts on one side only. End to end (training time, fixed costs included) is reported per pair
and pooled as well.

With --length-grouping nothing is trained: how much longer the slowest process's batch of a step is
with N processes than with one (padded tokens), computed from the real token counts, for the batches
training.py gives several processes and for the length-grouped batches dealt out in turn as before.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import gpu_bench  # noqa: E402
from bench.gpu_build import topic_order, write_split_file  # noqa: E402
from bench.gpu_common import Paths, environment_without_hub, logged_rate, logged_step_seconds, write_json  # noqa: E402
from bench.recipes.project import warm_up_once  # noqa: E402
from qexpand import rundir  # noqa: E402
from qexpand.accel import batches  # noqa: E402
from qexpand.recipes import RECIPES  # noqa: E402

EXAMPLES = 280


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.model (see gpu_bench.py)")
    parser.add_argument("--topics-home", default=None, help="folder with the TREC topic files (ir_datasets layout)")
    parser.add_argument("--work-dir", default=None, help="gpu_bench.py's work folder (model reused)")
    parser.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the data-parallel run")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the training examples in the first pair")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every run")
    parser.add_argument("--abba", type=int, default=None, metavar="COPIES",
                        help="copies of the training examples in the second pair (default: --repeat)")
    parser.add_argument("--length-grouping", action="store_true",
                        help="no training: the slowest process's padded tokens per step with N processes against "
                             "one, for the topics repeated 1, 3, 6, 10 and --repeat times; with --tiny no GPU")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (gloo): checks the code path")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "multi_gpu.json"), help="result JSON")
    return parser


def bench_options(args) -> argparse.Namespace:
    """gpu_bench's options for the build stage, which writes the model folder and the example order."""
    argv = ["--stages", ""]
    for flag, value in (("--tokenizer", args.tokenizer), ("--topics-home", args.topics_home),
                        ("--work-dir", args.work_dir)):
        argv += [flag, value] if value else []
    argv += ["--tiny"] * args.tiny
    opts = gpu_bench.resolve_options(gpu_bench.build_parser().parse_args(argv))
    opts.out = str(Path(opts.work_dir) / "build-for-multi-gpu.json")
    return opts


def launch(paths: Paths, opts, processes: int, copies: int, epochs: int, name: str, gpus: str):
    """Start `accelerate launch training.py` on `copies` x the examples, seeing only the GPUs `gpus`."""
    split, tokens = write_split_file(paths, name, EXAMPLES * copies, opts.seed)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--multi_gpu"] * (processes > 1)
    command += [str(REPO / "training.py"), "--model", str(paths.model), "--split-file", str(split),
                "--epochs", str(epochs), "--output-dir", str(paths.runs), "--run-name", name, "--overwrite"]
    env = environment_without_hub(paths)
    if not opts.tiny:
        # One GPU per process: with more GPUs visible, one process would spread each batch over all
        # of them (the Trainer's DataParallel) and the 1-GPU baseline would not be one GPU.
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return subprocess.Popen(command, env=env, cwd=str(paths.work)), tokens


def finished_run(paths: Paths, name: str, copies: int, epochs: int, tokens: int, wall: float) -> dict:
    finished = rundir.read_run_file(paths.runs / name, rundir.FINISHED_FILE)
    examples = EXAMPLES * copies * epochs
    return {"examples": examples, "tokens": tokens * epochs, "wall_s": round(wall, 1),
            "train_seconds": finished["train_seconds"], "global_steps": finished["global_steps"],
            "peak_gb": finished.get("peak_gpu_memory_gb"), "best_eval_loss": finished.get("best_eval_loss"),
            "logged": logged_rate(paths.runs / name, examples, finished["global_steps"]),
            "mean_step_s_by_third": by_third(logged_step_seconds(paths.runs / name))}


def by_third(seconds: list[float]) -> list[float]:
    """Mean step time of the first, middle and last third of a run's steady steps: a host that slows
    down or speeds up during one run shows here, which the run's mean hides."""
    third = len(seconds) // 3
    if not third:
        return []
    parts = (seconds[:third], seconds[third:len(seconds) - third], seconds[len(seconds) - third:])
    return [round(sum(part) / len(part), 4) for part in parts]


def train(paths: Paths, opts, processes: int, copies: int, epochs: int, suffix: str = "") -> dict:
    name = f"gpus{processes}-x{copies}{suffix}"
    started = time.perf_counter()
    process, tokens = launch(paths, opts, processes, copies, epochs, name, ",".join(map(str, range(processes))))
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return finished_run(paths, name, copies, epochs, tokens, time.perf_counter() - started)


def abba_scaling(args, paths: Paths, opts) -> dict:
    """1 GPU, N GPUs, N GPUs, 1 GPU; per-step rates from each run's logged step times, and end to end
    (training time, fixed costs included), each per pair and pooled."""
    result = {"gpus": [1, args.gpus], "epochs": args.epochs, "order": "a1 b1 b2 a2", "runs": {}}
    result["warm_up"] = warm_up_once(opts, paths, 900)
    second = args.abba or args.repeat
    for label, processes, copies in (("a1", 1, args.repeat), ("b1", args.gpus, args.repeat),
                                     ("b2", args.gpus, second), ("a2", 1, second)):
        run = train(paths, opts, processes, copies, args.epochs, suffix=f"-{label}")
        # Training time outside the steady steps: the first steps, the eval passes and checkpoint saves.
        run["fixed_share"] = round(1 - run["global_steps"] * run["logged"]["mean_step_s"] / run["train_seconds"], 3)
        result["runs"][label] = run
        write_json(Path(args.out), result)  # kept if a later run does not finish in time
    rate = {label: run["logged"]["samples_per_s"] for label, run in result["runs"].items()}
    result["speedup_per_step"] = {"first_pair": round(rate["b1"] / rate["a1"], 3),
                                  "second_pair": round(rate["b2"] / rate["a2"], 3),
                                  "pooled": round((rate["b1"] + rate["b2"]) / (rate["a1"] + rate["a2"]), 3)}
    result["drift"] = {"one_gpu": round(rate["a2"] / rate["a1"], 3), "several_gpus": round(rate["b2"] / rate["b1"], 3)}
    runs = result["runs"]
    result["speedup_end_to_end"] = {
        "first_pair": end_to_end_speedup([runs["a1"]], [runs["b1"]]),
        "second_pair": end_to_end_speedup([runs["a2"]], [runs["b2"]]),
        "pooled": end_to_end_speedup([runs["a1"], runs["a2"]], [runs["b1"], runs["b2"]])}
    return result


def end_to_end_speedup(one_gpu: list[dict], several_gpus: list[dict]) -> float:
    """Samples per second of training time (fixed costs included) of the several-GPU runs over the
    1-GPU runs; with two runs a side, their samples over their summed training time."""
    def rate(runs):
        return sum(run["examples"] for run in runs) / sum(run["train_seconds"] for run in runs)
    return round(rate(several_gpus) / rate(one_gpu), 3)


def slowest_batch_tokens(lengths: list[int], batch_size: int, processes: int, epochs: int, seed: int,
                         balanced: bool) -> float:
    """Mean, over optimizer steps, of the padded tokens (batch x its longest example) of the slowest
    process's batch, which a data-parallel step waits for. balanced=False: the Trainer's length-grouped
    order cut into batches that accelerate deals out in turn (one process; several before the balanced
    cut); True: the batches training.py gives several processes (qexpand.accel.batches)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    costs = []
    for epoch in range(epochs):
        if balanced:
            samplers = [batches.balanced_sampler_class()(lengths, batch_size, processes, 1, rank, seed)
                        for rank in range(processes)]
            for sampler in samplers:
                sampler.set_epoch(epoch)
            steps = zip(*samplers)
        else:
            order = get_length_grouped_indices(lengths, batch_size, generator=generator)
            dealt = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            steps = (dealt[start:start + processes] for start in range(0, len(dealt) - processes + 1, processes))
        costs += [max(batches.batch_tokens(batch, lengths) for batch in step) for step in steps]
    return sum(costs) / len(costs)


def length_grouping(args, paths: Paths, opts) -> dict:
    """How much the batching alone lengthens an N-process step over a 1-process step (same batch size
    per process), from the benchmark's real token counts; no training."""
    _, topic_lengths = topic_order(paths)
    batch = RECIPES["default"]["batch_size"]["cuda"]
    result = {"gpus": [1, args.gpus], "epochs": args.epochs, "batch_size": batch, "copies": {}}
    for copies in sorted({1, 3, 6, 10, args.repeat}):
        lengths = [topic_lengths[i % len(topic_lengths)] for i in range(EXAMPLES * copies)]
        one = slowest_batch_tokens(lengths, batch, 1, args.epochs, opts.seed, balanced=False)
        dealt, balanced = (slowest_batch_tokens(lengths, batch, args.gpus, args.epochs, opts.seed, balanced=cut)
                           for cut in (False, True))
        result["copies"][str(copies)] = {
            "slowest_batch_tokens_1": round(one), f"slowest_batch_tokens_{args.gpus}_dealt": round(dealt),
            f"slowest_batch_tokens_{args.gpus}_balanced": round(balanced),
            "step_cost_ratio_dealt": round(dealt / one, 3), "step_cost_ratio_balanced": round(balanced / one, 3)}
    return result


def main(args) -> int:
    opts = bench_options(args)
    gpu_bench.run_all(opts)  # with no stages: the build stage only (model folder, example order)
    mode = length_grouping if args.length_grouping else abba_scaling
    result = mode(args, Paths(opts), opts)
    result["command"] = shlex.join(["python", *sys.argv])
    write_json(Path(args.out), result)
    print({k: v for k, v in result.items() if k.startswith(("speedup", "drift"))})
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
