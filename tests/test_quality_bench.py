"""The quality benchmark end to end on the tiny random Mistral model (the --model path a GPU box uses
with Mistral-7B): both protocols, every topic tested once per protocol, and the result file has the
fields the committed bench/results/quality.json is read by."""

from __future__ import annotations

import json

from tests.conftest import run_script, snapshot
from tests.fixtures import write_topic_files

SETS = ("clueweb09/catb/trec-web-2009", "disks45/nocr/trec-robust-2004", "gov/trec-web-2002")
ROWS = ("finetuned", "zero_shot", "nearest_neighbour", "title", "template")
METRICS = ("sbert", "rougeL", "bleu", "content_f1", "content_precision", "content_recall")


def check_section(section: dict, n_topics: int) -> None:
    assert section["n_topics"] == n_topics
    assert len({tuple(t) for t in section["topics"]}) == n_topics  # disjoint test sets covering the sample
    for row in ROWS:
        assert section["content"][row]["content_f1"] == section["rows"][row]["content_f1"]
        for metric in METRICS:
            stat = section["rows"][row][metric]
            assert stat["ci"][0] <= stat["mean"] <= stat["ci"][1]
            assert len(section["per_query"][row][metric]) == n_topics
    assert section["content"]["title"]["content_f1"]["mean"] == 0.0  # no added term by construction
    assert {"finetuned_minus_template", "finetuned_minus_zero_shot", "finetuned_minus_nearest_neighbour"} <= set(
        section["paired"])


def test_both_protocols_on_the_tiny_mistral(tmp_path, tiny_model):
    write_topic_files(tmp_path / "irds")
    before = snapshot(tmp_path / "irds")
    out = tmp_path / "result" / "quality.json"
    result = run_script(
        "bench/quality.py", "--model", tiny_model, "--gguf-file", "none", "--topics-home", tmp_path / "irds",
        "--datasets", *SETS, "--limit-topics", "30", "--folds", "2", "--eval-size", "4",
        "--train-args", "--epochs 1 --batch-size 4", "--test-args", "--num-candidates 2 --max-new-tokens 4",
        "--out", out, home=tmp_path / "unused-home", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    check_section(report, 30)
    assert report["folds"] == 2 and set(report["paired_finetuned_minus_template"]) >= {"sbert", "content_f1"}
    assert all(fold["n_eval"] == 4 for fold in report["per_fold"])
    logo = report["leave_group_out"]
    check_section(logo, 30)
    # Groups: the Web sets, Robust04, and the set outside the offline groups on its own.
    assert set(logo["groups"]) == {"web", "robust04", "gov/trec-web-2002"}
    start = 0
    for fold in logo["per_fold"]:  # each split tests exactly the topics of its held-out group
        tested = {t[0] for t in logo["topics"][start:start + fold["n_test"]]}
        assert tested == set(logo["groups"][fold["name"]]["datasets"])
        assert fold["n_test"] == logo["groups"][fold["name"]]["n_topics"]
        start += fold["n_test"]
    assert sum(g["n_topics"] for g in logo["groups"].values()) == 30
    assert (out.parent / "quality.md").is_file()
    assert "leave one group" in (out.parent / "quality.md").read_text().lower()
    assert snapshot(tmp_path / "irds") == before  # a temporary copy was read; the source is untouched


def test_tuning_never_generates_test_topics(tmp_path, tiny_model):
    write_topic_files(tmp_path / "irds")
    out = tmp_path / "tune.json"
    result = run_script(
        "bench/quality.py", "--model", tiny_model, "--gguf-file", "none", "--topics-home", tmp_path / "irds",
        "--datasets", *SETS, "--limit-topics", "20", "--protocols", "kfold", "--folds", "2", "--first-splits", "1",
        "--eval-size", "4", "--train-args", "--epochs 1 --batch-size 4", "--tune-on", "eval",
        "--variants", "--num-candidates 1 --max-new-tokens 4", "--num-candidates 2 --max-new-tokens 4",
        "--runs-dir", tmp_path / "runs", "--out", out, home=tmp_path / "unused-home", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = json.loads(out.read_text())["tuned"]["kfold"]
    assert tuned["splits"] == ["fold0"] and len(tuned["variants"]) == 2
    assert all(v["n_topics"] == 4 for v in tuned["variants"].values())
    run = tmp_path / "runs" / "kfold-fold0"
    assert (run / "predictions-eval.jsonl").is_file() and not (run / "predictions.jsonl").exists()
