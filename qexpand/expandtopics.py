"""Expand a whole topic set, resumably, and write it for retrieval toolkits.

Finished expansions are appended to a JSONL journal (one record a topic, flushed and fsynced
after every batch). A run that is killed leaves a journal of whole batches, perhaps with a torn
last line; the next run with the same output drops that line, skips every topic already in the
journal and generates only the rest. The outputs are written at the end, atomically. The journal
stays beside the output (expanded.journal.jsonl for expanded.tsv): writing the same expansions in
another format (expanded.trec) or query form costs no generation; delete it to generate afresh.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from qexpand.errors import UserError
from qexpand.runfiles import write_failed
from qexpand.topicfiles import (OUTPUT_FORMATS, QUERY_FORMS, STDIO, QueryTopic, candidate_texts, check_tsv_ids,
                                expanded_query, jsonl_text, trec_text, tsv_text, write_output)

# expand_batch(queries) -> one (chosen expansion, candidates) pair a query, in order; candidates
# are JSON-serialisable (strings, or dicts such as vars(Generation)).
ExpandBatch = Callable[[list[str]], list[tuple[str, list]]]
JOURNAL_KIND = "qexpand topic expansions"


def journal_path(out: str) -> Path | None:
    """Where the journal of an output lives: beside it, named by its stem, so that expanded.tsv,
    expanded.trec and expanded.jsonl share one; none for standard output."""
    return None if out == STDIO else Path(out).with_suffix(".journal.jsonl")


def _read_journal(path: Path, settings: dict) -> dict[str, dict]:
    """Records of a journal, by query id; a torn last line is cut off the file."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # a last line without its newline was torn by a kill
    if len(complete) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
            key = None if number == 1 else str(record["query_id"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"the journal {path} is damaged at line {number}; delete it to expand all "
                            "topics afresh.") from None
        if key is None:
            if record.get("journal") != JOURNAL_KIND:
                raise UserError(f"{path} is not a journal of expansions; move it away or choose another output.")
            if record.get("settings") != settings:
                raise UserError(
                    f"the journal {path} was written with other settings ({record.get('settings')}, now "
                    f"{settings}). Delete it to expand with the new settings, or choose another output."
                )
        else:
            records[key] = record
    return records


def _check_reused(records: dict[str, dict], topics: list[QueryTopic], path: Path) -> None:
    for topic in topics:
        old = records.get(topic.query_id)
        if old is not None and old["query"] != topic.query:
            raise UserError(
                f"the journal {path} holds topic '{topic.query_id}' with the query '{old['query']}', but the "
                f"topics give '{topic.query}': it belongs to other topics. Delete it, or choose another output."
            )


def _check_output(out: str, output_format: str, query_form: str, repeat_query: int, query_weight: float,
                  feedback_terms: int) -> None:
    problems = []
    if output_format not in OUTPUT_FORMATS:
        problems.append(f"the format '{output_format}' is none of {', '.join(OUTPUT_FORMATS)}")
    if query_form not in QUERY_FORMS:
        problems.append(f"the query form '{query_form}' is none of {', '.join(QUERY_FORMS)}")
    if query_form == "feedback" and feedback_terms < 1:
        problems.append(f"the feedback form needs at least one feedback term (got {feedback_terms})")
    if repeat_query < 0:
        problems.append(f"the query repetition {repeat_query} is negative")
    if not 0 <= query_weight < 1:
        problems.append(f"the query weight {query_weight} is outside [0, 1)")
    if out != STDIO and not Path(out).parent.is_dir():
        problems.append(f"the output folder {Path(out).parent} does not exist")
    if out != STDIO and Path(out).is_dir():
        problems.append(f"the output {out} is a folder")
    if problems:
        raise UserError("cannot write the expanded topics: " + "; ".join(problems) + ".")


def render(records: list[dict], output_format: str, query_form: str, repeat_query: int, query_weight: float = 0.0,
           feedback_terms: int = 0) -> str:
    """The output text of finished records (input order) in one format and query form."""
    queries = [expanded_query(r["query"], r["generated"], query_form, repeat_query, query_weight, candidate_texts(r),
                              feedback_terms) for r in records]
    if output_format == "tsv":
        return tsv_text([(r["query_id"], q) for r, q in zip(records, queries)])
    if output_format == "trec":
        return trec_text([(r["query_id"], r["query"], r["generated"] or r["query"]) for r in records])
    return jsonl_text([{**r, "expanded_query": q} for r, q in zip(records, queries)])


def expand_topics(
    topics: list[QueryTopic],
    expand_batch: ExpandBatch,
    out: str,
    output_format: str = "tsv",
    query_form: str = "query+expansion",
    repeat_query: int = 1,
    batch_size: int = 32,
    query_weight: float = 0.0,
    feedback_terms: int = 0,
    journal: Path | None = None,
    settings: dict | None = None,
) -> list[dict]:
    """Expand `topics` with `expand_batch`, resuming from the journal; write `out` ('-': stdout).

    journal: defaults to `journal_path(out)` (none for stdout, which then never resumes).
    settings: what made the expansions (run, decoding); a journal written with other settings is refused.
    Returns the records in the order of `topics`; progress and messages go to stderr only.
    """
    _check_output(out, output_format, query_form, repeat_query, query_weight, feedback_terms)
    if output_format == "tsv":
        check_tsv_ids([t.query_id for t in topics])  # before hours of generation, not after
    journal = Path(journal) if journal is not None else journal_path(out)
    settings = json.loads(json.dumps(settings or {}))  # as the journal will give it back (tuples as lists)
    done = _read_journal(journal, settings) if journal else {}
    _check_reused(done, topics, journal)
    todo = [t for t in topics if t.query_id not in done]
    handle = open(journal, "a", encoding="utf-8") if journal else None
    try:
        if handle and handle.tell() == 0:
            _append(handle, [{"journal": JOURNAL_KIND, "settings": settings}])
        with tqdm(total=len(topics), initial=len(topics) - len(todo), desc="expanding", unit="topic",
                  file=sys.stderr, disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                results = expand_batch([t.query for t in batch])
                if len(results) != len(batch):
                    raise ValueError(f"expand_batch returned {len(results)} results for {len(batch)} queries")
                records = [_record(t, chosen, candidates) for t, (chosen, candidates) in zip(batch, results)]
                if handle:
                    _append(handle, records)
                done.update((r["query_id"], r) for r in records)
                bar.update(len(batch))
    finally:
        if handle:
            handle.close()
    finished = [done[t.query_id] for t in topics]
    write_output(render(finished, output_format, query_form, repeat_query, query_weight, feedback_terms), out)
    if output_format == "trec" and not all(t.query_id.isdigit() for t in topics):
        print("note: some query ids are not integers; Anserini's TREC topic reader (pyserini) needs integers, "
              "PyTerrier's does not. For pyserini, write --format tsv.", file=sys.stderr)
    reused = f", {len(topics) - len(todo)} taken from {journal}" if len(todo) < len(topics) else ""
    print(f"{len(topics)} topics: {len(todo)} expanded now{reused}; wrote {out if out != STDIO else 'stdout'} "
          f"({output_format}).", file=sys.stderr)
    return finished


def _record(topic: QueryTopic, chosen: str, candidates: list) -> dict:
    record = {"query_id": topic.query_id, "query": topic.query, "generated": chosen, "candidates": candidates}
    if topic.description:
        record["description"] = topic.description
    return record


def _append(handle, records: list[dict]) -> None:
    """One write a batch, then fsync: a kill leaves whole batches and at most one torn line."""
    try:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:  # a full disk: the batches written before stay, the next run resumes from them
        raise write_failed(Path(handle.name), error) from None
