"""Topic files in and out: read the queries to expand, write the expanded queries for retrieval toolkits.

Read: a TSV (`qid<TAB>query`), a TREC topic file (`<top> <num> Number: N <title> ...`), a TREC Web
track XML file (`<topic number="N"><query>...`), either optionally gzipped, an ir_datasets topic-set
id, or '-' for a TSV on standard input. Write:
- tsv: `qid<TAB>query`, one topic a line, no header. pyserini's `--topics FILE.tsv` (Anserini's
  TsvInt/TsvStringTopicReader: split on the tab, trim) and PyTerrier's
  `pt.io.read_topics(FILE, format="singleline")` (qid up to the first space or colon) read it as it
  is, because queries hold no tab or newline and qids no whitespace, colon or leading '#'.
- trec: `<top> <num> <title> <desc> <narr> </top>` with the expansion as the description.
- jsonl: one record a topic with the chosen expansion, every candidate and the expanded query.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from qexpand import data
from qexpand.config import QUERY_FORMS, STDIO, TERM_RELATEDNESS
from qexpand.errors import UserError
from qexpand.runfiles import atomic_write_text

TSV_HEADERS = {("qid", "query"), ("query_id", "query"), ("id", "query"), ("qid", "text"), ("query_id", "text")}
SGML_TAG = re.compile(r"<(/?)(top|num|title|desc|narr)\b[^>]*>", re.IGNORECASE)
# Labels that TREC topic files put after a tag (TREC-1 style "Topic:"); ir_datasets drops them too.
FIELD_LABELS = {"num": "Number:", "title": "Topic:", "desc": "Description:", "narr": "Narrative:"}


@dataclass(frozen=True)
class QueryTopic:
    query_id: str
    query: str
    description: str = ""  # the topic's own description where the source has one: the gold for the retrieval check


def read_topics(source: str, stdin=None) -> list[QueryTopic]:
    """The topics of a file, of standard input ('-', a TSV), or of an ir_datasets topic-set id."""
    if source == STDIO:
        return parse_tsv((stdin or sys.stdin).read(), "standard input")
    path = Path(source)
    if path.is_file():
        return parse_topic_text(_read_text(path), str(path))
    if path.exists():
        raise UserError(f"{source} is a folder; give a topic file, '-' for standard input, or an ir_datasets id.")
    import ir_datasets

    if source not in ir_datasets.registry:
        raise UserError(
            f"{source}: no such file, and no ir_datasets id either. Give a TSV file (qid<TAB>query), a TREC "
            f"topic file, '-' to read a TSV from standard input, or an ir_datasets topic-set id such as "
            f"'{data.DEFAULT_DATASETS[1]}'."
        )
    # ir_datasets logs every failed download try; the UserError of qexpand.data says it once.
    logging.getLogger("ir_datasets").setLevel(logging.ERROR)
    return [QueryTopic(t.query_id, t.query, t.description)
            for t in data.load_topics(source, require_description=False)]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise UserError(f"{path} looks gzipped but could not be unpacked ({error}).") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark would otherwise stick to the first query id
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: the file is not UTF-8 text ({error.reason}); "
                        "save it as UTF-8.") from None


def parse_topic_text(text: str, name: str) -> list[QueryTopic]:
    """Topics of a file's text, its form told by its start: XML <topic>, TREC <top>, else TSV."""
    if not text.lstrip().startswith("<"):
        return parse_tsv(text, name)
    if re.search(r"<topic[\s>]", text):
        return parse_trec_xml(text, name)
    if SGML_TAG.search(text):
        return parse_trec_sgml(text, name)
    raise UserError(
        f"{name} starts with '<' but holds neither TREC <top> topics nor Web track <topic> elements. "
        "Give a TREC topic file or a TSV of qid<TAB>query lines."
    )


def _add(topics: dict[str, tuple[QueryTopic, str]], topic: QueryTopic, name: str, where: str) -> None:
    """Add one topic after checking what the writers and toolkits need of it."""
    if not topic.query_id:
        raise UserError(f"{name}, {where}: the query id is empty.")
    if re.search(r"\s", topic.query_id):
        raise UserError(f"{name}, {where}: the query id '{topic.query_id}' holds whitespace; toolkits "
                        "split qid and query at the first space, so use an id without spaces.")
    if not topic.query:
        raise UserError(f"{name}, {where}: topic '{topic.query_id}' has an empty query.")
    if topic.query_id in topics:
        raise UserError(f"{name}, {where}: the query id '{topic.query_id}' occurs twice (also at "
                        f"{topics[topic.query_id][1]}); query ids must be unique.")
    topics[topic.query_id] = (topic, where)


def parse_tsv(text: str, name: str) -> list[QueryTopic]:
    topics: dict[str, tuple[QueryTopic, str]] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(
                f"{name}, line {number}: expected 'qid<TAB>query' (two fields, one tab between them) but "
                f"found {len(fields)} field(s): {line[:80]!r}. A TREC topic file must start with <top>; "
                "a tab inside a query must be replaced by a space."
            )
        qid, query = fields[0].strip(), data.normalise_whitespace(fields[1])
        if not topics and (qid.lower(), query.lower()) in TSV_HEADERS:
            continue  # a header line
        _add(topics, QueryTopic(qid, query), name, f"line {number}")
    return _checked_list(topics, name)


def _checked_list(topics: dict[str, tuple[QueryTopic, str]], name: str) -> list[QueryTopic]:
    if not topics:
        raise UserError(f"{name} holds no topics.")
    return [topic for topic, _ in topics.values()]


def _field_text(tag: str, text: str) -> str:
    text = data.normalise_whitespace(text)
    label = FIELD_LABELS[tag]
    return text[len(label):].strip() if text.lower().startswith(label.lower()) else text


def parse_trec_sgml(text: str, name: str) -> list[QueryTopic]:
    """TREC ad hoc topics: a field runs from its tag to the next tag; closing tags are optional but </top>."""
    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    topics: dict[str, tuple[QueryTopic, str]] = {}
    opened, fields, current = None, {}, None
    for match in SGML_TAG.finditer(text):
        closing, tag = match.group(1) == "/", match.group(2).lower()
        if current is not None:
            fields[current[0]] = text[current[1]:match.start()]
            current = None
        if tag == "top" and not closing:
            if opened is not None:
                raise UserError(f"{name}, line {line_of(match.start())}: a new <top> starts before the "
                                f"<top> of line {line_of(opened)} was closed by </top>.")
            opened, fields = match.start(), {}
        elif opened is None:
            raise UserError(f"{name}, line {line_of(match.start())}: <{match.group(1)}{tag}> outside a "
                            "<top> ... </top> topic.")
        elif tag == "top":
            where = f"topic at line {line_of(opened)}"
            for needed in ("num", "title"):
                if not _field_text(needed, fields.get(needed, "")):
                    raise UserError(f"{name}, {where}: no <{needed}> or an empty one; every topic needs "
                                    "<num> and <title>.")
            _add(topics, QueryTopic(_field_text("num", fields["num"]), _field_text("title", fields["title"]),
                                    _field_text("desc", fields.get("desc", ""))), name, where)
            opened = None
        elif not closing:
            current = (tag, match.end())
    if opened is not None:
        raise UserError(f"{name}, line {line_of(opened)}: this <top> is never closed by </top>.")
    return _checked_list(topics, name)


def parse_trec_xml(text: str, name: str) -> list[QueryTopic]:
    """TREC Web track topics: <topic number="N"><query>...</query><description>...</description>."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        line, column = error.position
        raise UserError(f"{name}, line {line}, column {column}: not well-formed XML ({error.msg}).") from None

    def child_text(element, tags) -> str:
        found = next((element.find(t) for t in tags if element.find(t) is not None), None)
        return data.normalise_whitespace("".join(found.itertext())) if found is not None else ""

    topics: dict[str, tuple[QueryTopic, str]] = {}
    for number, element in enumerate(root.iter("topic"), start=1):
        qid = (element.get("number") or child_text(element, ("number",))).strip()
        where = f"<topic> number {number} in the file" + (f" (id {qid})" if qid else "")
        query = child_text(element, ("query", "title"))
        if not query:
            raise UserError(f"{name}, {where}: no <query> or <title> element, or an empty one.")
        _add(topics, QueryTopic(qid, query, child_text(element, ("description", "desc", "question"))), name, where)
    return _checked_list(topics, name)


WORD = re.compile(r"[a-z0-9]{2,}")


def term_count(text: str) -> int:
    """Words of a text that a search engine keeps: two or more letters or digits, English stopwords left out."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return sum(word not in ENGLISH_STOP_WORDS for word in WORD.findall(text.lower()))


def query_repeats(query: str, expansion: str, query_weight: float) -> int:
    """How often to repeat the query before the expansion so that the query's words make up about
    `query_weight` of the words of the whole (at least once). A bag-of-words engine (Lucene, Terrier)
    weighs a word by how often the query holds it, so this weighs the query against the expansion as
    RM3 weighs the original query against its feedback terms, whatever the two lengths."""
    ratio = query_weight / (1 - query_weight) * term_count(expansion) / max(term_count(query), 1)
    return max(1, round(ratio))


@dataclass(frozen=True)
class QueryShape:
    """How a query and its expansion become the one query a toolkit runs: the test script's --query-form,
    --repeat-query, --query-weight, --feedback-terms and --term-relatedness (with its --sbert-model),
    decided once and passed on together."""

    form: str = "query+expansion"  # one of QUERY_FORMS
    repeat: int = 1  # times the query precedes a pasted expansion
    query_weight: float = 0.0  # the query's share of the words pasted (above 0: instead of repeat) or of the weights
    feedback_terms: int = 0  # the candidates' strongest terms in the feedback form
    relatedness: str = "none"  # one of TERM_RELATEDNESS: what else weighs a feedback term
    sbert_model: str | None = None  # the SBERT model of relatedness "sbert" (None: the default one)

    @classmethod
    def of(cls, config) -> QueryShape:
        """The shape a (settled) TestConfig asks for."""
        return cls(config.query_form, config.repeat_query, config.query_weight, config.feedback_terms,
                   config.term_relatedness or "none", config.sbert_model)

    def problems(self) -> list[str]:
        problems = []
        if self.form not in QUERY_FORMS:
            problems.append(f"the query form '{self.form}' is none of {', '.join(QUERY_FORMS)}")
        if self.form == "feedback" and self.feedback_terms < 1:
            problems.append(f"the feedback form needs at least one feedback term (got {self.feedback_terms})")
        if self.repeat < 0:
            problems.append(f"the query repetition {self.repeat} is negative")
        if not 0 <= self.query_weight < 1:
            problems.append(f"the query weight {self.query_weight} is outside [0, 1)")
        if self.relatedness not in TERM_RELATEDNESS:
            problems.append(f"the term relatedness '{self.relatedness}' is none of {', '.join(TERM_RELATEDNESS)}")
        return problems

    def query(self, query: str, expansion: str, candidates: list[str] | None = None) -> str:
        """The query a toolkit should run: the query `repeat` times (or as often as `query_weight` asks,
        when above 0), then the expansion; an empty expansion falls back to the query itself. The feedback
        form weighs the `feedback_terms` strongest terms of the candidates (the expansion alone without
        them) against the query, which keeps `query_weight` of the weight; with relatedness "sbert" a term's
        weight is also multiplied by its SBERT cosine with the query."""
        query, expansion = data.normalise_whitespace(query), data.normalise_whitespace(expansion)
        if not expansion:
            return query
        if self.form == "feedback":
            from qexpand.feedback import feedback_query, sbert_relatedness

            related = sbert_relatedness(self.sbert_model) if self.relatedness == "sbert" else None
            return feedback_query(query, candidates or [expansion], self.feedback_terms, self.query_weight, related)
        if self.form == "expansion":
            return expansion
        repeat = query_repeats(query, expansion, self.query_weight) if self.query_weight else self.repeat
        return " ".join([query] * repeat + [expansion])


def check_tsv_ids(query_ids: list[str]) -> None:
    for qid in query_ids:
        if ":" in qid or qid.startswith("#"):
            raise UserError(f"the query id '{qid}' holds a colon or starts with '#': PyTerrier's singleline "
                            "reader would misread it. Rename the topic, or write --format trec or jsonl.")


def candidate_texts(record: dict) -> list[str]:
    """The sampled candidates of an expansion record (strings, or dicts with their text)."""
    return [c["text"] if isinstance(c, dict) else c for c in record.get("candidates") or []]


def tsv_text(rows: list[tuple[str, str]]) -> str:
    """qid<TAB>query lines, no header; the query on one line, never empty."""
    check_tsv_ids([qid for qid, _ in rows])
    return "".join(f"{qid}\t{data.normalise_whitespace(text)}\n" for qid, text in rows)


def _sgml_safe(text: str) -> str:
    # A '<' would read as a tag to every TREC topic reader; no escaping convention is shared between them.
    return data.normalise_whitespace(text.replace("<", " ").replace(">", " "))


def trec_text(rows: list[tuple[str, str, str]]) -> str:
    """TREC topics (qid, title, description): one field a line, as Anserini's TrecTopicReader reads them.

    The title carries the TREC-1 label "Topic:" because Anserini keeps only what follows the first
    colon of the title line; PyTerrier and ir_datasets drop the label.
    """
    return "".join(
        f"<top>\n<num> Number: {qid}\n<title> Topic: {_sgml_safe(title)}\n\n<desc> Description:\n"
        f"{_sgml_safe(description)}\n\n<narr> Narrative:\n\n</top>\n\n"
        for qid, title, description in rows
    )


def jsonl_text(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_output(text: str, out: str) -> None:
    """To standard output for '-', else atomically (temporary file, then rename)."""
    if out == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(Path(out), text)
