"""The GPU benchmark's build and generation stages on the CPU (2-layer Mistral): the code path the
GPU run takes, minus the CUDA-only calls; and the arithmetic of the N-vs-3N training rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def fake_training_runs(monkeypatch, seconds: dict) -> list:
    """training.py runs replaced by their finished.json: `seconds` maps examples to train_seconds."""
    from bench.recipes import project

    calls = []

    def timed_run(opts, paths, name, count, flags, left_s, epochs=1):
        calls.append((name, count, flags, epochs))
        finished = {"train_seconds": seconds[count], "peak_gpu_memory_gb": 6.5, "best_eval_loss": 1.0}
        return {"examples": count, "tokens": 70 * count, "wall_s": seconds[count] + 20, "finished": finished,
                "config": SimpleNamespace(gradient_checkpointing="on", batch_size=32, grad_accum=1, optimizer="adamw")}

    monkeypatch.setattr(project, "timed_run", timed_run)
    return calls


def test_training_rate_counts_every_epoch_after_one_warm_up(tmp_path, monkeypatch):
    from bench.recipes import project

    calls = fake_training_runs(monkeypatch, {32: 5.0, 93: 7.5, 279: 22.5})
    opts, paths = SimpleNamespace(train_examples=280), SimpleNamespace(work=tmp_path)
    first = project.throughput(opts, paths, "default", [], 93, lambda: 100.0, epochs=3)
    again = project.throughput(opts, paths, "default", [], 93, lambda: 100.0, epochs=3)
    # 3 epochs x 186 more examples in 15 more seconds
    assert first["samples_per_s"] == again["samples_per_s"] == 37.2
    assert first["real_tokens_per_s"] == 2604.0
    assert first["warm_up"] == {"train_seconds": 5.0, "wall_s": 25.0} and again["warm_up"] is None
    assert [c[:2] for c in calls] == [("warm-up", 32), ("default", 93), ("default", 279), ("default", 93),
                                      ("default", 279)]
