"""The content-term metric on hand-made cases, and the report rows it adds (nearest neighbour, pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from qexpand import data
from qexpand.content import content_scores, content_terms
from qexpand.metrics import TEMPLATE_BASELINE, Scorer, report_markdown, score_rows

QUERY = "obama family tree"
GOLD = ("Find information on President Barack Obama's family history, including genealogy, national "
        "origins, places and dates of birth, etc.")


def test_content_terms_leave_out_query_stopwords_and_stock_phrases():
    assert content_terms(GOLD, QUERY) == {"presid", "barack", "histori", "genealog", "nation", "origin",
                                          "place", "date", "birth"}
    # Identify/documents/discuss/relevant are how topics are phrased, not what they are about.
    assert content_terms("Identify documents that discuss the Obama family. Relevant documents mention "
                         "the family tree.", QUERY) == set()


@pytest.mark.parametrize("expansion", [QUERY, TEMPLATE_BASELINE.format(query=QUERY), "OBAMA'S Family-Trees!"])
def test_title_and_template_add_nothing(expansion):
    assert content_scores(expansion, QUERY, GOLD) == (0.0, 0.0, 0.0)


def test_precision_recall_f1_by_hand():
    # Added terms: genealog, record, barack, born, cousin -> 2 of 5 in the gold (genealogy, Barack);
    # the gold has 9 content terms, so recall 2/9; stems match "genealogical" to "genealogy".
    precision, recall, f1 = content_scores("The genealogical record of Barack, born to a cousin?", QUERY, GOLD)
    assert precision == pytest.approx(2 / 5) and recall == pytest.approx(2 / 9)
    assert f1 == pytest.approx(2 * (2 / 5) * (2 / 9) / (2 / 5 + 2 / 9))


def test_off_topic_expansion_scores_zero_and_perfect_copy_scores_one():
    assert content_scores("Recipes for chocolate cake and baking times.", QUERY, GOLD) == (0.0, 0.0, 0.0)
    assert content_scores(GOLD, QUERY, GOLD) == (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def scorer():
    return Scorer()


def test_score_rows_adds_nearest_neighbour_and_paired_rows(scorer):
    train = [data.Topic("set", "1", "barack obama relatives", "Who are the relatives of Barack Obama?"),
             data.Topic("set", "2", "chocolate cake", "How is chocolate cake baked?")]
    items = [{"query": QUERY, "description": GOLD, "narrative": "Documents naming his grandparents are relevant."},
             {"query": "brownie recipe", "description": "Find recipes for chocolate brownies.", "narrative": ""}]
    predictions = {"finetuned": ["Where can I find the genealogy and birth places of Barack Obama's grandparents?",
                                 "How do I bake chocolate brownies?"],
                   "zero_shot": ["A tree.", "Brownies."]}
    report = score_rows(scorer, predictions, items, train)
    assert list(report["rows"]) == ["finetuned", "zero_shot", "nearest_neighbour", "title", "template"]
    assert set(report["paired"]) == {"finetuned_minus_template", "zero_shot_minus_template",
                                     "nearest_neighbour_minus_template", "finetuned_minus_zero_shot",
                                     "finetuned_minus_nearest_neighbour"}
    per_query = report["per_query"]
    # The nearest training query of "obama family tree" is "barack obama relatives", of the brownie
    # query the cake: of "relatives, Barack" only Barack is in the gold, of "chocolate, cake, baked"
    # only chocolate.
    assert per_query["nearest_neighbour"]["content_precision"] == pytest.approx([1 / 2, 1 / 3])
    # The narrative counts as gold for the content terms: "grandparents" is found there.
    assert per_query["finetuned"]["content_precision"][0] == pytest.approx(1.0)
    assert per_query["title"]["content_f1"] == [0.0, 0.0] and per_query["template"]["content_f1"] == [0.0, 0.0]
    paired = report["paired"]["finetuned_minus_nearest_neighbour"]["content_f1"]["mean"]
    assert paired == pytest.approx(np.mean(per_query["finetuned"]["content_f1"])
                                   - np.mean(per_query["nearest_neighbour"]["content_f1"]))
    assert "| content F1 |" in report_markdown(report)
    # The gold descriptions are embedded once for all rows; each row's SBERT score is what scoring
    # that row on its own gives.
    for row, texts in (("finetuned", predictions["finetuned"]), ("template", [TEMPLATE_BASELINE.format(query=q)
                                                                             for q in (QUERY, "brownie recipe")])):
        alone = scorer.score(texts, [i["description"] for i in items], [i["query"] for i in items],
                             [i["narrative"] for i in items])
        assert per_query[row]["sbert"] == pytest.approx(alone["sbert"].tolist(), abs=1e-6)
