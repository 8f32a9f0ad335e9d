"""Data-parallel scaling of training.py: one GPU against several, on the 7B Mistral architecture.

Run on a machine with 2 GPUs (after `bench/gpu_bench.py` built the random 7B model folder, which
this script asks it to do first):

    python bench/multi_gpu.py --tokenizer .whl/tokenizer --topics-home .whl/irds --out bench/results/multi_gpu.json

The 230 training topics of the usual split are repeated --repeat times (each copy a distinct record),
so each process gets enough batches to keep its GPU busy. The real training.py is started with
`accelerate launch --num_processes N` for N = 1 and N = --gpus, one epoch each, and its
finished.json gives the training time (one eval and one checkpoint save included, as in a real run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.model (see gpu_bench.py)")
    parser.add_argument("--topics-home", default=None, help="folder with the TREC topic files (ir_datasets layout)")
    parser.add_argument("--work-dir", default="/tmp/qexpand-gpu-bench", help="gpu_bench.py's work folder")
    parser.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the data-parallel run")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the training topics")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "multi_gpu.json"), help="result JSON")
    return parser


def build_model(args) -> Path:
    """gpu_bench.py's build stage (plus one short default-recipe timing) makes the 7B folder."""
    command = [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--stages", "train", "--recipes", "default",
               "--work-dir", args.work_dir, "--out", str(Path(args.work_dir) / "gpu_bench_for_multi.json")]
    command += ["--tokenizer", args.tokenizer] * bool(args.tokenizer)
    command += ["--topics-home", args.topics_home] * bool(args.topics_home)
    subprocess.run(command, check=True)
    return Path(args.work_dir) / "model-mistral-7b"


def repeated_split(args, out: Path) -> int:
    """The seeded 230/35/35 split of the offline topics, its training part repeated."""
    os.environ["IR_DATASETS_HOME"] = str(Path(args.work_dir) / "irds")
    from qexpand import data

    topics = data.load_all_topics(["clueweb09/catb/trec-web-2009", "disks45/nocr/trec-robust-2004"])
    split = data.split_topics(topics, (230, 35, 35), seed=42)
    split["train"] = [replace(t, query_id=f"{t.query_id}#{copy}") for copy in range(args.repeat)
                      for t in split["train"]]
    out.write_text(json.dumps(data.split_to_json(split, 42, ["repeated"])))
    return len(split["train"])


def train(model: Path, split_file: Path, processes: int, args) -> dict:
    name = f"gpus{processes}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--multi_gpu"] * (processes > 1)
    command = launch + [str(REPO / "training.py"), "--model", str(model), "--split-file", str(split_file),
                        "--epochs", "1", "--output-dir", str(Path(args.work_dir) / "multi"), "--run-name", name,
                        "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    return {**json.loads((Path(args.work_dir) / "multi" / name / "finished.json").read_text()),
            "wall_s": round(wall, 1)}


def main(args) -> int:
    model = build_model(args)
    split_file = Path(args.work_dir) / "split-repeated.json"
    examples = repeated_split(args, split_file)
    runs = {n: train(model, split_file, n, args) for n in (1, args.gpus)}
    rates = {n: examples / r["train_seconds"] for n, r in runs.items()}
    result = {"gpus": [1, args.gpus], "train_examples": examples,
              "samples_per_s": [round(rates[1], 2), round(rates[args.gpus], 2)],
              "speedup": round(rates[args.gpus] / rates[1], 3),
              "efficiency": round(rates[args.gpus] / rates[1] / args.gpus, 3),
              "runs": {str(n): r for n, r in runs.items()}, "command": " ".join(["python", *sys.argv])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
