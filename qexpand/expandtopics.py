"""Expand a whole topic set, resumably, and write it for retrieval toolkits.

Finished expansions are appended to a JSONL journal (one record a topic, flushed and fsynced
after every batch). A run that is killed leaves a journal of whole batches, perhaps with a torn
last line; the next run with the same output drops that line, skips every topic already in the
journal and generates only the rest. The outputs are written at the end, atomically. The journal
stays beside the output (expanded.journal.jsonl for expanded.tsv): writing the same expansions in
another format (expanded.trec) or query form costs no generation; delete it to generate afresh.

Under a launcher (`accelerate launch` / torchrun) N processes share the work without talking: the topics
are cut, in input order, into the batches of `batch_size` one process would generate, and batch b goes to
process b mod N (`Shard`). Each process journals its own batches (expanded.journal.shard-K-of-N.jsonl,
K from 1); once all are done, the main process reads every shard journal and writes the one output as
one process would. A batch is generated whole or not at all, as in one process, so each topic meets
the same batch neighbours, the same padding and the same sampling seed (seeded per batch): the output
of N processes is the output of one, byte for byte. After a kill, a batch that its journal holds only in
part (a torn write) is generated again whole and its missing topics taken from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from qexpand.config import OUTPUT_FORMATS
from qexpand.errors import UserError
from qexpand.feedback import title_length
from qexpand.runfiles import write_failed
from qexpand.topicfiles import (STDIO, QueryShape, QueryTopic, candidate_texts, check_tsv_ids,
                                jsonl_text, trec_text, tsv_text, write_output)

# expand_batch(queries) -> one (chosen expansion, candidates) pair a query, in order; candidates
# are JSON-serialisable (strings, or dicts such as vars(Generation)).
ExpandBatch = Callable[[list[str]], list[tuple[str, list]]]
JOURNAL_KIND = "qexpand topic expansions"


def journal_path(out: str) -> Path | None:
    """Where the journal of an output lives: beside it, named by its stem, so that expanded.tsv,
    expanded.trec and expanded.jsonl share one; none for standard output."""
    return None if out == STDIO else Path(out).with_suffix(".journal.jsonl")


@dataclass(frozen=True)
class Shard:
    """Process `index` (from 0) of `count`: it expands the batches b of the topic list with b % count == index."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"process {self.index + 1} of {self.count}"


def shard_journal_path(out: str, shard: Shard) -> Path:
    """The journal of one process's share, beside the output: expanded.journal.shard-1-of-2.jsonl."""
    return Path(out).with_suffix(f".journal.shard-{shard.index + 1}-of-{shard.count}.jsonl")


def topic_batches(topics: list[QueryTopic], batch_size: int) -> list[list[QueryTopic]]:
    """The batches one process generates in a fresh run, in input order; sharding hands out whole ones."""
    return [topics[start : start + batch_size] for start in range(0, len(topics), batch_size)]


def shard_batches(topics: list[QueryTopic], batch_size: int, shard: Shard) -> list[list[QueryTopic]]:
    return topic_batches(topics, batch_size)[shard.index :: shard.count]


def _split_record(topics: list[QueryTopic], batch_size: int, shard: Shard) -> dict:
    """What a shard journal's header says of the split it belongs to: which process, how many, the batch
    size and the topic list (its length and a digest of its ids and queries)."""
    listed = json.dumps([[t.query_id, t.query] for t in topics], ensure_ascii=False).encode("utf-8")
    return {"process": shard.index + 1, "processes": shard.count, "batch_size": batch_size,
            "topics": len(topics), "topics_sha256": hashlib.sha256(listed).hexdigest()[:16]}


def _describe_split(split: dict | None, other: dict | None) -> str:
    if not split:
        return "none: one process"
    moved = other and (split.get("process"), split.get("processes")) != (other.get("process"), other.get("processes"))
    who = f"process {split.get('process')} of {split.get('processes')}, " if moved else ""
    return (f"{who}batches of {split.get('batch_size')} of {split.get('topics')} topics with digest "
            f"{split.get('topics_sha256')}")


def _read_journal(path: Path, settings: dict, split: dict | None = None) -> dict[str, dict]:
    """Records of a journal, by query id; a torn last line is cut off the file. `split`: the split a
    shard journal must have been written for (None for the journal of one process)."""
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
            # Shard journals are named together: every process finds the same problem, and it is said once.
            journals = path.parent / re.sub(r"\.shard-\d+-of-", ".shard-*-of-", path.name)
            if record.get("settings") != settings:
                which = f"the journal {path} was" if split is None else f"the shard journals {journals} were"
                raise UserError(
                    f"{which} written with other settings ({record.get('settings')}, now {settings}). Delete "
                    f"{'it' if split is None else 'them'} to expand with the new settings, or choose another output."
                )
            if record.get("split") != split:
                old = record.get("split")
                raise UserError(
                    f"the shard journals {journals} were written for another split of the topics among processes "
                    f"({_describe_split(old, split)}; now {_describe_split(split, old)}), so the batches they hold "
                    "are not those each process expands now. Delete them to expand afresh, or run again with the "
                    "topics and --queries-per-batch they were written with."
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


def rm3_split_paths(out: str) -> tuple[Path, Path]:
    """Where --rm3-split writes its two parts: expanded.rm3.tsv and expanded.plain.tsv for expanded.tsv."""
    path = Path(out)
    return tuple(path.with_suffix(f".{part}{path.suffix}") for part in ("rm3", "plain"))


def _check_output(out: str, output_format: str, shape: QueryShape, rm3_split: int | None = None) -> None:
    problems = []
    if output_format not in OUTPUT_FORMATS:
        problems.append(f"the format '{output_format}' is none of {', '.join(OUTPUT_FORMATS)}")
    problems += shape.problems()
    if rm3_split is not None and (out == STDIO or rm3_split < 1):
        problems.append(f"the split at {rm3_split} words needs an output file and at least 1 word")
    paths = [out] + ([str(p) for p in rm3_split_paths(out)] if rm3_split is not None and out != STDIO else [])
    if out != STDIO and not Path(out).parent.is_dir():
        problems.append(f"the output folder {Path(out).parent} does not exist")
    problems += [f"the output {path} is a folder" for path in paths if path != STDIO and Path(path).is_dir()]
    if problems:
        raise UserError("cannot write the expanded topics: " + "; ".join(problems) + ".")


def render(records: list[dict], output_format: str, shape: QueryShape) -> str:
    """The output text of finished records (input order) in one format and query shape."""
    queries = [shape.query(r["query"], r["generated"], candidate_texts(r)) for r in records]
    if output_format == "tsv":
        return tsv_text([(r["query_id"], q) for r, q in zip(records, queries)])
    if output_format == "trec":
        return trec_text([(r["query_id"], r["query"], r["generated"] or r["query"]) for r in records])
    return jsonl_text([{**r, "expanded_query": q} for r, q in zip(records, queries)])


def write_outputs(records: list[dict], out: str, output_format: str, shape: QueryShape,
                  rm3_split: int | None = None) -> str:
    """`out`, and with a split its two parts by query length; returns what was written, for the log."""
    write_output(render(records, output_format, shape), out)
    if rm3_split is None:
        return f"{out if out != STDIO else 'stdout'} ({output_format})"
    short = [title_length(r["query"]) <= rm3_split for r in records]
    parts = rm3_split_paths(out)
    for path, wanted in zip(parts, (True, False)):
        write_output(render([r for r, s in zip(records, short) if s == wanted], output_format, shape), str(path))
    # Both parts are written, an empty one too, so that no part of an earlier run is left to be read as this
    # one's; the log says which is empty, as pyserini refuses an empty topic file ("Topic ... Not Found").
    short_count, long_count = sum(short), len(short) - sum(short)
    rm3_note = (f"{short_count} topics of at most {rm3_split} content words: search them with RM3" if short_count
                else f"empty: no topic has at most {rm3_split} content words")
    plain_note = (f"{long_count} longer: search them without" if long_count
                  else f"empty: no topic has more than {rm3_split} content words")
    return f"{out} ({output_format}), {parts[0]} ({rm3_note}) and {parts[1]} ({plain_note})"


def _checked_journal(topics: list[QueryTopic], out: str, journal: Path | None, settings: dict | None,
                     split: dict | None, output_format: str, shape: QueryShape,
                     rm3_split: int | None = None) -> tuple[dict, dict[str, dict]]:
    """Before any generation: the output checked, then the journal (None: none) read and checked to hold
    these topics. Returns the settings as the journal gives them back (tuples as lists) and its records."""
    _check_output(out, output_format, shape, rm3_split)
    if output_format == "tsv":
        check_tsv_ids([t.query_id for t in topics])  # before hours of generation, not after
    settings = json.loads(json.dumps(settings or {}))
    done = _read_journal(journal, settings, split) if journal else {}
    _check_reused(done, topics, journal)
    return settings, done


def expand_topics(
    topics: list[QueryTopic],
    expand_batch: ExpandBatch,
    out: str,
    output_format: str = "tsv",
    shape: QueryShape = QueryShape(),
    batch_size: int = 32,
    journal: Path | None = None,
    settings: dict | None = None,
    rm3_split: int | None = None,
) -> list[dict]:
    """Expand `topics` with `expand_batch`, resuming from the journal; write `out` ('-': stdout).

    journal: defaults to `journal_path(out)` (none for stdout, which then never resumes).
    settings: what made the expansions (run, decoding); a journal written with other settings is refused.
    rm3_split: also write the topics in two parts by query length (`write_outputs`).
    Returns the records in the order of `topics`; progress and messages go to stderr only.
    """
    journal = Path(journal) if journal is not None else journal_path(out)
    settings, done = _checked_journal(topics, out, journal, settings, None, output_format, shape, rm3_split)
    todo = [t for t in topics if t.query_id not in done]
    handle = open(journal, "a", encoding="utf-8") if journal else None
    try:
        if handle:
            _start_journal(handle, settings)
        with tqdm(total=len(topics), initial=len(topics) - len(todo), desc="expanding", unit="topic",
                  file=sys.stderr, disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                records = _expanded_records(batch, expand_batch)
                if handle:
                    _append(handle, records)
                done.update((r["query_id"], r) for r in records)
                bar.update(len(batch))
    finally:
        if handle:
            handle.close()
    finished = [done[t.query_id] for t in topics]
    written = write_outputs(finished, out, output_format, shape, rm3_split)
    _note_integer_ids(topics, output_format)
    reused = f", {len(topics) - len(todo)} taken from {journal}" if len(todo) < len(topics) else ""
    print(f"{len(topics)} topics: {len(todo)} expanded now{reused}; wrote {written}.", file=sys.stderr)
    return finished


@dataclass
class ShardJob:
    """One process's share of a sharded expansion, checked and its journal read (`open_shard`)."""

    topics: list[QueryTopic]  # all of them, in input order
    shard: Shard
    batch_size: int
    settings: dict
    journal: Path
    done: dict[str, dict]  # the journal's records by query id

    @property
    def batches(self) -> list[list[QueryTopic]]:
        return shard_batches(self.topics, self.batch_size, self.shard)


def sharding_problems(topics_source: str, out: str) -> list[str]:
    """Why a topic file cannot be expanded by several processes: each reads the topics itself, and they
    meet in journals beside the output."""
    return [f"{flag} - (standard {stream}) cannot be shared by several processes; give a file"
            for flag, stream, value in (("--topics", "input", topics_source), ("--out", "output", out))
            if value == STDIO]


def open_shard(topics: list[QueryTopic], out: str, shard: Shard, batch_size: int, settings: dict | None = None,
               output_format: str = "tsv", shape: QueryShape = QueryShape(),
               rm3_split: int | None = None) -> ShardJob:
    """Check the output and read this process's journal, before any model loads (every process checks
    the output alike; each reads its own journal, cutting a torn last line off it)."""
    if out == STDIO:
        raise UserError("cannot write the expanded topics: " + sharding_problems("", out)[0] + ".")
    journal = shard_journal_path(out, shard)
    settings, done = _checked_journal(topics, out, journal, settings, _split_record(topics, batch_size, shard),
                                      output_format, shape, rm3_split)
    return ShardJob(topics, shard, batch_size, settings, journal, done)


def expand_shard(job: ShardJob, expand_batch: ExpandBatch) -> int:
    """Expand this process's batches that its journal lacks; returns how many topics were expanded now.

    A batch is always generated whole, as one process generates it, so that its topics come out as
    there; of a batch the journal holds in part (a write torn by a kill), only the missing topics are
    recorded."""
    mine = [topic for batch in job.batches for topic in batch]
    already = sum(topic.query_id in job.done for topic in mine)
    expanded = 0
    with open(job.journal, "a", encoding="utf-8") as handle:
        _start_journal(handle, job.settings, _split_record(job.topics, job.batch_size, job.shard))
        with tqdm(total=len(mine), initial=already, desc=f"expanding ({job.shard})", unit="topic",
                  file=sys.stderr, disable=already == len(mine)) as bar:
            for batch in job.batches:
                if all(topic.query_id in job.done for topic in batch):
                    continue
                records = [r for r in _expanded_records(batch, expand_batch) if r["query_id"] not in job.done]
                _append(handle, records)
                job.done.update((r["query_id"], r) for r in records)
                expanded += len(records)
                bar.update(len(records))
    return expanded


def merge_shards(topics: list[QueryTopic], out: str, processes: int, batch_size: int, expanded_now: int,
                 output_format: str = "tsv", shape: QueryShape = QueryShape(),
                 settings: dict | None = None, rm3_split: int | None = None) -> list[dict]:
    """The main process, once every process has finished its share: read all shard journals and write
    `out` exactly as one process would. `expanded_now`: topics expanded in this run, all processes together.
    Returns the records in input order."""
    settings = json.loads(json.dumps(settings or {}))
    done: dict[str, dict] = {}
    for index in range(processes):
        shard = Shard(index, processes)
        journal = shard_journal_path(out, shard)
        records = _read_journal(journal, settings, _split_record(topics, batch_size, shard))
        _check_reused(records, topics, journal)
        done.update(records)
    missing = [t.query_id for t in topics if t.query_id not in done]
    if missing:
        raise UserError(f"the shard journals beside {out} lack {len(missing)} of {len(topics)} topics (the first: "
                        f"'{missing[0]}') although every process finished; run the same command again.")
    finished = [done[t.query_id] for t in topics]
    written = write_outputs(finished, out, output_format, shape, rm3_split)
    _note_integer_ids(topics, output_format)
    pattern = Path(out).with_suffix(f".journal.shard-*-of-{processes}.jsonl")
    reused = len(topics) - expanded_now
    taken = f", {reused} taken from the shard journals {pattern}" if reused else ""
    print(f"{len(topics)} topics in {processes} processes: {expanded_now} expanded now{taken}; wrote {written}.",
          file=sys.stderr)
    return finished


def _note_integer_ids(topics: list[QueryTopic], output_format: str) -> None:
    if output_format == "trec" and not all(t.query_id.isdigit() for t in topics):
        print("note: some query ids are not integers; Anserini's TREC topic reader (pyserini) needs integers, "
              "PyTerrier's does not. For pyserini, write --format tsv.", file=sys.stderr)


def _expanded_records(batch: list[QueryTopic], expand_batch: ExpandBatch) -> list[dict]:
    """The journal records of one batch, expanded whole."""
    results = expand_batch([t.query for t in batch])
    if len(results) != len(batch):
        raise ValueError(f"expand_batch returned {len(results)} results for {len(batch)} queries")
    return [_record(t, chosen, candidates) for t, (chosen, candidates) in zip(batch, results)]


def _record(topic: QueryTopic, chosen: str, candidates: list) -> dict:
    record = {"query_id": topic.query_id, "query": topic.query, "generated": chosen, "candidates": candidates}
    if topic.description:
        record["description"] = topic.description
    return record


def _start_journal(handle, settings: dict, split: dict | None = None) -> None:
    """A new (empty) journal opens with what made its expansions and, a shard's, the split it belongs to."""
    if handle.tell() == 0:
        _append(handle, [{"journal": JOURNAL_KIND, "settings": settings, **({"split": split} if split else {})}])


def _append(handle, records: list[dict]) -> None:
    """One write a batch, then fsync: a kill leaves whole batches and at most one torn line."""
    try:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:  # a full disk: the batches written before stay, the next run resumes from them
        raise write_failed(Path(handle.name), error) from None
