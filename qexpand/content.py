"""What an expansion adds to its query: content-term precision, recall and F1 against the gold need.

An expansion helps retrieval only through the terms it adds. The content terms of a text are its
words, Porter-stemmed, minus stopwords (scikit-learn's English list), minus the words of the TREC
tracks' stock phrasing ("find information about", "relevant documents", ...) and minus the query's
own terms. Precision is the share of the expansion's content terms that occur in the content terms
of the gold description + narrative; recall the share of the gold's content terms that the expansion
has; F1 their harmonic mean. Copying the query, or wrapping it in a fixed phrase, adds no content
term and scores 0.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Words the tracks use to phrase every topic, whatever it is about: "Find information about",
# "Identify documents that discuss", "A relevant document must mention", "Describe", ...
# They say nothing about the information need, so they are never content.
STOCK_WORDS = frozenset("""
    find information identify document documents discuss discusses discussing describe describes
    description relevant relevance irrelevant mention mentions mentioned provide provides give
    gives list looking look want wants interested learn know user query search page pages site
    sites website websites web article articles report reports detail details specific example
    examples include includes including related regarding concerning discussion
""".split())
# Words of two or more letters/digits: the "s" of "Obama's" and the "u" of "U.S." are no terms.
TERM_PATTERN = re.compile(r"[a-z0-9]{2,}")
CONTENT_METRICS = ("content_f1", "content_precision", "content_recall")


@lru_cache(maxsize=1)
def _stemmer_and_stopwords():
    from nltk.stem.porter import PorterStemmer
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return PorterStemmer(), frozenset(ENGLISH_STOP_WORDS) | STOCK_WORDS


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer_and_stopwords()[0].stem(word)


def stems(text: str) -> set[str]:
    """Stems of the words of `text` that are neither stopwords nor stock words."""
    _, stop = _stemmer_and_stopwords()
    return {_stem(word) for word in TERM_PATTERN.findall(text.lower()) if word not in stop}


def content_terms(text: str, query: str) -> set[str]:
    """The stemmed content terms of `text` that its query does not already have."""
    return stems(text) - stems(query)


def content_scores(expansion: str, query: str, gold: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the expansion's content terms against the gold's; 0 where either
    side has none."""
    added, wanted = content_terms(expansion, query), content_terms(gold, query)
    hits = len(added & wanted)
    if not hits:
        return 0.0, 0.0, 0.0
    precision, recall = hits / len(added), hits / len(wanted)
    return precision, recall, 2 * precision * recall / (precision + recall)
