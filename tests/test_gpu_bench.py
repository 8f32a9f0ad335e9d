"""The GPU benchmark's build and generation stages on the CPU (2-layer Mistral): the code path the
GPU run takes, minus the CUDA-only calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_tiny_generation_stage_times_every_form(tmp_path, topics_home):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--tiny", "--stages", "generate",
               "--topics-home", str(topics_home), "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--test-queries", "6", "--gen-new-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["generate_35_s"]) >= {"today", "default", "default_without_graphs", "nf4_graphed"}
    # Compared row by row (token identity is tested in float32 in test_graphed_generation.py; the
    # NF4 path computes in bf16, where a random model's near-tied logits can flip).
    assert report["generation_agreement"]["nf4_graphed_vs_today"]["rows"] == 6
