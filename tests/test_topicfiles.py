"""Topic files: every input form is read, bad input is one clear error with its place, and every
output is read back by the toolkits' own readers (PyTerrier, ir_datasets) or, for Anserini/pyserini
(Java), checked against the exact line format its topic readers parse."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from qexpand.errors import UserError
from qexpand.expandtopics import render
from qexpand.topicfiles import QueryShape, QueryTopic, parse_trec_sgml, read_topics

ROBUST_STYLE = """<top>
<num> Number: 301
<title> International Organized Crime

<desc> Description:
Identify organizations that participate in
international criminal activity.

<narr> Narrative:
A relevant document must name the organization.
</top>

<top lang='en'>
<num>302</num>
<title>Topic: Poliomyelitis and Post-Polio</title>
<desc>Is the disease under control?</desc>
<narr>Anything on polio.</narr>
</top>
"""

WEB_XML = """<webtrack2009>
<topic number="1" type="faceted">
  <query>obama family tree</query>
  <description>Find information on President
  Barack Obama's family history.</description>
  <subtopic number="1" type="nav">Find the TIME magazine photo essay.</subtopic>
</topic>
<topic number="2" type="single">
  <query>french lick resort and casino</query>
  <description>Find information on the casino.</description>
</topic>
</webtrack2009>
"""

RECORDS = [
    {"query_id": "301", "query": "covid: vaccine", "generated": "Which vaccines <b> work against\tcovid?\n",
     "candidates": ["Which vaccines work?", "Is there one?"], "description": "gold"},
    {"query_id": "302", "query": "hubble telescope", "generated": "", "candidates": [""]},
]


def write(tmp_path, name: str, text: str, gz: bool = False):
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return str(path)


def test_tsv_with_header_crlf_and_blank_lines(tmp_path):
    path = write(tmp_path, "q.tsv", "\ufeffqid\tquery\r\n301\tinternet   privacy\r\n\n302\thubble telescope\n", gz=True)
    assert read_topics(path) == [QueryTopic("301", "internet privacy"), QueryTopic("302", "hubble telescope")]


def test_stdin_is_a_tsv():
    assert read_topics("-", stdin=io.StringIO("a1\tsolar panels\n")) == [QueryTopic("a1", "solar panels")]


def test_trec_topics_both_styles(tmp_path):
    topics = read_topics(write(tmp_path, "t.txt", ROBUST_STYLE))
    assert topics == [
        QueryTopic("301", "International Organized Crime",
                   "Identify organizations that participate in international criminal activity."),
        QueryTopic("302", "Poliomyelitis and Post-Polio", "Is the disease under control?"),
    ]


def test_web_track_xml(tmp_path):
    topics = read_topics(write(tmp_path, "queries.xml", WEB_XML))
    assert topics[0] == QueryTopic("1", "obama family tree", "Find information on President Barack Obama's family history.")
    assert [t.query_id for t in topics] == ["1", "2"]


def test_ir_datasets_topic_set(topics_home):
    topics = read_topics("disks45/nocr/trec-robust-2004")
    assert len(topics) == 19 and topics[0].query_id == "301" and topics[0].description.startswith("What are")


@pytest.mark.parametrize("text, expected", [
    ("301\tsolar\textra\n", r"line 1: expected 'qid<TAB>query' .* found 3 field"),
    ("301\tsolar\n302 hubble\n", r"line 2: expected 'qid<TAB>query'"),
    ("301\tsolar\n\n301\tlunar\n", r"line 3: the query id '301' occurs twice \(also at line 1\)"),
    ("301\t  \n", r"line 1: topic '301' has an empty query"),
    ("3 01\tsolar\n", r"line 1: the query id '3 01' holds whitespace"),
    ("", r"holds no topics"),
    ("<top>\n<num> 1\n<title> a\n</top>\n<top>\n<num> 2\n<title> b\n", r"line 5: this <top> is never closed"),
    ("<top>\n<num> 1\n<top>\n", r"line 3: a new <top> starts before the <top> of line 1"),
    ("<top>\n<num> Number: 7\n<desc> no title\n</top>\n", r"topic at line 1: no <title>"),
    ("<title> stray\n", r"line 1: <title> outside a <top>"),
    ("<topics>\n<topic number='1'>\n<query>x</query>\n</topics>\n", r"line 4, column \d+: not well-formed XML"),
    ("<topics><topic number='9'><description>d</description></topic></topics>", r"\(id 9\): no <query>"),
    ("<html><body>hi</body></html>", r"neither TREC <top> topics nor Web track <topic>"),
])
def test_malformed_input_is_one_clear_error(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected):
        read_topics(write(tmp_path, "bad.txt", text))


def test_missing_source_and_bad_encoding(tmp_path):
    with pytest.raises(UserError, match="no such file, and no ir_datasets id either"):
        read_topics(str(tmp_path / "nothing.tsv"))
    with pytest.raises(UserError, match=r"line 2: the file is not UTF-8"):
        read_topics(str(write_bytes(tmp_path / "latin.tsv", b"1\ta\n2\tcaf\xe9\n")))


def write_bytes(path, raw: bytes):
    path.write_bytes(raw)
    return path


def test_tsv_output_read_by_pyterrier_and_in_anserini_form(tmp_path):
    import pyterrier as pt

    text = render(RECORDS, "tsv", QueryShape("query+expansion", 2))
    (tmp_path / "out.tsv").write_text(text)
    frame = pt.io.read_topics(str(tmp_path / "out.tsv"), format="singleline")
    expected = ["covid: vaccine covid: vaccine Which vaccines <b> work against covid?", "hubble telescope"]
    assert frame["qid"].tolist() == ["301", "302"] and frame["query"].tolist() == expected
    # Anserini's TsvInt/TsvStringTopicReader (pyserini --topics *.tsv): line.trim().split("\t"), id = [0], title = [1].
    lines = text.split("\n")
    assert lines[-1] == "" and [line.split("\t") for line in lines[:-1]] == [["301", expected[0]], ["302", expected[1]]]


def test_trec_output_read_by_pyterrier_ir_datasets_and_ourselves(tmp_path):
    import pyterrier as pt
    from ir_datasets.formats import TrecQueries
    from ir_datasets.util import LocalDownload

    path = tmp_path / "out.trec"
    path.write_text(render(RECORDS, "trec", QueryShape("expansion")))
    desc = "Which vaccines b work against covid?"  # '<' and '>' would read as tags: dropped
    frame = pt.io.read_topics(str(path), format="trec", whitelist=["title", "desc"])
    assert frame.to_dict("records") == [{"qid": "301", "query": f"covid: vaccine {desc}"},
                                        {"qid": "302", "query": "hubble telescope hubble telescope"}]
    parsed = list(TrecQueries(LocalDownload(path)).queries_iter())
    assert [(q.query_id, q.title, q.description) for q in parsed] == [
        ("301", "covid: vaccine", desc), ("302", "hubble telescope", "hubble telescope")]
    assert parse_trec_sgml(path.read_text(), "out.trec")[0] == QueryTopic("301", "covid: vaccine", desc)


def test_trec_output_in_anserini_line_form():
    """Anserini's TrecTopicReader: id after the first ':' of the <num> line, title after the first ':' of
    the <title> line, description = the lines between the <desc> line and the line starting <narr>."""
    lines = render(RECORDS[:1], "trec", QueryShape("expansion")).split("\n")
    assert lines[:10] == ["<top>", "<num> Number: 301", "<title> Topic: covid: vaccine", "", "<desc> Description:",
                          "Which vaccines b work against covid?", "", "<narr> Narrative:", "", "</top>"]
    assert lines[2].split(":", 1)[1].strip() == "covid: vaccine"


def test_jsonl_output_keeps_every_candidate():
    records = [json.loads(line) for line in render(RECORDS, "jsonl", QueryShape("expansion")).splitlines()]
    assert records[0]["candidates"] == RECORDS[0]["candidates"] and records[0]["description"] == "gold"
    assert records[0]["expanded_query"] == "Which vaccines <b> work against covid?"
    assert records[1]["expanded_query"] == "hubble telescope"  # an empty expansion falls back to the query


def test_tsv_refuses_ids_pyterrier_would_misread():
    with pytest.raises(UserError, match="'a:1' holds a colon"):
        render([{**RECORDS[1], "query_id": "a:1"}], "tsv", QueryShape("expansion"))


def test_query_weight_repeats_the_query_for_its_share_of_the_words():
    from qexpand.topicfiles import query_repeats, term_count

    query, expansion = "dam removal", "Which dams were removed from rivers with fish?"
    assert (term_count(query), term_count(expansion)) == (2, 4)  # stopwords and one-letter words do not count
    assert query_repeats(query, expansion, 0.5) == 2 and query_repeats(query, expansion, 0.75) == 6
    assert query_repeats(query, "fish", 0.5) == 1  # never fewer than once
    assert QueryShape("query+expansion", 1, 0.5).query(query, expansion) == f"{query} {query} {expansion}"
    assert QueryShape("query+expansion", 3).query(query, expansion) == f"{query} {query} {query} {expansion}"


def test_the_shape_in_force_takes_each_given_option_else_the_recipes():
    from qexpand.config import TestConfig
    from qexpand.recipes import DEFAULT_FEEDBACK_TERMS, EXPANSION, expansion_shape

    retrieval, default = EXPANSION["retrieval"], EXPANSION["default"]

    def shape(recipe: dict, **given) -> QueryShape:
        return expansion_shape(recipe, TestConfig(**given))

    assert shape(retrieval) == QueryShape("feedback", 1, 0.65, 50, "sbert")
    assert shape(retrieval, feedback_terms=10, query_weight=0.3) == QueryShape("feedback", 1, 0.3, 10, "sbert")
    assert shape(retrieval, term_relatedness="none", sbert_model="M") == QueryShape("feedback", 1, 0.65, 50, "none", "M")
    # a repetition given sets the recipe's share aside; a pasting form keeps no feedback terms nor relatedness
    assert shape(retrieval, query_form="query+expansion", repeat_query=3) == QueryShape("query+expansion", 3, 0.0, 0)
    assert shape(retrieval, query_form="query+expansion") == QueryShape("query+expansion", 1, 0.65, 0)
    assert shape(default) == QueryShape("query+expansion", 1, 0.0, 0)
    # feedback asked of a run that pastes: the query keeps the retrieval recipe's share and relatedness, not
    # the pasting 0 and none
    assert shape(default, query_form="feedback") == QueryShape("feedback", 1, 0.65, DEFAULT_FEEDBACK_TERMS, "sbert")
    given = QueryShape("feedback", 1, 0.2, DEFAULT_FEEDBACK_TERMS, "none")
    assert shape(default, query_form="feedback", query_weight=0.2, term_relatedness="none") == given
