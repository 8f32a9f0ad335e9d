"""qexpand.Expander (the Python API) and qexpand.pyterrier.QueryExpander on a tiny random Mistral with an
untrained adapter: the same expansions as `testing_finetuned_model.py --topics`, and the same ranking
through a PyTerrier pipeline as through the command line's TSV."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pyterrier as pt
import pytest

from qexpand import Expander, data, retrieval
from qexpand.errors import UserError
from qexpand.pyterrier import QueryExpander
from qexpand.topicfiles import QueryShape, parse_tsv
from tests.conftest import run_script
from tests.fixtures import SUBJECTS, finished_run
from tests.test_retrieval_bench import write_collection

QUERIES = ["internet privacy", "hubble telescope"]
SHORT = {"max_new_tokens": 8}  # an untrained adapter on random weights rarely ends: keep generations short
TERRIER_SAFE = re.compile(r"^[^\W_]+( [^\W_]+)*$")  # letters and digits, single spaces


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """Two finished runs of the tiny model: one of the default recipe (greedy, query then expansion) and
    the same recorded as trained with the retrieval recipe (sampled candidates as a feedback query)."""
    root = tmp_path_factory.mktemp("expander")
    web = [data.Topic("clueweb09/catb/trec-web-2009", str(i), s, "d") for i, s in enumerate(SUBJECTS[:12], 1)]
    split = data.split_to_json({"train": web[2:], "eval": web[:1], "test": web[1:2]}, 42,
                               ["clueweb09/catb/trec-web-2009"])
    finished_run(root / "default", tiny_model, split)
    shutil.copytree(root / "default", root / "retrieval")
    record = json.loads((root / "retrieval" / "run_config.json").read_text())
    record["config"]["recipe"] = "retrieval"
    (root / "retrieval" / "run_config.json").write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def greedy(runs):
    return Expander.from_run(runs / "default", **SHORT)


class LuceneBM25(pt.Transformer):
    """BM25 over a Lucene index (qexpand.retrieval.Searcher) as a PyTerrier retriever: a query frame in, a
    result frame out (the query columns, docno, score, rank), in Lucene's order."""

    def __init__(self, searcher: retrieval.Searcher):
        self.searcher = searcher

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        run = self.searcher.search(dict(zip(inp["qid"], inp["query"])))
        rows = [{**topic, "docno": docno, "score": score, "rank": rank}
                for topic in inp.to_dict("records") for rank, (docno, score) in enumerate(run[topic["qid"]].items())]
        return pd.DataFrame(rows, columns=[*inp.columns, "docno", "score", "rank"])


def test_expand_writes_the_query_then_its_expansion(greedy):
    settled = greedy.config
    assert (settled.query_form, settled.num_candidates, settled.select) == ("query+expansion", 1, None)
    candidates = greedy.generate(QUERIES)
    assert [len(c) for c in candidates] == [1, 1] and all(isinstance(c[0], str) for c in candidates)
    expanded = greedy.expand(QUERIES)
    assert len(expanded) == 2 and all(isinstance(e, str) and e.startswith(q) for q, e in zip(QUERIES, expanded))
    assert expanded == [" ".join(f"{q} {c[0]}".split()) for q, c in zip(QUERIES, candidates)]  # greedy: the same again


def test_the_retrieval_recipe_expands_with_its_feedback_form(runs):
    expander = Expander.from_run("retrieval", output_dir=runs, **SHORT)  # a run name under output_dir
    settled = expander.config
    assert (settled.query_form, settled.num_candidates, settled.select, settled.passages) == ("feedback", 8, "join", 8)
    candidates = expander.generate(QUERIES)
    assert [len(c) for c in candidates] == [16, 16]  # 8 sampled candidates, then the base model's 8 passages
    expanded = expander.expand(QUERIES)  # sampling is seeded: the same candidates again
    assert settled.term_relatedness == "sbert"
    shape = QueryShape("feedback", 1, settled.query_weight, settled.feedback_terms, "sbert")
    assert expanded == [shape.query(q, " ".join(c), c) for q, c in zip(QUERIES, candidates)]
    assert all(set(q.split()) <= set(e.split()) for q, e in zip(QUERIES, expanded))
    # An SBERT model named (here the default one, by its path) is accepted: it weighs the feedback terms.
    from qexpand.metrics import default_sbert_model

    named = Expander.from_run("retrieval", output_dir=runs, sbert_model=default_sbert_model(), **SHORT)
    assert named.config.sbert_model == default_sbert_model() and named.expand(QUERIES) == expanded


@pytest.fixture(scope="module")
def trained_retrieval_run(runs):
    """The retrieval run with non-zero LoRA B matrices, so that its adapter changes what the model writes."""
    import torch
    from safetensors.torch import load_file, save_file

    run = runs / "retrieval-trained"
    shutil.copytree(runs / "retrieval", run)
    weights = load_file(run / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(w.shape, generator=generator) if "lora_B" in name else w
               for name, w in weights.items()}, run / "adapter_model.safetensors")
    return run


def test_passages_are_written_by_the_base_model_and_join_the_candidates(trained_retrieval_run):
    from qexpand.generation import generate_passages

    # One query per batch: the second batch's candidates come after the first batch's passages.
    options = {"max_new_tokens": 6, "num_candidates": 2, "queries_per_batch": 1}
    plain = Expander.from_run(trained_retrieval_run, passages=0, **options)
    with_passages = Expander.from_run(trained_retrieval_run, passages=2, **options)
    base_only = Expander.from_run(trained_retrieval_run, passages=2, zero_shot=True, **options)
    assert with_passages.config.passages == 2 and plain.config.passages == 0
    # The unquantized base takes the adapter in, unless the base must write with it switched off.
    assert plain.form.merged and not hasattr(plain.model, "disable_adapter")
    for apart in (with_passages, base_only):
        assert apart.form.adapter_apart and not apart.form.merged and "adapter kept beside" in apart.form.reason
        assert hasattr(apart.model, "disable_adapter")
    candidates = plain.generate(QUERIES)
    joined, base = with_passages.generate(QUERIES), base_only.generate(QUERIES)
    assert [len(c) for c in joined] == [4, 4]
    # The candidates are the fine-tuned model's, as without passages: the adapter is back on after them.
    assert [c[:2] for c in joined] == candidates
    # The passages are the base model's: the same as with the adapter off throughout, and not what the
    # model writes with the adapter on (which changes its candidates, so the comparison can fail).
    assert [c[2:] for c in joined] == [c[2:] for c in base]
    assert [c[:2] for c in base] != candidates
    with_adapter = [[g.text for g in row] for query in QUERIES for row in generate_passages(
        with_passages.model, with_passages.tokenizer, [query], 2, seed=0, progress=False)]
    assert with_adapter != [c[2:] for c in joined]
    # Their terms weigh in the feedback query.
    assert with_passages.expand(QUERIES) != plain.expand(QUERIES)


@pytest.mark.parametrize("options, match", [
    ({"passages": 2, "query_form": "query+expansion"}, "--passages are feedback documents"),
    ({"colour": "red", "sampling_seed": 1}, "unknown option colour; the options are num_candidates"),
    ({"device": "gpu"}, "device 'gpu' is none of auto, cuda, cpu"),
    ({"max_new_tokens": "8"}, "max_new_tokens should be int | None, got '8'"),
    ({"num_candidates": 0}, "--num-candidates must be positive"),
    ({"temperature": 0.5}, "only apply when sampling"),
    ({"query_form": "expansion", "query_weight": 0.5}, "there is no query to weigh or repeat"),
    ({"term_relatedness": "cosine", "query_form": "feedback"}, "term_relatedness 'cosine' is none of sbert, none"),
    # greedy, pasted: nothing for the SBERT model to do (with the feedback form it weighs the terms)
    ({"sbert_model": "all-MiniLM-L6-v2"}, "--sbert-model is unused with --topics here"),
])
def test_a_bad_option_is_one_user_error(runs, options, match):
    with pytest.raises(UserError, match=re.escape(match)):
        Expander.from_run(runs / "default", **options)


def test_bad_runs_and_queries_are_user_errors(runs, greedy):
    with pytest.raises(UserError, match="no such run directory"):
        Expander.from_run(runs / "nope")
    with pytest.raises(UserError, match="list of strings"):
        greedy.expand("internet privacy")
    with pytest.raises(UserError, match="positions 2 \\(of 2\\) are empty"):
        greedy.generate(["internet privacy", "  "])


def test_query_expander_keeps_the_original_in_query_0(runs):
    expander = QueryExpander(runs / "default", **SHORT)
    assert isinstance(expander, pt.Transformer)
    topics = pd.DataFrame({"qid": ["1", "2", "3"], "query": [*QUERIES, "café prices: Zürich?"]})
    out = expander(topics)
    assert list(out["qid"]) == ["1", "2", "3"] and list(out["query_0"]) == list(topics["query"])
    assert out["query"][0].startswith("internet privacy") and out["query"][1].startswith("hubble telescope")
    assert out["query"][2].startswith("café prices Zürich")
    assert all(TERRIER_SAFE.match(q) for q in out["query"])  # nothing Terrier's query parser would refuse
    again = expander(out)  # an earlier rewrite is pushed along, as pt.model.push_queries does
    assert list(again["query_1"]) == list(topics["query"]) and list(again["query_0"]) == list(out["query"])


def test_a_pipeline_ranks_as_the_command_line_tsv_does(runs, tmp_path):
    retrieval.check_java()
    collection = retrieval.find_collection(str(write_collection(tmp_path / "animals")))
    searcher = retrieval.Searcher(retrieval.build_index(collection, tmp_path / "indexes"))
    topics = collection.topics()
    expander = QueryExpander(runs / "retrieval", **SHORT)
    pipeline = expander >> LuceneBM25(searcher)
    ranked = pipeline(pd.DataFrame({"qid": list(topics), "query": list(topics.values())}))
    assert {"qid", "docno", "score", "rank", "query", "query_0"} <= set(ranked.columns)

    result = run_script("testing_finetuned_model.py", "--run", runs / "retrieval", "--topics",
                        collection.folder / "topics.tsv", "--out", tmp_path / "expanded.tsv", "--max-new-tokens", "8",
                        home=tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tsv = {t.query_id: t.query for t in parse_tsv((tmp_path / "expanded.tsv").read_text(), "expanded.tsv")}
    assert expander.expander.expand(list(topics.values())) == list(tsv.values())  # the API writes what the script does
    assert dict(zip(ranked["qid"], ranked["query"])) == tsv  # the feedback form is Terrier-safe as it is
    from_tsv = searcher.search(tsv)
    for qid in topics:
        assert list(ranked[ranked["qid"] == qid].sort_values("rank")["docno"]) == list(from_tsv[qid]), qid
