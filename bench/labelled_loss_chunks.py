"""How large a chunk should the labelled-position loss take? Time and memory of one loss + backward.

The loss at labelled positions (`qexpand.accel.labelled_loss`) runs the output layer and cross-entropy
`chunk` positions at a time and recomputes each chunk in the backward pass. Small chunks keep less memory
and launch more, smaller matrix products; this measures both against the stock loss (every position's
float32 logits kept for the backward pass) for the output layers of the bases the project trains:

    python bench/labelled_loss_chunks.py --out bench/results/labelled_loss_chunks.json

Random weights and states of each base's shape (speed and memory depend on shapes only), in bf16 on a
GPU and float32 on the CPU, as the bases train there; the head is frozen and the states take the
gradient, as in LoRA training without the output layer in the adapter. Memory is measured on CUDA only.
Times are the median of --repeats CUDA-synchronised loss + backward passes after two warm-up passes;
memory is the peak allocated during one pass, above what was held before it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qexpand.accel.labelled_loss import (CHUNK_LOGITS, IGNORE_INDEX, chunked_token_loss,  # noqa: E402
                                         positions_per_chunk)
from qexpand.runfiles import atomic_write_json  # noqa: E402

# (width, vocabulary) of each base's output layer
HEADS = {"gemma3-270m": (640, 262_144), "smollm2-135m": (576, 49_152), "mistral-7b": (4096, 32_000)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--batch", type=int, default=32, help="sequences per micro-batch")
    parser.add_argument("--positions", type=int, default=128, help="positions per sequence")
    parser.add_argument("--labelled", type=float, default=0.5, help="share of positions with a label")
    parser.add_argument("--chunks", nargs="+", type=int, default=[20, 22, 23, 24, 25, 26, 27],
                        help="log2 of the logits a chunk holds")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/labelled_loss_chunks.json")
    return parser


def inputs(width: int, vocabulary: int, args) -> tuple:
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    head = torch.nn.Linear(width, vocabulary, bias=False).to(args.device, dtype).requires_grad_(False)
    states = torch.randn(args.batch, args.positions, width, generator=generator).to(args.device, dtype)
    labels = torch.randint(vocabulary, (args.batch, args.positions), generator=generator)
    labels[torch.rand(args.batch, args.positions, generator=generator) >= args.labelled] = IGNORE_INDEX
    return head, states.requires_grad_(True), labels.to(args.device), dtype


def stock_loss(states, labels, head):
    """The library's causal-LM loss: every position's logits, in float32, shifted, masked mean."""
    logits = head(states).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def timed(step, device: str, repeats: int) -> dict:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(), once()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    seconds = [once() for _ in range(repeats)]
    result = {"ms": round(1000 * statistics.median(seconds), 3)}
    if device == "cuda":
        result["peak_mb"] = round((torch.cuda.max_memory_allocated() - held) / 2**20, 1)
    return result


def measure_head(name: str, args) -> dict:
    width, vocabulary = HEADS[name]
    head, states, labels, dtype = inputs(width, vocabulary, args)
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():  # the chunked loss must be the stock one before its time means anything
        summed, count = chunked_token_loss(states, labels, head, None, positions_per_chunk(2**args.chunks[0], vocabulary), dtype)
        difference = abs(float(summed / count) - float(stock_loss(states, labels, head)))

    def stock():
        stock_loss(states, labels, head).backward()
        states.grad = None

    rows = {"stock": timed(stock, args.device, args.repeats)}
    for power in args.chunks:
        chunk = positions_per_chunk(2**power, vocabulary)

        def chunked(chunk=chunk):
            summed, count = chunked_token_loss(states, labels, head, None, chunk, dtype)
            (summed / count).backward()
            states.grad = None

        rows[f"2^{power}"] = {"positions_per_chunk": chunk, **timed(chunked, args.device, args.repeats)}
    print(f"{name}: {scored} scored positions; " + "; ".join(f"{k} {v}" for k, v in rows.items()), flush=True)
    return {"width": width, "vocabulary": vocabulary, "scored_positions": scored,
            "loss_difference_to_stock": difference, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"command": " ".join(["python", "bench/labelled_loss_chunks.py", *(argv or sys.argv[1:])]),
              "device": device_name, "torch": torch.__version__,
              "default_chunk": f"2^{CHUNK_LOGITS['cpu' if args.device == 'cpu' else 'cuda'].bit_length() - 1}",
              "batch": args.batch, "positions": args.positions, "labelled": args.labelled,
              "heads": {name: measure_head(name, args) for name in args.heads}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
