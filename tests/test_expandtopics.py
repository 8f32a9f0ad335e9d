"""The resumable expansion driver: a killed run continues without regenerating what it wrote, a torn
journal line is dropped, outputs are atomic, and '-' in and out works in a pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qexpand.errors import UserError
from qexpand.expandtopics import expand_topics, journal_path, rm3_split_paths
from qexpand.topicfiles import QueryShape, QueryTopic

REPO = Path(__file__).resolve().parent.parent
TOPICS = [QueryTopic(str(300 + i), f"subject {i}") for i in range(10)]

# A child process that expands TOPICS in batches of 2, slowly after its first batch, so it can be killed mid-run.
CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from qexpand.expandtopics import expand_topics
from qexpand.topicfiles import QueryTopic
calls = []
def slow(queries):
    calls.append(queries)
    if len(calls) > 1:
        time.sleep(30)
    return [("about " + q, ["about " + q]) for q in queries]
expand_topics([QueryTopic(str(300 + i), f"subject {{i}}") for i in range(10)], slow, {out!r}, batch_size=2)
"""


class Recorder:
    """An expand_batch that records which queries it was asked to expand."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, queries):
        self.asked += queries
        return [(f"about {q}", [f"about {q}", "other"]) for q in queries]


def journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in journal_path(str(out)).read_text().splitlines()]


def test_killed_run_resumes_without_regenerating(tmp_path):
    out = tmp_path / "expanded.tsv"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), out=str(out))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (journal_path(str(out)).exists() and len(journal_lines(out)) >= 3):
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    written = [r["query_id"] for r in journal_lines(out)[1:]]
    assert written == ["300", "301"] and not out.exists()

    again = Recorder()
    records = expand_topics(TOPICS, again, str(out), batch_size=2)
    assert again.asked == [f"subject {i}" for i in range(2, 10)]
    assert [r["query_id"] for r in records] == [t.query_id for t in TOPICS]
    assert out.read_text().splitlines()[0] == "300\tsubject 0 about subject 0"
    assert len(out.read_text().splitlines()) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expanded.journal.jsonl", "expanded.tsv"]


def test_torn_last_line_is_dropped_and_regenerated(tmp_path):
    out = tmp_path / "expanded.jsonl"
    expand_topics(TOPICS[:4], Recorder(), str(out), output_format="jsonl", batch_size=2)
    journal = journal_path(str(out))
    journal.write_bytes(journal.read_bytes()[:-25])  # the last record cut mid-line, as by a kill during a write
    again = Recorder()
    records = expand_topics(TOPICS[:5], again, str(out), output_format="jsonl", batch_size=2)
    assert again.asked == ["subject 3", "subject 4"]
    assert [json.loads(line)["query_id"] for line in out.read_text().splitlines()] == [t.query_id for t in TOPICS[:5]]
    assert records[0]["candidates"] == ["about subject 0", "other"]
    assert [r.get("query_id") for r in journal_lines(out)[1:]] == ["300", "301", "302", "303", "304"]


def test_rewriting_another_format_costs_no_generation(tmp_path):
    expand_topics(TOPICS[:3], Recorder(), str(tmp_path / "x.tsv"))
    again = Recorder()
    expand_topics(TOPICS[:3], again, str(tmp_path / "x.tsv"), shape=QueryShape("expansion"))
    expand_topics(TOPICS[:3], again, str(tmp_path / "x.trec"), output_format="trec")
    assert again.asked == [] and (tmp_path / "x.tsv").read_text().startswith("300\tabout subject 0\n")
    assert (tmp_path / "x.trec").read_text().startswith("<top>\n<num> Number: 300\n")


def test_journal_of_other_topics_or_settings_is_refused(tmp_path):
    out = str(tmp_path / "x.tsv")
    expand_topics(TOPICS[:2], Recorder(), out, settings={"run": "a", "datasets": ("x", "y")})
    before = (tmp_path / "x.tsv").read_text()
    with pytest.raises(UserError, match="written with other settings"):
        expand_topics(TOPICS[:2], Recorder(), out, settings={"run": "b"})
    with pytest.raises(UserError, match="holds topic '300' with the query 'subject 0'"):
        expand_topics([QueryTopic("300", "lunar eclipse")], Recorder(), out, settings={"run": "a", "datasets": ("x", "y")})
    unchanged = Recorder()
    expand_topics(TOPICS[:2], unchanged, out, settings={"run": "a", "datasets": ("x", "y")})
    assert unchanged.asked == []
    assert (tmp_path / "x.tsv").read_text() == before


def test_bad_output_is_refused_before_generating(tmp_path):
    recorder = Recorder()
    with pytest.raises(UserError, match="the format 'csv' is none of tsv, trec, jsonl; the output folder .* does not exist"):
        expand_topics(TOPICS, recorder, str(tmp_path / "missing" / "x.tsv"), output_format="csv")
    with pytest.raises(UserError, match="'a:1' holds a colon"):
        expand_topics([QueryTopic("a:1", "solar")], recorder, str(tmp_path / "x.tsv"))
    assert recorder.asked == []


# Distinct content words: 1, 2, 3 (coconut, milk, good: the rest are stopwords), 2 (the repeat counts once), 6.
TITLED = [QueryTopic("1", "stevia"), QueryTopic("2", "titanium dioxide"), QueryTopic("3", "Is Coconut Milk Good For You?"),
          QueryTopic("4", "coconut coconut milk"), QueryTopic("5", "Vitamin D: Shedding some light on the new recommendations")]


@pytest.mark.parametrize("words, short", [(1, ["1"]), (2, ["1", "2", "4"]), (4, ["1", "2", "3", "4"]), (10, ["1", "2", "3", "4", "5"])])
def test_rm3_split_writes_short_and_long_queries_apart(tmp_path, words, short):
    out = tmp_path / "expanded.tsv"
    records = expand_topics(TITLED, Recorder(), str(out), rm3_split=words)
    rm3, plain = rm3_split_paths(str(out))
    assert (rm3.name, plain.name) == ("expanded.rm3.tsv", "expanded.plain.tsv")
    lines = {r["query_id"]: line for r, line in zip(records, out.read_text().splitlines(keepends=True))}
    assert rm3.read_text() == "".join(lines[q] for q in short)  # the main file's lines, in its order
    assert plain.read_text() == "".join(line for q, line in lines.items() if q not in short)


def test_an_empty_rm3_split_part_is_written_and_named_in_the_log(tmp_path, capsys):
    out = tmp_path / "x.tsv"
    expand_topics(TITLED[-1:], Recorder(), str(out), rm3_split=4)
    rm3, plain = rm3_split_paths(str(out))
    assert rm3.read_text() == "" and plain.read_text() == out.read_text() != ""
    log = " ".join(capsys.readouterr().err.split())
    assert f"{rm3} (empty: no topic has at most 4 content words) and {plain} (1 longer: search them without)" in log


def test_rm3_split_costs_no_generation_and_keeps_the_format(tmp_path):
    expand_topics(TITLED, Recorder(), str(tmp_path / "x.jsonl"), output_format="jsonl")
    again = Recorder()
    expand_topics(TITLED, again, str(tmp_path / "x.jsonl"), output_format="jsonl", rm3_split=2)
    assert again.asked == []
    parts = [[json.loads(line)["query"] for line in path.read_text().splitlines()] for path in rm3_split_paths(str(tmp_path / "x.jsonl"))]
    assert parts == [["stevia", "titanium dioxide", "coconut coconut milk"],
                     ["Is Coconut Milk Good For You?", "Vitamin D: Shedding some light on the new recommendations"]]


def test_rm3_split_refuses_a_folder_in_its_way_before_generating(tmp_path):
    (tmp_path / "x.plain.tsv").mkdir()
    recorder = Recorder()
    with pytest.raises(UserError, match=r"the output .*x\.plain\.tsv is a folder"):
        expand_topics(TITLED, recorder, str(tmp_path / "x.tsv"), rm3_split=4)
    with pytest.raises(UserError, match="the split at 4 words needs an output file"):
        expand_topics(TITLED, recorder, "-", rm3_split=4)
    assert recorder.asked == [] and not (tmp_path / "x.tsv").exists()


def test_stdin_to_stdout_pipeline(tmp_path):
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from qexpand.expandtopics import expand_topics\n"
              "from qexpand.topicfiles import read_topics\n"
              "expand_topics(read_topics('-'), lambda qs: [('about ' + q, []) for q in qs], '-')\n") % str(REPO)
    result = subprocess.run([sys.executable, "-c", script], input="1\tsolar panels\n2\tcoral\treefs\n",
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "line 2" in result.stderr  # a tab inside a query is refused
    result = subprocess.run([sys.executable, "-c", script], input="1\tsolar panels\n2\tcoral reefs\n",
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\tsolar panels about solar panels\n2\tcoral reefs about coral reefs\n"
    assert "expanding" in result.stderr and "wrote stdout" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no journal for standard output
