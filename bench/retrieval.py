"""Do the expansions help retrieval? BM25 with each query form, scored with MAP, nDCG@10 and R@1000.

Forms, each the title repeated --repeat-query times and then a text (query2doc's concatenation):
  title      the title alone
  template   title + "Find information about {title}."
  expansion  title + the generated expansion (from --expansions: the JSONL that qexpand.expandtopics
             writes, or the predictions.jsonl of testing_finetuned_model.py)
  gold       title + the topic's own description: the ceiling an expansion can hope for
Corpus, qrels and topics come from an ir_datasets id whose documents are at hand, e.g.

    python bench/retrieval.py --dataset cord19/trec-covid --expansions covid.jsonl

(downloads the CORD-19 documents with network access), or from local files:

    python bench/retrieval.py --corpus docs.jsonl --qrels qrels.txt --topics topics.trec --expansions exp.jsonl

(docs.jsonl: one {"doc_id", "text"} a line, an optional "title" is prepended; qrels in TREC form;
--topics: any topic source qexpand.topicfiles reads, for titles and gold descriptions; without it
they come from the expansions file). Only topics with a relevant document, and with an expansion where
expansions are given, are scored, so every form is compared on the same queries.

BM25 is bm25s (Lucene's BM25 variant, Snowball English stemmer, English stop words) with
Anserini's defaults k1=0.9, b=0.4: a maintained pure-Python library, where pyserini and PyTerrier
need a Java runtime and their own index build. Significance: a two-sided paired randomization
test over queries (sign flips of the per-query differences, scipy.stats.permutation_test,
10,000 resamples, seeded) for every pair of forms and measure, without correction for the
number of comparisons.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qexpand.data import query_key  # noqa: E402
from qexpand.errors import UserError, run_cli  # noqa: E402
from qexpand.rundir import atomic_write_json  # noqa: E402
from qexpand.topicfiles import QueryTopic, expanded_query, read_topics  # noqa: E402

TEMPLATE = "Find information about {query}."
FORMS = ("title", "template", "expansion", "gold")
MEASURE_NAMES = ("AP", "nDCG@10", "R@1000")
SHOWN = {"AP": "MAP", "nDCG@10": "nDCG@10", "R@1000": "R@1000"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", help="ir_datasets id with documents, qrels and topics")
    parser.add_argument("--corpus", help="local corpus, JSONL of {doc_id, text}")
    parser.add_argument("--qrels", help="local TREC qrels file (with --corpus)")
    parser.add_argument("--topics", help="topic source for titles and gold descriptions (file, '-' or ir_datasets id)")
    parser.add_argument("--expansions", help="JSONL with query_id and generated (expansion) per topic")
    parser.add_argument("--repeat-query", type=int, default=1, help="times the title is repeated before the text")
    parser.add_argument("--k1", type=float, default=0.9)
    parser.add_argument("--b", type=float, default=0.4)
    parser.add_argument("--hits", type=int, default=1000, help="documents retrieved per query")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomization test")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def read_jsonl(path: str) -> list[dict]:
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}.") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}, line {number}: not a JSON object; a JSONL file has one a line.") from None
    return records


def expansion_records(path: str) -> dict[str, dict]:
    records = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        if not isinstance(record, dict) or "query_id" not in record or "generated" not in record:
            raise UserError(f"{path}, record {number}: expected the keys query_id and generated (the files that "
                            "qexpand.expandtopics and testing_finetuned_model.py write have them).")
        records[str(record["query_id"])] = record
    return records


def load_corpus(args) -> tuple[list[str], list[str], dict[str, dict[str, int]], list[QueryTopic] | None]:
    """(doc ids, doc texts, qrels, topics of the data set or None)."""
    if args.dataset:
        import ir_datasets

        try:
            dataset = ir_datasets.load(args.dataset)
        except KeyError:
            raise UserError(f"unknown ir_datasets id '{args.dataset}' (the catalogue is at https://ir-datasets.com).") from None
        if not (dataset.has_docs() and dataset.has_qrels()):
            raise UserError(f"'{args.dataset}' lacks documents or qrels; choose a data set with both, or give "
                            "--corpus and --qrels.")
        qrels: dict[str, dict[str, int]] = {}
        try:
            docs = [(doc.doc_id, doc.default_text()) for doc in dataset.docs_iter()]
            for judgement in dataset.qrels_iter():
                qrels.setdefault(judgement.query_id, {})[judgement.doc_id] = judgement.relevance
        except Exception as error:  # ir_datasets raises plain OSError/RuntimeError on failed downloads
            raise UserError(
                f"could not read the documents or qrels of '{args.dataset}' ({str(error).splitlines()[0][:200]}). "
                "ir_datasets downloads free collections with network access; licensed ones (e.g. the disks of "
                f"Robust04) must be placed in its cache first: see https://ir-datasets.com/{args.dataset.split('/')[0]}.html"
            ) from None
        return [d for d, _ in docs], [t for _, t in docs], qrels, read_topics(args.topics or args.dataset)
    import ir_measures

    docs = [(str(r["doc_id"]), " ".join(filter(None, [r.get("title"), r.get("text")]))) for r in read_jsonl(args.corpus)]
    qrels = {}
    try:
        for judgement in ir_measures.read_trec_qrels(args.qrels):
            qrels.setdefault(judgement.query_id, {})[judgement.doc_id] = judgement.relevance
    except (OSError, ValueError, IndexError) as error:
        raise UserError(f"cannot read the qrels {args.qrels} ({error}); expected TREC lines 'qid 0 docid relevance'.") from None
    return [d for d, _ in docs], [t for _, t in docs], qrels, read_topics(args.topics) if args.topics else None


def bm25_runs(doc_ids, texts, queries: dict[str, dict[str, str]], args) -> dict[str, dict[str, dict[str, float]]]:
    """{form: {qid: {doc_id: score}}}: BM25 top --hits documents with a positive score."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=args.k1, b=args.b)
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    hits = min(args.hits, len(doc_ids))
    runs = {}
    for form, by_qid in queries.items():
        qids = list(by_qid)
        tokens = bm25s.tokenize([by_qid[q] for q in qids], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
        found, scores = retriever.retrieve(tokens, k=hits, show_progress=False, n_threads=1)
        runs[form] = {qid: {doc_ids[d]: float(s) for d, s in zip(found[i], scores[i]) if s > 0} for i, qid in enumerate(qids)}
    return runs


def per_query_scores(run: dict, qrels: dict, qids: list[str]) -> dict[str, np.ndarray]:
    """{measure: values in qids order}; a query with nothing retrieved scores 0."""
    import ir_measures

    measures = [ir_measures.parse_measure(name) for name in MEASURE_NAMES]
    values = {str(m): {} for m in measures}
    for metric in ir_measures.iter_calc(measures, qrels, {q: run[q] for q in qids if run.get(q)}):
        values[str(metric.measure)][metric.query_id] = metric.value
    return {name: np.array([values[name].get(q, 0.0) for q in qids]) for name in MEASURE_NAMES}


def randomization_p(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    from scipy.stats import permutation_test

    if np.allclose(a, b):
        return 1.0
    result = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                              n_resamples=10_000, vectorized=True, random_state=seed)
    return float(result.pvalue)


def form_queries(topics: list[QueryTopic], expansions: dict[str, dict] | None, repeat: int) -> dict[str, dict[str, str]]:
    texts = {"title": lambda t: "", "template": lambda t: TEMPLATE.format(query=t.query),
             "gold": lambda t: t.description}
    if expansions is not None:
        texts["expansion"] = lambda t: expansions[t.query_id]["generated"]
    if not all(t.description for t in topics):
        texts.pop("gold")
        print("some topics have no description: the gold form is left out", file=sys.stderr)
    return {form: {t.query_id: expanded_query(t.query, texts[form](t), "query+expansion", repeat) if form != "title"
                   else t.query for t in topics} for form in FORMS if form in texts}


def scored_topics(topics, expansions, qrels) -> list[QueryTopic]:
    if topics is None:
        if expansions is None:
            raise UserError("no topics: give --topics, --dataset or --expansions.")
        if not all(r.get("query") for r in expansions.values()):
            raise UserError("the expansions file lacks the query text of some topics; give the topics with --topics.")
        topics = [QueryTopic(q, r["query"], r.get("description") or "") for q, r in expansions.items()]
    judged = {q for q, docs in qrels.items() if any(relevance > 0 for relevance in docs.values())}
    kept = [t for t in topics if t.query_id in judged and (expansions is None or t.query_id in expansions)]
    if not kept:
        raise UserError("no topic has both a relevant document in the qrels and an expansion: do the query ids match?")
    other = [t for t in kept if expansions and "query" in expansions[t.query_id]
             and query_key(expansions[t.query_id]["query"]) != query_key(t.query)]
    if other:
        print(f"warning: {len(other)} expansions were made for another query than the topic's (e.g. "
              f"{other[0].query_id}: {expansions[other[0].query_id]['query']!r}, topic {other[0].query!r})", file=sys.stderr)
    return kept


def markdown(report: dict) -> str:
    forms = list(report["means"])
    lines = [f"BM25 (bm25s, k1={report['k1']}, b={report['b']}) on {report['documents']} documents, "
             f"{report['queries']} queries; p: paired randomization test against title", "",
             "| form | " + " | ".join(SHOWN[m] for m in MEASURE_NAMES) + " |", "|---|" + "---|" * len(MEASURE_NAMES)]
    for form in forms:
        cells = [f"{report['means'][form][m]:.4f}" + ("" if form == "title" else f" (p={report['p'][f'{form} vs title'][m]:.3g})")
                 for m in MEASURE_NAMES]
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    lines += ["", "| paired randomization test, p | " + " | ".join(SHOWN[m] for m in MEASURE_NAMES) + " |",
              "|---|" + "---|" * len(MEASURE_NAMES)]
    lines += [f"| {pair} | " + " | ".join(f"{p[m]:.3g}" for m in MEASURE_NAMES) + " |" for pair, p in report["p"].items()]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if bool(args.dataset) == bool(args.corpus) or bool(args.corpus) != bool(args.qrels):
        raise UserError("give either --dataset ID, or --corpus FILE with --qrels FILE.")
    if args.hits < 1 or args.repeat_query < 0:
        raise UserError("--hits must be at least 1 and --repeat-query at least 0.")
    expansions = expansion_records(args.expansions) if args.expansions else None
    doc_ids, texts, qrels, topics = load_corpus(args)
    if not doc_ids:
        raise UserError("the corpus holds no documents.")
    topics = scored_topics(topics, expansions, qrels)
    qids = [t.query_id for t in topics]
    queries = form_queries(topics, expansions, args.repeat_query)
    runs = bm25_runs(doc_ids, texts, queries, args)
    scores = {form: per_query_scores(run, qrels, qids) for form, run in runs.items()}
    report = {"documents": len(doc_ids), "queries": len(qids), "k1": args.k1, "b": args.b,
              "repeat_query": args.repeat_query, "hits": args.hits,
              "means": {f: {m: float(v.mean()) for m, v in s.items()} for f, s in scores.items()},
              "p": {f"{a} vs {b}": {m: randomization_p(scores[a][m], scores[b][m], args.seed) for m in MEASURE_NAMES}
                    for b, a in itertools.combinations(scores, 2)},
              "per_query": {f: {m: dict(zip(qids, v.tolist())) for m, v in s.items()} for f, s in scores.items()}}
    print(markdown(report))
    if args.out:
        atomic_write_json(Path(args.out), report)
        print(f"results: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_args = build_parser().parse_args()
    run_cli(lambda: main(cli_args), "")
