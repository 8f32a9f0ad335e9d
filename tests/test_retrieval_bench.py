"""The Lucene engine (pyserini) and bench/retrieval.py on a small collection of our own.

Each title is an ambiguous word; the distractor documents repeat it more often than the relevant
ones, and only words of the relevant sense ("habitat", "species") tell them apart, so an expansion
that adds those words must rank the relevant documents higher than the title alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from qexpand import data, retrieval
from qexpand.topicfiles import QueryShape
from tests.conftest import run_script
from tests.fixtures import write_topic_files

WORDS = ["jaguar", "python", "mercury", "apple", "java", "amazon", "bass", "crane", "seal", "mouse", "pitch", "spring"]


def write_collection(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs, qrels, topics = [], [], []
    for i, word in enumerate(WORDS):
        for k in range(2):
            docs.append({"doc_id": f"r{i}-{k}", "text": f"A note on {word}: habitat and species observed in the field {k}."})
            qrels.append(f"{i + 1} 0 r{i}-{k} 1")
        for k in range(3):
            docs.append({"doc_id": f"d{i}-{k}", "text": f"{word} {word} news: engine dealer price report {k}."})
        topics.append(f"{i + 1}\t{word}")
    docs += [{"doc_id": f"f{n}", "text": f"filler text number {n} about nothing much"} for n in range(40)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "qrels.txt").write_text("\n".join(qrels) + "\n")
    (folder / "topics.tsv").write_text("\n".join(topics) + "\n")
    return folder


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory) -> retrieval.Collection:
    return retrieval.find_collection(str(write_collection(tmp_path_factory.mktemp("small") / "animals")))


def test_lucene_index_and_search_round_trip(small_collection, tmp_path):
    retrieval.check_java()
    index = retrieval.build_index(small_collection, tmp_path / "indexes")
    assert retrieval.build_index(small_collection, tmp_path / "indexes") == index  # built once, then reused
    searcher = retrieval.Searcher(index)
    topics = small_collection.judged_topics()
    qrels = small_collection.qrels()
    title = searcher.search(topics)
    assert set(title) == set(topics)
    assert max(title["1"], key=title["1"].get).startswith("d0-")  # "jaguar" twice beats "jaguar" once
    expanded = searcher.search({q: QueryShape("query+expansion", 1).query(t, "habitat species") for q, t in topics.items()})
    assert max(expanded["1"], key=expanded["1"].get).startswith("r0-")
    ap_title = retrieval.per_query(title, qrels, list(topics))["AP"]
    ap_expanded = retrieval.per_query(expanded, qrels, list(topics))["AP"]
    assert ap_title.mean() < 0.6 and ap_expanded.mean() > 0.95
    # Repeating the title weighs it up: with it 5 times the distractors win again.
    heavy = searcher.search({q: QueryShape("query+expansion", 5).query(t, "habitat species") for q, t in topics.items()})
    assert retrieval.per_query(heavy, qrels, list(topics))["AP"].mean() < ap_expanded.mean()
    rm3 = searcher.search(topics, rm3=True)
    assert set(rm3) == set(topics) and all(rm3[q] for q in topics)


def test_paired_statistics():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 200)
    same = retrieval.paired(base, base.copy())
    assert same["diff"] == 0 and same["p"] == 1.0
    better = retrieval.paired(base + 0.05 + rng.normal(0, 0.02, 200), base)
    assert better["p"] < 0.001 and 0 < better["ci"][0] < better["diff"] < better["ci"][1]
    noise = retrieval.paired(base + rng.normal(0, 0.2, 200), base)
    assert noise["p"] > 0.01 and noise["ci"][0] < 0 < noise["ci"][1]


def test_a_folder_that_is_no_collection_is_one_error(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "docs.jsonl").write_text("{}\n")
    result = run_script("bench/retrieval.py", "--collections", tmp_path / "half", "--run", tmp_path,
                        home=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing topics.tsv, qrels.txt" in result.stderr


def test_the_whole_pipeline_on_a_tiny_model(tmp_path, tiny_model):
    """Train with the retrieval recipe, expand, retrieve, score: every row and pair, per collection and pooled."""
    write_topic_files(tmp_path / "irds")
    write_collection(tmp_path / "animals")
    out = tmp_path / "results" / "retrieval.json"
    result = run_script(
        "bench/retrieval.py", "--collections", tmp_path / "animals", "--model", tiny_model,
        "--train-args", f"--datasets {' '.join(data.DEFAULT_DATASETS)} --split 30 5 5 --epochs 1 --batch-size 8",
        "--expand-args", "--max-new-tokens 4",
        "--work-dir", tmp_path / "work", "--out", out, home=tmp_path / "irds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine"].startswith("Lucene BM25 (pyserini") and "strongest terms" in report["query_weighting"]
    assert report["expansion"]["num_candidates"] == 8 and report["expansion"]["select"] == "join"
    assert report["base"] == str(tiny_model)
    # Each measured in its own process: training by training.py itself, expansion by the bench's children.
    assert 0.2 < report["peak_rss_gb"]["training"] < 8 and 0.2 < report["peak_rss_gb"]["expansion"] < 8
    recorded = json.loads((tmp_path / "work" / "run" / "run_config.json").read_text())["config"]
    assert (recorded["recipe"], recorded["target"]) == ("retrieval", "description+narrative")
    for part in (report["collections"]["animals"], report["pooled"]):
        assert part["n_topics"] == len(WORDS)
        assert set(part["rows"]) == {"title", "template", "zero_shot", "finetuned", "rm3", "finetuned_rm3", "selective"}
        assert part["rows"]["selective"] == part["rows"]["finetuned_rm3"]  # every title is one word: RM3 over it
        assert set(part["rows"]["title"]) == {"nDCG@10", "AP", "R@1000"}
        pair = part["paired"]["finetuned_vs_title"]["AP"]
        assert pair["ci"][0] <= pair["diff"] <= pair["ci"][1] and 0 <= pair["p"] <= 1
    assert report["pooled"]["rows"] == report["collections"]["animals"]["rows"]  # one collection: pooled is it
    assert set(report["by_title_length"]) == {"1"}  # one-word titles only
    assert report["by_title_length"]["1"]["rows"] == report["pooled"]["rows"]
    assert "## pooled" in out.with_suffix(".md").read_text()
    assert "| 1 | 12 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("title, group", [
    ("antinutrients", "1"), ("titanium dioxide", "2"), ("the who", "2"),  # stopwords only: every word counts
    ("Is Coconut Milk Good For You?", "3-4"), ("coconut coconut milk", "2"),  # distinct words
    ("Vitamin D: Shedding some light on the new recommendations", "5+"),
])
def test_titles_are_grouped_by_their_distinct_content_words(title, group):
    from bench.retrieval import length_group

    assert length_group(title) == group


def test_the_length_groups_summarise_only_their_own_topics():
    from bench.retrieval import FORMS, by_title_length

    titles = ["apple", "red apple", "apple", "big red apple tree farm"]
    values = np.array([0.1, 0.2, 0.3, 0.4])
    scores = {form: {m: values + i for m in retrieval.MEASURES} for i, form in enumerate(FORMS)}
    parts = by_title_length(scores, titles, seed=0)
    assert list(parts) == ["1", "2", "5+"]  # no 3-4 word title, no group
    assert [parts[g]["n_topics"] for g in parts] == [2, 1, 1]
    assert parts["1"]["rows"]["title"]["AP"] == pytest.approx(0.2)
    assert parts["5+"]["rows"]["finetuned"]["AP"] == pytest.approx(0.4 + FORMS.index("finetuned"))
    assert parts["1"]["paired"]["finetuned_vs_title"]["AP"]["diff"] == pytest.approx(FORMS.index("finetuned"))
    assert parts["2"]["paired"]["finetuned_vs_title"]["AP"]["p"] == 1.0  # one topic: no test


@pytest.mark.parametrize("options, expected", [
    ({"query_form": "query+expansion", "feedback_terms": 5},
     "--feedback-terms only applies with --query-form feedback"),
    ({"repeat_query": 2}, "--repeat-query repeats the query before a pasted expansion"),  # the recipe's feedback form
    ({"query_weight": 1.0}, "--query-weight must be in [0, 1)"),
    ({"query_form": "query+expansion", "repeat_query": 0}, "--repeat-query must be positive"),
    ({"query_form": "query+expansion", "term_relatedness": "sbert"},
     "--term-relatedness only applies with --query-form feedback"),
])
def test_the_bench_refuses_query_options_as_the_test_script_does(options, expected):
    import argparse

    from bench.retrieval import checked_shape
    from qexpand.errors import UserError
    from qexpand.recipes import EXPANSION

    unset = {"query_form": None, "repeat_query": None, "query_weight": None, "feedback_terms": None,
             "term_relatedness": None}
    with pytest.raises(UserError, match=re.escape(expected)):
        checked_shape(argparse.Namespace(**{**unset, **options}), EXPANSION["retrieval"])
    given = argparse.Namespace(**{**unset, "query_weight": 0.3, "feedback_terms": 10, "term_relatedness": "none"})
    assert checked_shape(given, EXPANSION["retrieval"]) == QueryShape("feedback", 1, 0.3, 10)
