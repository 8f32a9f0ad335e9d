"""The cross-validation benchmark end to end on the tiny model: every topic tested once, and the
result file has the fields the committed bench/results/quality.json is read by."""

from __future__ import annotations

import json

from tests.conftest import run_script, snapshot
from tests.fixtures import write_topic_files


def test_cross_validation_tests_every_topic_once(tmp_path, tiny_model):
    write_topic_files(tmp_path / "irds")
    before = snapshot(tmp_path / "irds")
    out = tmp_path / "result" / "quality.json"
    result = run_script(
        "bench/quality.py", "--model", tiny_model, "--gguf-file", "none", "--topics-home", tmp_path / "irds",
        "--datasets", "clueweb09/catb/trec-web-2009", "disks45/nocr/trec-robust-2004", "gov/trec-web-2002",
        "--limit-topics", "20", "--folds", "2", "--eval-size", "4", "--epochs", "1", "--batch-size", "4",
        "--num-candidates", "2", "--max-new-tokens", "4", "--out", out,
        home=tmp_path / "unused-home", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["folds"] == 2 and report["n_topics"] == 20
    topics = [tuple(t) for t in report["topics"]]
    assert len(set(topics)) == 20  # disjoint test folds covering the sample
    for row in ("finetuned", "zero_shot", "nearest_neighbour", "title", "template"):
        assert report["content"][row]["content_f1"] == report["rows"][row]["content_f1"]
        for metric in ("sbert", "rougeL", "bleu", "content_f1", "content_precision", "content_recall"):
            stat = report["rows"][row][metric]
            assert stat["ci"][0] <= stat["mean"] <= stat["ci"][1]
            assert len(report["per_query"][row][metric]) == 20
    assert set(report["paired_finetuned_minus_template"]) >= {"sbert", "rougeL", "content_f1"}
    assert {"finetuned_minus_zero_shot", "finetuned_minus_nearest_neighbour"} <= set(report["paired"])
    assert report["seconds"] > 0 and report["recipe"]["precision"] == "bf16"
    assert all(fold["n_test"] == 10 and fold["n_eval"] == 4 for fold in report["per_fold"])
    assert (out.parent / "quality.md").is_file() and (out.parent / "quality_per_query.png").is_file()
    assert snapshot(tmp_path / "irds") == before  # a temporary copy was read; the source is untouched
