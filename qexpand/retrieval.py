"""Retrieval with Lucene BM25 and BM25+RM3 (pyserini), scored with ir_measures, compared with paired tests.

The engine is Lucene through pyserini 0.22.1 (Anserini 0.22.1 bundled, runs on Java 11 or newer) with
Anserini's defaults: BM25 k1=0.9, b=0.4 and the Porter-stemming English analyzer; RM3 with 10 feedback
terms from 10 feedback documents and the original query weighted 0.5. A query is a bag of words: a
term that occurs k times in the query text weighs k times (Anserini's BagOfWordsQueryGenerator), so
repeating the title k times before an expansion (query2doc) weighs the title against the expansion.

A collection is a folder of three files: `docs.jsonl` (one {"doc_id", "text"} a line), `topics.tsv`
(`qid<TAB>query`) and `qrels.txt` (TREC qrels). Indexes are built once into a cache folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qexpand.errors import UserError
from qexpand.metrics import BOOTSTRAP_RESAMPLES, bootstrap_ci
from qexpand.topicfiles import parse_tsv

BM25_K1, BM25_B = 0.9, 0.4
RM3_TERMS, RM3_DOCS, RM3_ORIGINAL_WEIGHT = 10, 10, 0.5
HITS = 1000
MEASURES = ("nDCG@10", "AP", "R@1000")
SHARED_COLLECTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "collections"
ENGINE = (f"Lucene BM25 (pyserini 0.22.1 / Anserini, k1={BM25_K1}, b={BM25_B}, Porter stemmer, English stopwords); "
          f"RM3: {RM3_TERMS} terms, {RM3_DOCS} documents, original query weight {RM3_ORIGINAL_WEIGHT}")


@dataclass(frozen=True)
class Collection:
    name: str
    folder: Path

    @property
    def docs(self) -> Path:
        return self.folder / "docs.jsonl"

    def topics(self) -> dict[str, str]:
        """{qid: query} in file order."""
        path = self.folder / "topics.tsv"
        return {t.query_id: t.query for t in parse_tsv(_read_text(path), str(path))}

    def qrels(self) -> dict[str, dict[str, int]]:
        import ir_measures

        path, qrels = self.folder / "qrels.txt", {}
        _read_text(path)  # a missing file is named as such, not as bad qrels
        try:
            for judgement in ir_measures.read_trec_qrels(str(path)):
                qrels.setdefault(judgement.query_id, {})[judgement.doc_id] = judgement.relevance
        except (ValueError, IndexError) as error:
            raise UserError(f"{path}: expected TREC qrels lines 'qid 0 docid relevance' ({error}).") from None
        return qrels

    def judged_topics(self) -> dict[str, str]:
        """The topics with at least one relevant document: the only ones a measure can score."""
        judged = {q for q, docs in self.qrels().items() if any(r > 0 for r in docs.values())}
        return {q: text for q, text in self.topics().items() if q in judged}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}): a collection folder holds docs.jsonl, "
                        "topics.tsv and qrels.txt.") from None


def find_collection(name_or_folder: str) -> Collection:
    """A collection by folder path, or by name in the shared collections beside the checkout."""
    folder = Path(name_or_folder)
    if not folder.is_dir():
        folder = SHARED_COLLECTIONS / name_or_folder
    missing = [f for f in ("docs.jsonl", "topics.tsv", "qrels.txt") if not (folder / f).is_file()]
    if missing:
        known = sorted(p.name for p in SHARED_COLLECTIONS.iterdir()) if SHARED_COLLECTIONS.is_dir() else []
        raise UserError(f"'{name_or_folder}' is no collection folder (missing {', '.join(missing)} in {folder}). "
                        f"Give a folder with docs.jsonl, topics.tsv and qrels.txt"
                        + (f", or one of the shared collections: {', '.join(known)}." if known else "."))
    return Collection(folder.name, folder.resolve())


def check_java() -> None:
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise UserError("the Lucene engine (pyserini) needs a Java runtime, 11 or newer, and 'java' was not found. "
                        "Install one (Debian: apt-get install openjdk-17-jre-headless) and try again.") from None
    try:
        import pyserini  # noqa: F401
    except ImportError:
        raise UserError("pyserini is not installed. Install it as the README says: pip install --no-deps "
                        "pyserini==0.22.1 pyjnius faiss-cpu onnxruntime") from None


def build_index(collection: Collection, cache: Path) -> Path:
    """The Lucene index of a collection's documents (positions and document vectors, which RM3 reads),
    built once under `cache`; a build that did not finish is started afresh."""
    index = cache / collection.name / "index"
    done = cache / collection.name / "built.json"
    stamp = {"docs": str(collection.docs), "size": collection.docs.stat().st_size, "engine": ENGINE}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return index
    source = cache / collection.name / "json"
    source.mkdir(parents=True, exist_ok=True)
    with open(collection.docs, encoding="utf-8") as docs, open(source / "docs.jsonl", "w", encoding="utf-8") as out:
        for number, line in enumerate(docs, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                    out.write(json.dumps({"id": str(record["doc_id"]), "contents": record["text"]}) + "\n")
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{collection.docs}, line {number}: expected a JSON object with doc_id and "
                                    "text.") from None
    command = [sys.executable, "-m", "pyserini.index.lucene", "--collection", "JsonCollection", "--input",
               str(source), "--index", str(index), "--generator", "DefaultLuceneDocumentGenerator", "--threads",
               str(min(4, os.cpu_count() or 1)), "--storePositions", "--storeDocvectors"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not index.is_dir():
        raise UserError(f"indexing {collection.docs} failed: {result.stderr.strip().splitlines()[-1:]}")
    done.write_text(json.dumps(stamp))
    return index


class Searcher:
    """BM25 or BM25+RM3 over one index; queries go in as {qid: text}, runs come out as {qid: {docid: score}}."""

    def __init__(self, index: Path):
        from pyserini.search.lucene import LuceneSearcher

        self.searcher = LuceneSearcher(str(index))
        self.searcher.set_bm25(BM25_K1, BM25_B)

    def search(self, queries: dict[str, str], rm3: bool = False, hits: int = HITS) -> dict[str, dict[str, float]]:
        if rm3:
            self.searcher.set_rm3(RM3_TERMS, RM3_DOCS, RM3_ORIGINAL_WEIGHT)
        else:
            self.searcher.unset_rm3()
        qids = list(queries)
        found = self.searcher.batch_search([queries[q] for q in qids], qids, k=hits,
                                           threads=min(4, os.cpu_count() or 1))
        return {q: {hit.docid: float(hit.score) for hit in found.get(q, [])} for q in qids}


def per_query(run: dict, qrels: dict, qids: list[str]) -> dict[str, np.ndarray]:
    """{measure: one value per qid, in order}; a query that retrieved nothing scores 0."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    values: dict[str, dict[str, float]] = {m: {} for m in MEASURES}
    for metric in ir_measures.iter_calc(measures, qrels, {q: run[q] for q in qids if run.get(q)}):
        values[str(metric.measure)][metric.query_id] = metric.value
    return {m: np.array([values[m].get(q, 0.0) for q in qids]) for m in MEASURES}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b over the same queries, its 95% bootstrap interval, and the two-sided p of a paired
    randomization test (sign flips of the per-query differences). One query admits no test: p is 1."""
    from scipy.stats import permutation_test

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) < 2 or np.allclose(diff, 0):
        p = 1.0
    else:
        p = float(permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                   n_resamples=BOOTSTRAP_RESAMPLES, vectorized=True, random_state=seed).pvalue)
    return {"diff": float(diff.mean()), "ci": bootstrap_ci(diff, seed), "p": p}

