"""Do the expansions help a search engine find relevant documents? One command measures it.

It trains once (or takes a finished run with --run), expands every judged topic of each collection with
the fine-tuned model and with the base model alone (zero-shot: same prompt, same decoding), retrieves
with Lucene BM25 and BM25+RM3 (pyserini), and scores nDCG@10, MAP and R@1000 (ir_measures):

    python bench/retrieval.py --collections nfcorpus-dev vaswani cacm --model FOLDER --gguf-file NAME.gguf

Rows, each query the title and a text made into one query as the run's recipe says (the retrieval recipe
weighs the strongest terms of the sampled candidates, each also by its SBERT cosine with the title, against
the title, qexpand.feedback; --query-form, --query-weight, --feedback-terms, --term-relatedness or
--repeat-query to change it):
  title          the title alone
  template       title + "Find information about {title}." (adds no information: the bar for "any added word")
  zero_shot      title + the base model's expansion
  finetuned      title + the fine-tuned expansion
  rm3            BM25+RM3 (pseudo-relevance feedback) on the title: the classical expansion
  finetuned_rm3  BM25+RM3 on the title + fine-tuned expansion
  selective      finetuned_rm3 for titles of at most 4 distinct content words, finetuned for longer ones
                 (on the development collections RM3 over the expansion helped keyword titles, hurt long requests)
Per collection, pooled over all topics and pooled by title length (distinct content words: 1, 2, 3-4, 5 or
more; keyword titles and long requests gain from different rows), every compared pair gets the mean
difference, a 95% bootstrap interval and the p of a paired randomization test (10,000 resamples, no
correction for multiple pairs).
Writes --out (JSON) and the same name with .md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import training  # noqa: E402
from qexpand import retrieval  # noqa: E402
from qexpand.config import QUERY_FORMS, RM3_TITLE_WORDS, TERM_RELATEDNESS, TestConfig  # noqa: E402
from qexpand.errors import UserError, fail_if_problems, run_cli  # noqa: E402
from qexpand.expandtopics import journal_path  # noqa: E402
from qexpand.feedback import title_length  # noqa: E402
from qexpand.metrics import TEMPLATE_BASELINE  # noqa: E402
from qexpand.recipes import EXPANSION, expansion_defaults, expansion_form_problems, expansion_shape  # noqa: E402
from qexpand.runcheck import read_record  # noqa: E402
from qexpand.rundir import atomic_write_json, atomic_write_text  # noqa: E402
from qexpand.topicfiles import QueryShape, candidate_texts  # noqa: E402

FORMS = ("title", "template", "zero_shot", "finetuned", "rm3", "finetuned_rm3", "selective")
PAIRS = (("finetuned", "title"), ("finetuned", "template"), ("finetuned", "zero_shot"), ("finetuned", "rm3"),
         ("template", "title"), ("zero_shot", "title"), ("rm3", "title"), ("finetuned_rm3", "rm3"),
         ("finetuned_rm3", "title"), ("selective", "rm3"), ("selective", "title"))
# (name, fewest, most) distinct content words of a title; None: no upper bound
LENGTH_GROUPS = (("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5+", 5, None))
QID_JOIN = "__"  # collection and topic id in one query id, so all topics are expanded in one pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--collections", nargs="+", default=["nfcorpus-dev", "vaswani", "cacm"], metavar="NAME",
                        help="collection folders (docs.jsonl, topics.tsv, qrels.txt) or names in ../shared/collections")
    parser.add_argument("--run", help="a finished run directory to use instead of training one")
    parser.add_argument("--model", help="base model to train on (training.py --model)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--recipe", default="retrieval", choices=list(EXPANSION),
                        help="training recipe (training.py --recipe)")
    parser.add_argument("--train-args", default="", help="more training.py options, as one quoted string")
    parser.add_argument("--expand-args", default="", help="more testing_finetuned_model.py options for the expansions")
    parser.add_argument("--query-form", choices=QUERY_FORMS, help="how title and text make one query "
                        "(default: the run's recipe)")
    parser.add_argument("--repeat-query", type=int, help="K: times the title precedes a pasted text, for every topic")
    parser.add_argument("--query-weight", type=float, help="the title's share of the query (default: the run's "
                        "recipe)")
    parser.add_argument("--feedback-terms", type=int, help="feedback terms of the candidates with --query-form "
                        "feedback (default: the run's recipe)")
    parser.add_argument("--term-relatedness", choices=TERM_RELATEDNESS, help="with --query-form feedback: sbert "
                        "also weighs each term by its SBERT cosine with the title (default: the run's recipe)")
    parser.add_argument("--work-dir", default="checkpoints/retrieval-bench",
                        help="indexes, expansions and the trained run go here; a rerun reuses indexes and expansions")
    parser.add_argument("--out", default="bench/results/retrieval.json", help="the JSON report; the tables go beside it as .md")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and randomization tests")
    return parser


def trained_run(args, work: Path) -> Path:
    if args.run:
        return Path(args.run)
    if args.model is None:
        raise UserError("give --model (and --gguf-file for a GGUF) to train on, or --run with a finished run.")
    run_dir = work / "run"
    if (run_dir / "finished.json").is_file():
        raise UserError(f"{run_dir} already holds a finished run: pass --run {run_dir} to use it, or choose "
                        "another --work-dir to train afresh.")
    argv = ["--model", args.model, *(["--gguf-file", args.gguf_file] if args.gguf_file else []),
            "--recipe", args.recipe, "--output-dir", str(work), "--run-name", "run", "--overwrite",
            *shlex.split(args.train_args)]
    return training.main(training.parse_config(argv))


def expand_all(run_dir: Path, topics: dict[str, dict[str, str]], work: Path, args) -> tuple[dict, float]:
    """({'finetuned' | 'zero_shot': {joined qid: record with the candidates}}, the larger peak RSS of the two
    expansion processes in GB). Every collection's topics go in one pass each, run as a user runs the test
    script, so that each pass's peak memory is its own."""
    source = work / "topics.tsv"
    atomic_write_text(source, "".join(f"{name}{QID_JOIN}{qid}\t{query}\n" for name, by_qid in topics.items()
                                      for qid, query in by_qid.items()))
    expansions, peak = {}, 0.0
    for form, extra in (("finetuned", []), ("zero_shot", ["--zero-shot"])):
        out = work / f"{form}.jsonl"
        argv = ["--run", str(run_dir), "--topics", str(source), "--format", "jsonl", "--out", str(out), *extra,
                *shlex.split(args.expand_args)]
        peak = max(peak, run_measured([sys.executable, str(REPO / "testing_finetuned_model.py"), *argv]))
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
        expansions[form] = {r["query_id"]: r for r in records}
    return expansions, peak


def trained_base(run_dir: Path) -> str:
    """The base model the run trained on: its folder or hub id, and the GGUF file inside it."""
    trained = read_record(run_dir).config
    return trained.model + (f" ({trained.gguf_file})" if trained.gguf_file else "")


def run_measured(command: list[str]) -> float:
    """Run a command (its output passes through) and return its peak resident memory in GB; a failure is
    the command's own error, already printed."""
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise UserError(f"{shlex.join(command[1:3])} ... stopped with exit code {process.returncode} (its message "
                        "is above).")
    return round(usage.ru_maxrss / 1024**2, 2)  # KiB on Linux


def checked_shape(args, recipe: dict) -> QueryShape:
    """The query shape the bench's options and the run's recipe make, refused as the test script refuses it."""
    asked = TestConfig(query_form=args.query_form, repeat_query=args.repeat_query, query_weight=args.query_weight,
                       feedback_terms=args.feedback_terms, term_relatedness=args.term_relatedness)
    shape = expansion_shape(recipe, asked)
    fail_if_problems(expansion_form_problems(asked, shape.form), "See `python bench/retrieval.py --help`.")
    return shape


def describe_shape(shape: QueryShape) -> str:
    if shape.form == "feedback":
        related = " (each weighed by its SBERT cosine with the title)" if shape.relatedness == "sbert" else ""
        return (f"the title's words with {shape.query_weight:.0%} of the weight and the {shape.feedback_terms} "
                f"strongest terms of the sampled candidates (and of the base model's passages, where the expansions "
                f"have them){related} with the rest (a weighted bag of words)")
    if shape.query_weight:
        return f"the title repeated until its words are about {shape.query_weight:.0%} of the query's, then the text"
    return f"the title {shape.repeat} time(s), then the text"


def decoding(expansions: Path) -> dict:
    """The generation settings the expansions were made with, from the header of their journal."""
    header = json.loads(journal_path(str(expansions)).read_text(encoding="utf-8").splitlines()[0])
    return {k: v for k, v in header["settings"].items() if k not in ("run", "zero_shot")}


def form_queries(topics: dict[str, str], expansions: dict, name: str, shape: QueryShape) -> dict[str, dict[str, str]]:
    """{form: {qid: query text}} for the BM25 forms; the RM3 forms reuse title and finetuned. The template is
    one candidate of its own."""
    def expanded(kind: str, qid: str) -> str:
        record = expansions[kind][f"{name}{QID_JOIN}{qid}"]
        return shape.query(topics[qid], record["generated"], candidate_texts(record))

    def template(query: str) -> str:
        text = TEMPLATE_BASELINE.format(query=query)
        return shape.query(query, text, [text])

    return {"title": dict(topics),
            "template": {q: template(t) for q, t in topics.items()},
            "zero_shot": {q: expanded("zero_shot", q) for q in topics},
            "finetuned": {q: expanded("finetuned", q) for q in topics}}


def score_collection(collection: retrieval.Collection, topics: dict[str, str], expansions: dict, work: Path,
                     shape: QueryShape) -> dict[str, dict[str, np.ndarray]]:
    """{form: {measure: per-query values in topic order}}."""
    searcher = retrieval.Searcher(retrieval.build_index(collection, work / "indexes"))
    queries = form_queries(topics, expansions, collection.name, shape)
    runs = {form: searcher.search(texts) for form, texts in queries.items()}
    runs["rm3"] = searcher.search(queries["title"], rm3=True)
    runs["finetuned_rm3"] = searcher.search(queries["finetuned"], rm3=True)
    # The parts --rm3-split writes: RM3 over the expansion for short titles, the expansion alone for the rest.
    runs["selective"] = {q: runs["finetuned_rm3" if title_length(t) <= RM3_TITLE_WORDS else "finetuned"][q]
                         for q, t in topics.items()}
    qrels, qids = collection.qrels(), list(topics)
    return {form: retrieval.per_query(runs[form], qrels, qids) for form in FORMS}


def summary(scores: dict[str, dict[str, np.ndarray]], seed: int) -> dict:
    n_topics = len(next(iter(scores["title"].values())))
    rows = {form: {m: float(v.mean()) for m, v in scores[form].items()} for form in FORMS}
    paired = {f"{a}_vs_{b}": {m: retrieval.paired(scores[a][m], scores[b][m], seed) for m in retrieval.MEASURES}
              for a, b in PAIRS}
    return {"n_topics": n_topics, "rows": rows, "paired": paired}


def length_group(title: str) -> str:
    """The LENGTH_GROUPS name of a title."""
    n = title_length(title)
    return next(name for name, fewest, most in LENGTH_GROUPS if n >= fewest and (most is None or n <= most))


def by_title_length(scores: dict[str, dict[str, np.ndarray]], titles: list[str], seed: int) -> dict:
    """summary() of the pooled topics of each length group that has any; `titles` in the scores' order."""
    groups = np.array([length_group(t) for t in titles])
    parts = {}
    for name, _, _ in LENGTH_GROUPS:
        keep = groups == name
        if keep.any():
            parts[name] = summary({form: {m: v[keep] for m, v in by_measure.items()}
                                   for form, by_measure in scores.items()}, seed)
    return parts


def length_table(parts: dict) -> list[str]:
    """One markdown row per length group: nDCG@10 / MAP of the main rows and the two differences that decide."""
    forms, pairs = ("title", "finetuned", "rm3", "finetuned_rm3"), ("finetuned_vs_title", "finetuned_vs_rm3")
    lines = ["## pooled by title length (distinct content words), nDCG@10 / MAP", "",
             "| length | topics | " + " | ".join(forms) + " | " + " | ".join(p.replace("_vs_", " - ") + " (p)" for p in pairs)
             + " |", "|---|" + "---|" * (1 + len(forms) + len(pairs))]
    for name, part in parts.items():
        rows = [f"{part['rows'][f]['nDCG@10']:.4f} / {part['rows'][f]['AP']:.4f}" for f in forms]
        diffs = [" / ".join(f"{part['paired'][p][m]['diff']:+.4f} ({part['paired'][p][m]['p']:.2g})"
                            for m in ("nDCG@10", "AP")) for p in pairs]
        lines.append(f"| {name} | {part['n_topics']} | " + " | ".join(rows + diffs) + " |")
    return lines + [""]


def markdown(report: dict) -> str:
    peak = report["peak_rss_gb"]
    lines = [f"Base: {report['base']}. Peak memory (RSS): training {peak['training']} GB, expansion "
             f"{peak['expansion']} GB.", "", f"Engine: {report['engine']}. Query: {report['query_weighting']}. "
             "Expansions: " + ", ".join(f"{k} {v}" for k, v in report["expansion"].items()) + ".", "", f"Command: `{report['command']}` ({report['seconds']:.0f} s)", ""]
    for name, part in [*report["collections"].items(), ("pooled", report["pooled"])]:
        lines += [f"## {name} ({part['n_topics']} topics)", "", "| row | " + " | ".join(retrieval.MEASURES) + " |",
                  "|---|" + "---|" * len(retrieval.MEASURES)]
        lines += [f"| {form} | " + " | ".join(f"{part['rows'][form][m]:.4f}" for m in retrieval.MEASURES) + " |"
                  for form in FORMS]
        lines += ["", "| paired: mean difference [95% interval] (p) | " + " | ".join(retrieval.MEASURES) + " |",
                  "|---|" + "---|" * len(retrieval.MEASURES)]
        for pair, by_measure in part["paired"].items():
            cells = [f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] ({d['p']:.3g})" for d in by_measure.values()]
            lines.append(f"| {pair.replace('_vs_', ' - ')} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + length_table(report["by_title_length"]))


def main(argv: list[str] | None = None) -> dict:
    """Train or take the run, expand, retrieve, score; returns the report written to --out."""
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    retrieval.check_java()
    collections = [retrieval.find_collection(c) for c in args.collections]
    if len({c.name for c in collections}) != len(collections):
        raise UserError("two collections have the same folder name; give each collection once.")
    topics = {c.name: c.judged_topics() for c in collections}
    for name, judged in topics.items():
        if not judged:
            raise UserError(f"no topic of {name} has a relevant document in its qrels.txt: do the query ids match?")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # The query options are checked against the recipe before any training, so a mistake costs no training.
    shape = checked_shape(args, expansion_defaults(args.run) if args.run else EXPANSION[args.recipe])
    run_dir = trained_run(args, work)
    expansions, expansion_peak = expand_all(run_dir, topics, work, args)
    scores = {c.name: score_collection(c, topics[c.name], expansions, work, shape) for c in collections}
    pooled = {form: {m: np.concatenate([scores[c][form][m] for c in scores]) for m in retrieval.MEASURES}
              for form in FORMS}
    report = {"engine": retrieval.ENGINE, "command": shlex.join(["python", "bench/retrieval.py", *argv]),
              "seconds": 0.0, "run": str(run_dir), "base": trained_base(run_dir),
              "peak_rss_gb": {"training": json.loads((run_dir / "finished.json").read_text()).get("peak_rss_gb"),
                              "expansion": expansion_peak},
              "query_weighting": describe_shape(shape), "expansion": decoding(work / "finetuned.jsonl"),
              "collections": {name: summary(s, args.seed) for name, s in scores.items()},
              "pooled": summary(pooled, args.seed),
              "by_title_length": by_title_length(pooled, [t for c in scores for t in topics[c].values()], args.seed)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"results: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_cli(lambda: bool(main()) and 0, "")
