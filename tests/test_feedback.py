"""The feedback form: the samples' terms weighed as specified, the query kept, and Lucene running the
written bag of words as the weighted query it stands for."""

from __future__ import annotations

import pytest

from qexpand import feedback, retrieval
from qexpand.topicfiles import QueryShape
from tests.test_retrieval_bench import small_collection  # noqa: F401 (a fixture)

SAMPLES = ["Habitat, species and habitat.", "The habitat."]


def test_a_term_weighs_its_share_of_each_sample_averaged_over_the_samples():
    # Content words: sample 1 (habitat, species, habitat): habitat 2/3, species 1/3; sample 2 (habitat): 1.
    weights = feedback.feedback_weights(SAMPLES, terms=5)
    assert weights == pytest.approx({"habitat": (2 / 3 + 1) / 2, "species": (1 / 3) / 2})
    assert feedback.feedback_weights(SAMPLES, terms=1) == {"habitat": 1.0}  # the strongest, normalised again
    # An empty sample counts as a sample that says nothing: it halves every weight before normalising.
    assert feedback.feedback_weights(SAMPLES + ["", ""], terms=5) == pytest.approx(weights)


def test_the_query_keeps_its_share_whatever_the_samples_say():
    weights = feedback.weighted_query("jaguar", SAMPLES, terms=5, query_weight=0.6)
    assert weights == pytest.approx({"jaguar": 0.6, "habitat": 0.4 * 5 / 6, "species": 0.4 / 6})
    # Samples that never name the query still leave it its share; a query term they use adds up.
    assert feedback.weighted_query("habitat loss", ["habitat"], 5, 0.5) == pytest.approx({"habitat": 0.75, "loss": 0.25})
    text = feedback.feedback_query("jaguar", SAMPLES, terms=5, query_weight=0.6)
    assert text.split().count("jaguar") == 60 and text.split().count("habitat") == 33 and text.split().count("species") == 7
    # No content word in any sample: the query as it is.
    assert feedback.feedback_query("the jaguar", ["", "The and of."], 5, 0.6) == "the jaguar"
    assert QueryShape("feedback", 1, 0.6, 5).query("jaguar", "joined text", SAMPLES) == text


def test_stock_phrasing_and_stopwords_are_no_feedback_terms():
    weights = feedback.feedback_weights(["Relevant documents must discuss the habitat of jaguars."], terms=10)
    assert set(weights) == {"habitat", "jaguars"}


def test_lucene_runs_the_written_bag_of_words_as_the_weighted_query(small_collection, tmp_path):  # noqa: F811
    """Distractors repeat the title; the samples' terms find the relevant sense, unless the query's share
    is so high that the title dominates again."""
    searcher = retrieval.Searcher(retrieval.build_index(small_collection, tmp_path / "indexes"))
    topics, qrels = small_collection.judged_topics(), small_collection.qrels()
    samples = ["Its habitat and the species.", "Species of the habitat.", "A habitat note."]

    def mean_ap(queries):
        return retrieval.per_query(searcher.search(queries), qrels, list(topics))["AP"].mean()

    title = mean_ap(topics)
    weighted = mean_ap({q: feedback.feedback_query(t, samples, 5, 0.5) for q, t in topics.items()})
    title_heavy = mean_ap({q: feedback.feedback_query(t, samples, 5, 0.95) for q, t in topics.items()})
    assert title < 0.6 and weighted > 0.95 and title_heavy < weighted
    # The written counts are the weights: every word twice scores every document twice as high (up to the
    # 4 decimals that Anserini keeps of a score), and one word twice doubles that word's part only.
    once = searcher.search({"1": "jaguar habitat species"})["1"]
    twice = searcher.search({"1": "jaguar jaguar habitat habitat species species"})["1"]
    assert once.keys() == twice.keys() and all(twice[d] == pytest.approx(2 * once[d], abs=2e-4) for d in once)
    title, title_twice = searcher.search({"1": "jaguar"})["1"], searcher.search({"1": "jaguar jaguar habitat species"})["1"]
    assert twice["d0-0"] == pytest.approx(2 * title["d0-0"], abs=2e-4)  # distractors hold "jaguar" only
    assert title_twice["r0-0"] == pytest.approx(once["r0-0"] + title["r0-0"], abs=2e-4)


def test_relatedness_multiplies_each_terms_weight_before_the_strongest_are_chosen():
    # species is related twice as much as habitat: (5/6 x 0.25) against (1/6 x 0.5) -> 5/7 and 2/7
    def related(query, words):
        assert query == "jaguar"
        return [{"habitat": 0.25, "species": 0.5, "zoo": -0.3}[w] for w in words]

    weights = feedback.weighted_query("jaguar", SAMPLES, terms=5, query_weight=0.6, relatedness=related)
    assert weights == pytest.approx({"jaguar": 0.6, "habitat": 0.4 * 5 / 7, "species": 0.4 * 2 / 7})
    # A term unrelated to the query (cosine at or below 0) has no weight, even as the samples' strongest.
    weights = feedback.weighted_query("jaguar", ["zoo zoo zoo species"], terms=5, query_weight=0.6, relatedness=related)
    assert weights == pytest.approx({"jaguar": 0.6, "species": 0.4})
    # With only unrelated terms the query is left as it is.
    assert feedback.feedback_query("jaguar", ["zoo"], 5, 0.6, related) == "jaguar"


def test_sbert_relatedness_ranks_topical_words_above_stock_ones_and_does_not_depend_on_order():
    related = feedback.sbert_relatedness()  # all-MiniLM-L6-v2, the package beside requirements.txt
    words = ["cholesterol", "tumor", "effects", "various", "oncology"]
    cosines = dict(zip(words, related("breast cancer and cholesterol", words)))
    assert min(cosines["cholesterol"], cosines["tumor"], cosines["oncology"]) > max(cosines["effects"],
                                                                                        cosines["various"])
    # A query's words are embedded together in sorted order: the same numbers in any order, and again.
    assert related("breast cancer and cholesterol", words[::-1]) == [cosines[w] for w in words[::-1]]
    assert feedback.sbert_relatedness() is related  # loaded once per process
    # and the test script's scorer holds the same model (one copy in memory), as a name or as the default
    from qexpand.metrics import Scorer, default_sbert_model

    assert Scorer().sbert is related.model and Scorer(default_sbert_model()).sbert is related.model
    shape = QueryShape("feedback", 1, 0.7, 5, "sbert")
    samples = ["Various effects of cholesterol on breast tumor growth.", "Cholesterol and breast tumor cells."]
    bag = shape.query("breast cancer and cholesterol", "joined", samples).split()
    assert bag.count("tumor") > bag.count("effects") and bag.count("cholesterol") > bag.count("tumor")
