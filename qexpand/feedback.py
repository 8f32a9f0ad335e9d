"""A feedback model over sampled expansions: weigh the terms of several generated texts, then the query.

Pasting sampled expansions after the query weighs each word by how often the samples happen to write
it, so one rambling sample outweighs three terse ones, and a word that only one sample made up counts
as much as one they all agree on. Here, as in generative relevance feedback, the samples are treated
as feedback documents of equal prior: a term's feedback weight is its share of each sample's content
words, averaged over the samples (a relevance model with uniform document scores), so a term that most
samples use weighs most. The strongest terms are kept, their weights normalised, and the result is
interpolated with the query itself, which keeps `query_weight` of the total whatever the samples say.

The samples also agree on words that say little about the topic ("effects", "factors", "various"). With a
relatedness model (SBERT: `SbertRelatedness`), a term's weight is multiplied by its cosine with the query
(0 where negative) before the strongest terms are chosen, so the samples' topical terms outweigh their
stock ones. On the shared collections this added about 0.006 nDCG@10 and 0.005 MAP to each of four sample
sets of fine-tuned models and nothing to the base models' (bench/RESULTS.md).

Content words are lower-cased words minus English stopwords and the tracks' stock phrasing ("relevant",
"documents", ...: qexpand.content), grouped by Porter stem and written in their most frequent surface
form. The weighted query is written as a bag of words in which a term's count is its weight (at a
resolution of `WEIGHT_UNITS` counts for the whole): Lucene (Anserini's bag-of-words query, as pyserini
runs a text query) and Terrier both weigh a term repeated k times k-fold, so the text runs as the
weighted query it stands for, RM3 included.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import lru_cache

from qexpand.content import _stem, _stemmer_and_stopwords

WORD = re.compile(r"[^\W_]+")
WEIGHT_UNITS = 100  # the counts of a written query add up to about this many words
# (query, words) -> how related each word is to the query, as a number <= 1 (a cosine)
Relatedness = Callable[[str, list[str]], Sequence[float]]


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def content_words(text: str) -> list[tuple[str, str]]:
    """(stem, word) for each content word of `text`, in order: no stopword, stock word or single letter."""
    _, stop = _stemmer_and_stopwords()
    return [(_stem(w), w) for w in _words(text) if len(w) > 1 and w not in stop]


def feedback_weights(samples: list[str], terms: int,
                     related: Callable[[list[str]], Sequence[float]] | None = None) -> dict[str, float]:
    """{word: weight} of the `terms` strongest feedback terms of the samples, weights summing to 1.

    A term's weight is its share of a sample's content words, averaged over all samples (an empty sample
    adds nothing, but counts), times its relatedness to the query where `related` gives one (0 below 0);
    ties go to the term seen first."""
    weight: dict[str, float] = defaultdict(float)
    surface: dict[str, Counter] = defaultdict(Counter)
    for sample in samples:
        words = content_words(sample)
        for stem, count in Counter(s for s, _ in words).items():
            weight[stem] += count / len(words) / len(samples)
        for stem, word in words:
            surface[stem][word] += 1
    written = {stem: surface[stem].most_common(1)[0][0] for stem in weight}
    if related is not None and weight:
        stems = list(weight)
        for stem, relatedness in zip(stems, related([written[s] for s in stems])):
            weight[stem] *= max(0.0, float(relatedness))
    strongest = sorted(weight, key=lambda s: -weight[s])[:terms]  # sorted() is stable: first seen wins ties
    total = sum(weight[s] for s in strongest)
    return {written[s]: weight[s] / total for s in strongest if weight[s] > 0} if total else {}


def query_weights(query: str) -> dict[str, float]:
    """{word: weight} of the query's own words, summing to 1: its content words, or every word of a
    query made of stopwords only ("the who")."""
    words = [w for _, w in content_words(query)] or [w for w in _words(query)]
    counts = Counter(words)
    return {w: c / len(words) for w, c in counts.items()}


def title_length(query: str) -> int:
    """How many distinct content words the query has (all its distinct words if none is one): the
    length by which short keyword titles, where RM3 over the expansion beats the expansion alone, are
    told from longer requests, where RM3 drifts (bench/RESULTS.md)."""
    return max(1, len(query_weights(query)))


def weighted_query(query: str, samples: list[str], terms: int, query_weight: float,
                   relatedness: Relatedness | None = None) -> dict[str, float]:
    """query_weight x the query's words + (1 - query_weight) x the samples' feedback terms."""
    return _interpolated(query, _feedback(query, samples, terms, relatedness), query_weight)


def _feedback(query: str, samples: list[str], terms: int, relatedness: Relatedness | None) -> dict[str, float]:
    related = None if relatedness is None else (lambda words: relatedness(query, words))
    return feedback_weights(samples, terms, related)


def _interpolated(query: str, feedback: dict[str, float], query_weight: float) -> dict[str, float]:
    combined: dict[str, float] = defaultdict(float)
    for word, w in query_weights(query).items():
        combined[word] += query_weight * w
    for word, w in feedback.items():
        combined[word] += (1 - query_weight) * w
    return dict(combined)


def bag_of_words(weights: dict[str, float], units: int = WEIGHT_UNITS) -> str:
    """The weighted query as text: each word repeated round(weight x units) times (at least once),
    heaviest first."""
    order = sorted(weights, key=lambda w: -weights[w])
    return " ".join(" ".join([w] * max(1, round(weights[w] * units))) for w in order)


def feedback_query(query: str, samples: list[str], terms: int, query_weight: float,
                   relatedness: Relatedness | None = None) -> str:
    """The query and its samples' feedback model as one bag-of-words query text; the query alone when
    the samples hold no content word (or none related to the query)."""
    feedback = _feedback(query, samples, terms, relatedness)  # empty exactly when no term keeps a weight
    return bag_of_words(_interpolated(query, feedback, query_weight)) if feedback else query


class SbertRelatedness:
    """The cosine of each word with the query under a sentence-transformers model (the test script's SBERT
    model by default). A query's words are embedded together, in sorted order, so a query's weights do not
    depend on which queries came before it or in which process it is formed."""

    def __init__(self, model: str | None = None):
        from qexpand.metrics import load_sbert

        self.model = load_sbert(model, "cpu")

    def _embed(self, texts: list[str]):
        return self.model.encode(texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)

    def __call__(self, query: str, words: list[str]) -> list[float]:
        if not words:
            return []
        order = sorted(set(words))
        cosines = dict(zip(order, (self._embed(order) @ self._embed([query])[0]).tolist()))
        return [cosines[w] for w in words]


@lru_cache(maxsize=2)
def sbert_relatedness(model: str | None = None) -> SbertRelatedness:
    """One SbertRelatedness per model and process, loaded when a query first needs it."""
    return SbertRelatedness(model)
