"""training.py's own command line under the PyTorch profiler, for a window of optimizer steps.

    accelerate launch [--num_processes N] bench/profiled_training.py --profile-out DIR \
        --skip-steps 8 --profile-steps 6 -- <training.py options>

Each process writes DIR/profile-rank<R>.json: the window's wall time per optimizer step, how long the
GPU ran kernels in it (the union of the kernels' intervals, so concurrent kernels count once), the
time in NCCL kernels, the time the host spent blocked on the GPU, the number of kernels and the
heaviest ones, the host operators with the most time of their own; with compiled blocks also where
compilation time went and torch.compile's counters. The window is cut by a global optimizer-step
hook (a public torch API), so the script runs through training.py's public `parse_config()` and
`main()`, nothing inside them. Profiling slows the host side of every step: compare windows taken
this way with each other only. Choose the window inside one epoch (no eval pass or save in it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile-out", required=True, help="folder for the per-process JSON summaries")
    parser.add_argument("--skip-steps", type=int, default=8, help="optimizer steps before the window")
    parser.add_argument("--profile-steps", type=int, default=6, help="optimizer steps in the window")
    return parser


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals, in the units given (microseconds) / 1000."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1e3


def summarise(prof, step_times: list[float], skip: int, steps: int) -> dict:
    """What the window's kernels and host waits add up to, per optimizer step."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    # GPU-side rows also hold annotations spanning many kernels (the profiler step, DDP's forward,
    # "nccl:all_reduce"): left out, only kernels, copies and memsets count.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
               and not e.name.startswith("ProfilerStep")]
    # step_times[i] is the moment optimizer step i+1 ended; the window is steps skip+2 .. skip+steps+1
    # (the profiler's one warm-up step, skip+1, is left out).
    window = step_times[skip:skip + steps + 1]
    wall_ms = (window[-1] - window[0]) * 1e3
    nccl = [e for e in kernels if "nccl" in e.name.lower()]
    waits: dict[str, float] = {}
    for event in events:
        if event.device_type != DeviceType.CUDA and event.name in HOST_WAITS:
            waits[event.name] = waits.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3
    by_name: dict[str, list[float]] = {}
    for kernel in kernels:
        by_name.setdefault(kernel.name[:90], []).append(kernel.time_range.elapsed_us() / 1e3)
    top = sorted(by_name.items(), key=lambda item: sum(item[1]), reverse=True)[:12]
    host_ops = sorted((e for e in prof.key_averages() if e.device_type != DeviceType.CUDA),
                      key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    busy = busy_ms([(k.time_range.start, k.time_range.end) for k in kernels])
    per_step = (lambda value: round(value / steps, 2))
    return {
        "steps": steps, "skipped_steps": skip,
        "wall_ms_per_step": per_step(wall_ms),
        "gpu_busy_ms_per_step": per_step(busy),
        "gpu_busy_share": round(busy / wall_ms, 3),
        "kernels_per_step": round(len(kernels) / steps),
        "nccl_kernel_ms_per_step": per_step(sum(k.time_range.elapsed_us() for k in nccl) / 1e3),
        "nccl_kernels_per_step": round(len(nccl) / steps, 1),
        "host_wait_ms_per_step": {name: per_step(ms) for name, ms in sorted(waits.items())},
        "step_ms": [round((end - start) * 1e3, 1) for start, end in zip(window, window[1:])],
        "top_kernels": [{"name": name, "calls_per_step": round(len(times) / steps, 1),
                         "ms_per_step": per_step(sum(times))} for name, times in top],
        # Host time by operator, its own time only (not its children's): where the Python side goes.
        "top_host_ops": [{"name": e.key[:90], "calls_per_step": round(e.count / steps, 1),
                          "self_ms_per_step": per_step(e.self_cpu_time_total / 1e3)} for e in host_ops],
    }


def compilation_summary() -> dict | None:
    """With compiled blocks: where compilation time went (torch's own timers, seconds per phase) and
    torch.compile's counters (graphs, recompilations, graph breaks, cache hits); None without.
    Phases nest (a phase's time includes its sub-phases'); those under 0.1 s are left out."""
    from torch._dynamo import utils

    if not utils.compilation_time_metrics:
        return None
    return {"seconds": {phase: {"calls": len(times), "s": round(sum(times), 2)}
                        for phase, times in utils.compilation_time_metrics.items() if sum(times) >= 0.1},
            "counters": {group: {str(key)[:120]: value for key, value in counts.items()}
                         for group, counts in utils.counters.items() if counts}}


def main(argv: list[str]) -> int:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    sys.argv = [str(REPO / "training.py"), *argv[split + 1:]]
    import training
    from qexpand import quiet
    from qexpand.errors import run_cli

    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.profile_out)
    step_times: list[float] = []
    summary: dict = {"error": f"training ended before optimizer step {args.skip_steps + args.profile_steps + 1}: "
                              "no window was profiled (raise --max-steps or lower --skip-steps)"}

    def window_done(prof):
        # Also called when training ends inside the window: a partial window is not summarised.
        if len(step_times) > args.skip_steps + args.profile_steps:
            summary.clear()
            summary.update(summarise(prof, step_times, args.skip_steps, args.profile_steps))

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], on_trace_ready=window_done,
                   schedule=schedule(wait=args.skip_steps, warmup=1, active=args.profile_steps, repeat=1))

    def after_step(optimizer, *_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's end on the GPU, not when Python queued it
        step_times.append(time.perf_counter())
        prof.step()

    def profiled_training() -> int:
        hook = register_optimizer_step_post_hook(after_step)
        try:
            with prof:
                training.main(training.parse_config())
        finally:
            hook.remove()
        out.mkdir(parents=True, exist_ok=True)
        summary["rank"] = rank
        summary["compilation"] = compilation_summary()
        (out / f"profile-rank{rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
        return 0

    # training.py's own error path: a bad option is one paragraph, not a traceback.
    quiet.setup_logging()
    run_cli(profiled_training, training.OOM_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
