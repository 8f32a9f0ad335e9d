"""--topics shared among processes under `accelerate launch` (two CPU processes, gloo): the output is the
output of one process byte for byte, sampling included, and a shard journal cut by a kill resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qexpand import data
from tests.conftest import REPO
from tests.fixtures import SUBJECTS, finished_run

# Two content words each, three for q0, q3, q6 and q9 (so that --rm3-split 2 has two parts).
TOPICS = [(f"q{i}", SUBJECTS[20 + i] + (" in winter" if i % 3 == 0 else "")) for i in range(10)]
# Sampled (2 candidates, joined: no SBERT model needed) in batches of 2: process 1 gets batches 1, 3
# and 5 (topics q0 q1 q4 q5 q8 q9), process 2 batches 2 and 4 (q2 q3 q6 q7).
EXPANSION = ("--num-candidates", "2", "--select", "join", "--queries-per-batch", "2", "--max-new-tokens", "6",
             "--format", "jsonl", "--device", "cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> Path:
    """A finished run with an untrained adapter, and a TSV of 10 topics it was not trained on."""
    root = tmp_path_factory.mktemp("sharded")
    web = [data.Topic("clueweb09/catb/trec-web-2009", str(i), s, "d") for i, s in enumerate(SUBJECTS[:12], 1)]
    split = data.split_to_json({"train": web, "eval": web[:1], "test": web[:2]}, 42, ["clueweb09/catb/trec-web-2009"])
    finished_run(root / "runs" / "done", tiny_model, split)
    (root / "topics.tsv").write_text("".join(f"{qid}\t{query}\n" for qid, query in TOPICS))
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def expand(world: Path, processes: int, out: str, *extra: str) -> subprocess.CompletedProcess:
    """testing_finetuned_model.py --topics, by one plain process or by `processes` under accelerate's launcher."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    launcher = [] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command = [sys.executable, *launcher, str(REPO / "testing_finetuned_model.py"), "--output-dir", "runs",
               "--run", "done", "--topics", "topics.tsv", "--out", out, *EXPANSION, *extra]
    return subprocess.run(command, cwd=world, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def expanded(world) -> dict[str, subprocess.CompletedProcess]:
    """The topics expanded by one process (one.jsonl) and by two (two.jsonl)."""
    results = {"one": expand(world, 1, "one.jsonl"), "two": expand(world, 2, "two.jsonl")}
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def journal_ids(path: Path) -> list[str]:
    return [json.loads(line).get("query_id") for line in path.read_text().splitlines()[1:]]


def test_two_processes_write_the_output_of_one_byte_for_byte(world, expanded):
    one, two = (world / "one.jsonl").read_bytes(), (world / "two.jsonl").read_bytes()
    records = [json.loads(line) for line in one.decode().splitlines()]
    assert [r["query_id"] for r in records] == [qid for qid, _ in TOPICS]
    assert all(len(r["candidates"]) == 2 for r in records)  # sampled
    assert len({c["text"] for r in records for c in r["candidates"]}) > 10  # the random model says different things
    assert two == one
    # Each process journalled its own batches; the one-process journal is not theirs.
    assert journal_ids(world / "two.journal.shard-1-of-2.jsonl") == ["q0", "q1", "q4", "q5", "q8", "q9"]
    assert journal_ids(world / "two.journal.shard-2-of-2.jsonl") == ["q2", "q3", "q6", "q7"]
    assert not (world / "two.journal.jsonl").exists() and (world / "one.journal.jsonl").exists()
    header = json.loads((world / "two.journal.shard-2-of-2.jsonl").read_text().splitlines()[0])
    assert header["split"]["process"] == 2 and header["split"]["processes"] == 2 and header["split"]["batch_size"] == 2
    # Only the main process reports; the other prints no more than its progress bar.
    log = expanded["two"].stderr
    assert log.count("10 topics in 2 processes: 10 expanded now; wrote two.jsonl (jsonl).") == 1, log[-3000:]
    assert "WARNING" not in log and "error" not in log
    assert "10 topics: 10 expanded now; wrote one.jsonl (jsonl)." in expanded["one"].stderr


def test_a_cut_shard_journal_resumes_to_the_same_output(world, expanded):
    first = world / "two.journal.shard-1-of-2.jsonl"
    second = world / "two.journal.shard-2-of-2.jsonl"
    lines = first.read_bytes().splitlines(keepends=True)
    # Header, the first record (q0) and half of the next (q1): a kill in the middle of a batch's write.
    first.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    before_second = second.read_bytes()
    (world / "two.jsonl").unlink()

    result = expand(world, 2, "two.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (world / "two.jsonl").read_bytes() == (world / "one.jsonl").read_bytes()
    assert ("10 topics in 2 processes: 5 expanded now, 5 taken from the shard journals "
            "two.journal.shard-*-of-2.jsonl; wrote two.jsonl (jsonl).") in result.stderr
    # q1's batch was generated again whole; q0's record stayed as the journal had it.
    assert journal_ids(first) == ["q0", "q1", "q4", "q5", "q8", "q9"]
    assert first.read_bytes().startswith(b"".join(lines[:2]))
    assert second.read_bytes() == before_second

    # A journal of another split (another --queries-per-batch) is refused, once, before any generation.
    refused = expand(world, 2, "two.jsonl", "--queries-per-batch", "3")
    assert refused.returncode != 0, refused.stderr[-3000:]  # the launcher's own code; each process's is 2
    message = " ".join(refused.stderr.split())
    assert message.count("error: the shard journals two.journal.shard-*-of-2.jsonl were written for another "
                         "split of the topics among processes (batches of 2 of 10 topics with digest") == 1, message
    assert "now batches of 3 of 10 topics" in message
    assert "exitcode  : 2" in refused.stderr
    assert second.read_bytes() == before_second


def test_the_rm3_split_of_two_processes_is_that_of_one(world, expanded):
    from qexpand.expandtopics import rm3_split_paths
    from qexpand.feedback import title_length

    for processes, out in ((1, "one.jsonl"), (2, "two.jsonl")):
        result = expand(world, processes, out, "--rm3-split", "2")  # every topic from the journals
        assert result.returncode == 0, result.stderr[-3000:]
        stem = out.removesuffix(".jsonl")
        assert "0 expanded now" in result.stderr, result.stderr[-3000:]
        assert (f"{stem}.rm3.jsonl (6 topics of at most 2 content words: search them with RM3) and {stem}.plain.jsonl "
                "(4 longer: search them without)") in result.stderr
    parts = {out: [p.read_bytes() for p in rm3_split_paths(str(world / out))] for out in ("one.jsonl", "two.jsonl")}
    assert parts["two.jsonl"] == parts["one.jsonl"]
    short, long = ([json.loads(line) for line in part.decode().splitlines()] for part in parts["one.jsonl"])
    assert short and long and all(title_length(r["query"]) <= 2 < title_length(q["query"]) for r in short for q in long)
    order = [qid for qid, _ in TOPICS]
    assert sorted((r["query_id"] for r in short + long), key=order.index) == order


@pytest.mark.parametrize("leave, code, printed", [("sys.exit(3)", 3, ""), ("sys.exit()", 0, ""),
                                                  ("sys.exit('stopped')", 1, "stopped")])
def test_a_launched_process_leaves_with_its_code_and_without_the_teardown(leave, code, printed):
    script = ("import atexit, sys\n"
              "from qexpand.expander import Processes\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "with Processes.exiting_without_teardown():\n"
              "    print('done', flush=False)\n"
              f"    {leave}\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert result.stdout == "done\n"  # flushed before leaving; the atexit handler never ran
    assert result.stderr.strip() == printed
