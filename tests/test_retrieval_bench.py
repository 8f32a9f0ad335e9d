"""bench/retrieval.py on a small corpus of our own: each title is an ambiguous word, the distractor
documents repeat it more often than the relevant ones, and only the description names the sense
that is relevant, so title + gold description must beat the title alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ["jaguar", "python", "mercury", "apple", "java", "amazon", "bass", "crane", "seal", "mouse", "pitch", "spring"]


def write_collection(folder: Path) -> dict[str, Path]:
    docs, qrels, topics, expansions = [], [], [], []
    for i, word in enumerate(WORDS):
        sense, other = f"habitat{i} species{i} wildlife{i}", f"engine{i} dealer{i} price{i}"
        for k in range(2):
            docs.append({"doc_id": f"r{i}-{k}", "text": f"A note on {word}: {sense} observed in the field {k}."})
            qrels.append(f"{i + 1} 0 r{i}-{k} 1")
        for k in range(3):
            docs.append({"doc_id": f"d{i}-{k}", "title": word, "text": f"{word} {word} news: {other} report {k}."})
        topics.append(f"<top>\n<num> Number: {i + 1}\n<title> {word}\n<desc> Description:\n"
                      f"Find documents on {word} {sense}.\n<narr> Narrative:\n</top>\n")
        # The expansion names the right sense for half of the topics only.
        expansions.append({"query_id": str(i + 1), "generated": f"What about {word} {sense if i % 2 else other}?"})
    docs += [{"doc_id": f"f{n}", "text": f"filler text number {n} about nothing much"} for n in range(40)]
    paths = {name: folder / name for name in ("docs.jsonl", "qrels.txt", "topics.trec", "expansions.jsonl")}
    paths["docs.jsonl"].write_text("".join(json.dumps(d) + "\n" for d in docs))
    paths["qrels.txt"].write_text("\n".join(qrels) + "\n")
    paths["topics.trec"].write_text("\n".join(topics))
    paths["expansions.jsonl"].write_text("".join(json.dumps(e) + "\n" for e in expansions))
    return paths


def run_bench(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "retrieval.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_gold_description_beats_title(tmp_path):
    paths = write_collection(tmp_path)
    result = run_bench("--corpus", paths["docs.jsonl"], "--qrels", paths["qrels.txt"], "--topics", paths["topics.trec"],
                       "--expansions", paths["expansions.jsonl"], "--out", tmp_path / "r.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    means, p = report["means"], report["p"]
    assert report["queries"] == len(WORDS) and report["documents"] == 5 * len(WORDS) + 40
    assert list(means) == ["title", "template", "expansion", "gold"]
    assert means["title"]["AP"] < 0.6 and means["gold"]["AP"] > 0.95
    assert p["gold vs title"]["AP"] < 0.01 and p["gold vs title"]["nDCG@10"] < 0.01
    # Half the expansions name the relevant sense: between title and gold, and the table says so.
    assert means["title"]["AP"] < means["expansion"]["AP"] < means["gold"]["AP"]
    assert set(report["per_query"]["gold"]["AP"]) == {str(i + 1) for i in range(len(WORDS))}
    assert "| gold | 1.0000 (p=0.000488)" in result.stdout and "| expansion vs template |" in result.stdout


def test_bad_input_is_one_error_without_traceback(tmp_path):
    paths = write_collection(tmp_path)
    result = run_bench("--corpus", paths["docs.jsonl"], "--qrels", tmp_path / "none.txt", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot read the qrels")
    assert "Traceback" not in result.stderr
    (tmp_path / "other.jsonl").write_text('{"query_id": "99", "query": "jaguar", "generated": "x"}\n')
    result = run_bench("--corpus", paths["docs.jsonl"], "--qrels", paths["qrels.txt"], "--expansions",
                       tmp_path / "other.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "no topic has both a relevant document in the qrels and an expansion" in result.stderr


def test_corpus_and_qrels_from_an_ir_datasets_id(tmp_path, capsys):
    import ir_datasets

    from bench import retrieval

    paths = write_collection(tmp_path)
    docs = [json.loads(line) for line in paths["docs.jsonl"].read_text().splitlines()]
    (tmp_path / "docs.tsv").write_text("".join(f"{d['doc_id']}\t{d.get('title', '')} {d['text']}\n" for d in docs))
    (tmp_path / "queries.tsv").write_text("".join(f"{i + 1}\t{word}\n" for i, word in enumerate(WORDS)))
    name = f"qexpand-test/{tmp_path.name}"
    ir_datasets.registry.register(name, ir_datasets.create_dataset(
        docs_tsv=str(tmp_path / "docs.tsv"), queries_tsv=str(tmp_path / "queries.tsv"), qrels_trec=str(paths["qrels.txt"])))
    # The data set's own topics have no description: the gold form is left out.
    assert retrieval.main(retrieval.build_parser().parse_args(["--dataset", name, "--out", str(tmp_path / "a.json")])) == 0
    assert list(json.loads((tmp_path / "a.json").read_text())["means"]) == ["title", "template"]
    assert "gold form is left out" in capsys.readouterr().err
    args = ["--dataset", name, "--topics", str(paths["topics.trec"]), "--out", str(tmp_path / "b.json")]
    retrieval.main(retrieval.build_parser().parse_args(args))
    means = json.loads((tmp_path / "b.json").read_text())["means"]
    assert means["gold"]["AP"] > 0.95 > 0.6 > means["title"]["AP"]
