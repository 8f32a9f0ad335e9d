"""Host work of one training step with peft's LoRA layers and with the fused ones, on the CPU.

A step of the default recipe on a GPU is bound by the host launching kernels (bench/RESULTS.md), so
what matters is how many operators that launch a kernel a step runs, and how long the host takes
for them. This counts them on a random Mistral with all 32 blocks but tiny widths (4-bit NF4 base,
bf16 compute under autocast, LoRA r=8 on the 7 projections with dropout 0.05 in float32,
recomputation: the default recipe's step, shrunk), where the host's share of a step is large, and
times the step. It is a proxy: the GPU figure needs a GPU run (`bench/gpu_bench.py --recipes
default-peft,default`).

    python bench/lora_kernels_cpu.py --out bench/results/lora_kernels_cpu.json
"""

from __future__ import annotations

import argparse
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
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, ids)
    return {"launching_operators_per_step": launching_operators(prof),
            "step_ms": round((time.perf_counter() - started) / steps * 1e3, 1)}


def unfuse(model) -> int:
    """Back to peft's forward on every layer (the fused one is an attribute of the instance)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return 0


def four_bit_model(folder: Path):
    """The base and LoRA layers as training.py builds them on CUDA (4-bit NF4, bf16 compute, LoRA r=8
    with dropout 0.05 on the 7 projections), here on the CPU, with re-entrant recomputation."""
    from peft import get_peft_model

    from qexpand import modeling

    model = modeling.load_base_model(str(folder), None, "nf4", "cpu", "bf16")
    model.enable_input_require_grads()
    model = get_peft_model(model, modeling.lora_config(model, 8, 16, 0.05, "all-linear"))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as training.py
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--batch", type=int, nargs=2, default=(4, 24), metavar=("ROWS", "TOKENS"))
    parser.add_argument("--out", default=None, help="result JSON")
    args = parser.parse_args(argv)
    import torch

    from bench.random_mistral import TINY_MISTRAL, save_random_mistral
    from qexpand.lora_kernels import fuse_lora_layers

    torch.set_num_threads(1)  # the host of one training process: one thread launches
    with tempfile.TemporaryDirectory() as folder:
        save_random_mistral(Path(folder), tiny=True, seed=0, layers=32)
        model = four_bit_model(Path(folder))
        ids = torch.randint(3, 32000, tuple(args.batch), generator=torch.Generator().manual_seed(0))
        result = {"model": dict(TINY_MISTRAL, num_hidden_layers=32), "batch": list(args.batch),
                  "torch": torch.__version__, "order": "peft fused fused peft", "runs": []}
        for kind in ("peft", "fused", "fused", "peft"):  # A-B-B-A: a drift of the host's speed cancels
            fused = fuse_lora_layers(model) if kind == "fused" else unfuse(model)
            result["runs"].append({"kind": kind, "fused_layers": fused, **measure(model, ids, args.steps)})
    for kind in ("peft", "fused"):
        runs = [run for run in result["runs"] if run["kind"] == kind]
        result[kind] = {key: round(sum(run[key] for run in runs) / 2, 1)
                        for key in ("launching_operators_per_step", "step_ms")}
    for key in ("launching_operators_per_step", "step_ms"):
        result[f"fused_over_peft_{key}"] = round(result["fused"][key] / result["peft"][key], 3)
    result["command"] = " ".join(["python", *sys.argv])
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
