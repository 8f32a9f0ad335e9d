"""A feedback model over sampled expansions: weigh the terms of several generated texts, then the query.

Pasting sampled expansions after the query weighs each word by how often the samples happen to write
it, so one rambling sample outweighs three terse ones, and a word that only one sample made up counts
as much as one they all agree on. Here, as in generative relevance feedback, the samples are treated
as feedback documents of equal prior: a term's feedback weight is its share of each sample's content
words, averaged over the samples (a relevance model with uniform document scores), so a term that most
samples use weighs most. The strongest terms are kept, their weights normalised, and the result is
interpolated with the query itself, which keeps `query_weight` of the total whatever the samples say.

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

from qexpand.content import _stem, _stemmer_and_stopwords

WORD = re.compile(r"[^\W_]+")
WEIGHT_UNITS = 100  # the counts of a written query add up to about this many words


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def content_words(text: str) -> list[tuple[str, str]]:
    """(stem, word) for each content word of `text`, in order: no stopword, stock word or single letter."""
    _, stop = _stemmer_and_stopwords()
    return [(_stem(w), w) for w in _words(text) if len(w) > 1 and w not in stop]


def feedback_weights(samples: list[str], terms: int) -> dict[str, float]:
    """{word: weight} of the `terms` strongest feedback terms of the samples, weights summing to 1.

    A term's weight is its share of a sample's content words, averaged over all samples (an empty sample
    adds nothing, but counts); ties go to the term seen first."""
    weight: dict[str, float] = defaultdict(float)
    surface: dict[str, Counter] = defaultdict(Counter)
    for sample in samples:
        words = content_words(sample)
        for stem, count in Counter(s for s, _ in words).items():
            weight[stem] += count / len(words) / len(samples)
        for stem, word in words:
            surface[stem][word] += 1
    strongest = sorted(weight, key=lambda s: -weight[s])[:terms]  # sorted() is stable: first seen wins ties
    total = sum(weight[s] for s in strongest)
    return {surface[s].most_common(1)[0][0]: weight[s] / total for s in strongest} if total else {}


def query_weights(query: str) -> dict[str, float]:
    """{word: weight} of the query's own words, summing to 1: its content words, or every word of a
    query made of stopwords only ("the who")."""
    words = [w for _, w in content_words(query)] or [w for w in _words(query)]
    counts = Counter(words)
    return {w: c / len(words) for w, c in counts.items()}


def weighted_query(query: str, samples: list[str], terms: int, query_weight: float) -> dict[str, float]:
    """query_weight x the query's words + (1 - query_weight) x the samples' feedback terms."""
    return _interpolated(query, feedback_weights(samples, terms), query_weight)


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


def feedback_query(query: str, samples: list[str], terms: int, query_weight: float) -> str:
    """The query and its samples' feedback model as one bag-of-words query text; the query alone when
    the samples hold no content word."""
    feedback = feedback_weights(samples, terms)  # empty exactly when no sample has a content word
    return bag_of_words(_interpolated(query, feedback, query_weight)) if feedback else query

