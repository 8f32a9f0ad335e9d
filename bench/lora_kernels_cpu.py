"""Host work of one training step: peft's LoRA layers against the fused ones, each with both kinds of
recomputation, on the CPU.

A step of the default recipe on a GPU is bound by the host launching kernels (bench/RESULTS.md), so
what matters is how many operators that launch a kernel a step runs, and how long the host takes
for them. This counts them on a random Mistral with all 32 blocks but tiny widths (4-bit NF4 base,
bf16 compute under autocast, LoRA r=8 on the 7 projections with dropout 0.05 in float32,
recomputation: the default recipe's step, shrunk), and times the step for peft's and the fused
layers, each with non-re-entrant and re-entrant recomputation, for the fused layers grouped by
siblings (re-entrant), and for those with the rotary embedding as one function (`rotary_for_training`),
in the order A B C D E F F E D C B A (a drift of the host's speed falls on both sides). With the real 32,000-word vocabulary the output layer's
arithmetic takes much of a CPU step; `--vocab 512` leaves little but the host's own work, the part a
GPU step waits for. It is a proxy: the GPU figure needs a GPU run (`bench/gpu_bench.py --in-order
--recipes default,default-peft,default-peft-again,default-again`).

    python bench/lora_kernels_cpu.py --out bench/results/lora_kernels_cpu.json
    python bench/lora_kernels_cpu.py --vocab 512 --steps 20 --out bench/results/lora_kernels_cpu_host.json
    python bench/lora_kernels_cpu.py --vocab 512 --steps 20 --out bench/results/lora_kernels_cpu_grouped_shared.json
    python bench/lora_kernels_cpu.py --vocab 512 --steps 20 --out bench/results/lora_kernels_cpu_rotary.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Operators that launch no kernel of their own on a GPU (views, allocations, no-op casts).
NO_KERNEL = ("aten::view", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::t",
             "aten::transpose", "aten::detach", "aten::_unsafe_view", "aten::reshape", "aten::slice", "aten::expand",
             "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::permute", "aten::select", "aten::to",
             "aten::resolve_conj", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::lift_fresh",
             "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::contiguous")


def launching_operators(prof) -> int:
    """Innermost aten operators of a profile that do work (would launch a kernel on a GPU)."""
    return sum(1 for event in prof.events()
               if event.name.startswith("aten::") and not event.cpu_children and event.name not in NO_KERNEL)


def training_step(model, ids):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(model, ids, steps: int) -> dict:
    from torch.profiler import profile

    training_step(model, ids)  # first step: allocations, lazy set-up
    with profile() as prof:
        training_step(model, ids)
    # Counted before the timed steps: the profiler works through its records after it stops, and
    # steps timed meanwhile share the CPU with it (they took four times as long).
    operators = launching_operators(prof)
    del prof
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, ids)
    return {"launching_operators_per_step": operators,
            "step_ms": round((time.perf_counter() - started) / steps * 1e3, 1)}


def unfuse(model) -> int:
    """Back to peft's forward on every layer (the fused one is an attribute of the instance)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return 0


def four_bit_model(folder: Path):
    """The base and LoRA layers as training.py builds them on CUDA (4-bit NF4, bf16 compute, LoRA r=8
    with dropout 0.05 on the 7 projections), here on the CPU; the caller turns recomputation on."""
    from peft import get_peft_model

    from qexpand import modeling

    model = modeling.load_base_model(str(folder), None, "nf4", "cpu", "bf16")
    modeling.keep_four_bit_layout_for_training(model)
    model.enable_input_require_grads()
    model = get_peft_model(model, modeling.lora_config(model, 8, 16, 0.05, "all-linear"))
    model.train()
    return model


# (LoRA layers, re-entrant recomputation); the first is the default before the fused layers. "fused"
# is one call per layer; "grouped" fuses sibling layers into one call and keeps the de-quantized weights
# of the recomputation for the backward pass; "grouped+rotary" adds the rotary embedding as one function
# (training.py's default).
VARIANTS = (("peft", False), ("peft", True), ("fused", False), ("fused", True), ("grouped", True),
            ("grouped+rotary", True))


def variant_name(layers: str, reentrant: bool) -> str:
    return f"{layers}, {'re-entrant' if reentrant else 'non-re-entrant'}"


def summarise(runs: list[dict]) -> dict:
    """Mean operators and step time of each variant over its runs, and each one's ratios to the first."""
    summary = {}
    for layers, reentrant in VARIANTS:
        mine = [run for run in runs if (run["layers"], run["reentrant"]) == (layers, reentrant)]
        summary[variant_name(layers, reentrant)] = {
            key: round(sum(run[key] for run in mine) / len(mine), 1) for key in ("launching_operators_per_step", "step_ms")}
    first = summary[variant_name(*VARIANTS[0])]
    for values in summary.values():
        values["step_ms_over_first"] = round(values["step_ms"] / first["step_ms"], 3)
        values["operators_over_first"] = round(values["launching_operators_per_step"]
                                               / first["launching_operators_per_step"], 3)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each run")
    parser.add_argument("--batch", type=int, nargs=2, default=(4, 24), metavar=("ROWS", "TOKENS"))
    parser.add_argument("--vocab", type=int, default=32000,
                        help="vocabulary of the random model (512: the step is nearly all host work)")
    parser.add_argument("--out", default=None, help="result JSON")
    args = parser.parse_args(argv)
    import torch

    from bench.random_mistral import TINY_MISTRAL, save_random_mistral
    from qexpand.accel.lora_kernels import fuse_lora_layers, rotary_for_training

    torch.set_num_threads(1)  # the host of one training process: one thread launches
    with tempfile.TemporaryDirectory() as folder:
        save_random_mistral(Path(folder), tiny=True, seed=0, layers=32, vocab=args.vocab)
        model = four_bit_model(Path(folder))
        ids = torch.randint(3, args.vocab, tuple(args.batch), generator=torch.Generator().manual_seed(0))
        order = VARIANTS + VARIANTS[::-1]
        result = {"model": dict(TINY_MISTRAL, num_hidden_layers=32, vocab_size=args.vocab), "batch": list(args.batch),
                  "torch": torch.__version__, "order": [variant_name(*v) for v in order], "runs": []}
        for layers, reentrant in order:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            grouped = layers.startswith("grouped")
            fused = unfuse(model) if layers == "peft" else fuse_lora_layers(
                model, group_siblings=grouped, keep_weights_for_backward=grouped)
            rotary = rotary_for_training(model) if layers == "grouped+rotary" else contextlib.nullcontext()
            with rotary:
                result["runs"].append({"layers": layers, "reentrant": reentrant, "fused_layers": fused,
                                       **measure(model, ids, args.steps)})
    result["summary"] = summarise(result["runs"])
    result["command"] = " ".join(["python", *sys.argv])
    print(json.dumps({k: v for k, v in result.items() if k not in ("model", "runs")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
