"""Data-parallel training under `accelerate launch` with two CPU processes (gloo backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, run_script
from tests.fixtures import write_topic_files


def test_two_processes_train_one_run_that_the_test_script_scores(tmp_path, tiny_model):
    write_topic_files(tmp_path / "irds")
    out = tmp_path / "runs"
    env = {**os.environ, "IR_DATASETS_HOME": str(tmp_path / "irds"), "HF_HUB_OFFLINE": "1"}
    # accelerate's --multi_gpu launcher starts the processes; on a machine without GPUs each one
    # trains on the CPU and they synchronise gradients through gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "training.py"), "--model", str(tiny_model), "--split", "30", "5", "5",
               "--epochs", "2", "--batch-size", "4", "--output-dir", str(out),
               # The 4-bit base, fused LoRA layers and re-entrant recomputation, as on CUDA: they must work
               # with data parallelism too.
               "--quantization", "nf4", "--gradient-checkpointing", "on"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x batch 4 x accumulation 1 = effective batch 8" in result.stdout
    assert "cut into batches of equal padded size, one per process" in result.stdout
    assert "gradient checkpointing on (re-entrant)" in result.stdout and "LoRA layers fused" in result.stdout
    assert result.stdout.count("run directory:") == 1  # only the main process reports
    runs = list(out.iterdir())
    assert len(runs) == 1  # both processes agreed on one run directory
    run = runs[0]
    assert json.loads((run / "run_config.json").read_text())["processes"] == 2
    assert json.loads((run / "finished.json").read_text())["global_steps"] == 8  # 2 epochs x 30 / 8
    assert (run / "adapter_model.safetensors").is_file()
    tested = run_script("testing_finetuned_model.py", "--run", run, "--max-new-tokens", "4",
                        home=tmp_path / "irds", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert (run / "scores.json").is_file()
