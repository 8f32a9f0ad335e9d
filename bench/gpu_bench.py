"""GPU speed benchmark: training throughput of the QLoRA recipes, generation of the test
descriptions, and whole-script wall times, on a random model of the exact Mistral-7B shape.

One command on one H100 (torch+cu130, transformers, peft and accelerate come with the image; the
missing packages unpacked into /tmp/site, the Mistral tokenizer and the TREC topic files copied
beside the code):

    PYTHONPATH=/tmp/site python3 bench/gpu_bench.py --tokenizer TOKENIZER_DIR --topics-home IRDS_DIR \
        --out bench/results/gpu.json

CPU check of every code path except the CUDA-only calls (a 2-layer random Mistral, a few steps):

    python bench/gpu_bench.py --tiny --recipes default,original --out /tmp/gpu-tiny.json

Stages, each in its own subprocess (every peak-memory figure is its own, a crash costs one stage,
the JSON is rewritten after each): build (bench/gpu_build.py: model folder, examples), train-RECIPE
(bench/recipes/: default and original through `python training.py`; trl and unsloth, the peers),
generate (bench/gpu_generate.py), scripts (training.py then testing_finetuned_model.py as a user runs them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `python bench/gpu_bench.py` puts bench/ on sys.path, not the repository root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import gpu_report  # noqa: E402
from bench.recipes import project  # noqa: E402
from bench.gpu_common import (  # noqa: E402
    H100_SXM_BF16_DENSE_TFLOPS, OFFLINE_DATASETS, Paths, model_params, mfu, package_version, python_command,
    run_logged, write_json,
)
from qexpand.recipes import resolve_device  # noqa: E402
from qexpand.rundir import read_json  # noqa: E402

STAGE_GROUPS = ("train", "generate", "scripts")
PROJECT_RECIPES = ("original", *project.VARIANTS)
RECIPES = PROJECT_RECIPES + ("trl", "unsloth")
DEFAULT_RECIPES = ("default", "original", "trl", "unsloth")
# Stages the report needs most come first, so a run cut short by --budget-s still has them.
FIRST = ("train-default", "generate", "train-original", "train-trl", "train-unsloth", "scripts")
TINY_DEFAULTS = dict(warmup_steps=1, measure_steps=2, original_examples=4, train_examples=24, gen_new_tokens=8,
                     original_gen_prompts=2, budget_s=1800)
FULL_DEFAULTS = dict(warmup_steps=2, measure_steps=10, original_examples=32, train_examples=280, gen_new_tokens=48,
                     original_gen_prompts=2, budget_s=560)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark training and generation of the QLoRA query expander on one GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"),
                        help="JSON file with all results (rewritten after each stage)")
    parser.add_argument("--stages", default=",".join(STAGE_GROUPS),
                        help=f"comma-separated parts to run, of {','.join(STAGE_GROUPS)} (the model is built first)")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"training recipes to time, of {','.join(RECIPES)}")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer random Mistral and a few steps: checks the code paths on a CPU")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run the stages")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the model, data, adapters and runs; reused (default: <tmp>/qexpand-gpu-bench)")
    parser.add_argument("--rebuild", action="store_true", help="build the random model again even if one exists")
    parser.add_argument("--seed", type=int, default=42, help="seed of the example order and the model weights")
    parser.add_argument("--tokenizer", default=None,
                        help="Mistral tokenizer file or saved folder (default: mistral-common's copy)")
    parser.add_argument("--topics-home", default=None,
                        help="ir_datasets cache folder with the TREC topic files (copied before use); default: "
                             "../shared/ir_datasets")
    parser.add_argument("--datasets", nargs="+", default=list(OFFLINE_DATASETS), metavar="ID",
                        help="ir_datasets topic sets for the examples")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="training examples of the window recipes; 3N of the default's N-vs-3N training.py runs")
    parser.add_argument("--original-examples", type=int, default=None,
                        help="N of the N-vs-3N training.py runs of the original recipe (slow, fixed-shape steps)")
    parser.add_argument("--test-queries", type=int, default=35, help="queries expanded in the generation stage")
    parser.add_argument("--warmup-steps", type=int, default=None, help="optimizer steps before a timed window")
    parser.add_argument("--measure-steps", type=int, default=None, help="optimizer steps in a timed window")
    parser.add_argument("--gen-new-tokens", type=int, default=None, help="max_new_tokens of every generation")
    parser.add_argument("--original-gen-prompts", type=int, default=None,
                        help="prompts generated one at a time (the original way), scaled to --test-queries")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--in-order", action="store_true",
                        help="run the training recipes in the order given (e.g. A,B,B-again,A-again against the "
                             "host's drift) instead of the most needed first")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget; stages that would start after it are skipped")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one stage in this process
    return parser


def resolve_options(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill the size-dependent defaults and the paths; the result is what the children get."""
    for name, value in (TINY_DEFAULTS if opts.tiny else FULL_DEFAULTS).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.work_dir is None:
        opts.work_dir = str(Path(tempfile.gettempdir()) / ("qexpand-gpu-bench" + ("-tiny" if opts.tiny else "")))
    opts.work_dir = str(Path(opts.work_dir).resolve())
    opts.out = str(Path(opts.out).resolve())
    opts.stage_groups = [s.strip() for s in opts.stages.split(",") if s.strip()]
    opts.recipe_list = [r.strip() for r in opts.recipes.split(",") if r.strip()]
    problems = [f"unknown stage '{s}'" for s in opts.stage_groups if s not in STAGE_GROUPS]
    problems += [f"unknown recipe '{r}'" for r in opts.recipe_list if r not in RECIPES]
    if min(opts.warmup_steps, opts.measure_steps, opts.original_examples, opts.train_examples) < 1:
        problems.append("the step and example counts must be at least 1")
    if problems:
        raise SystemExit("gpu_bench: " + "; ".join(problems))
    opts.deadline = time.time() + opts.budget_s
    return opts


def stage_train(opts, paths: Paths, recipe: str) -> dict:
    from bench.recipes import trl, unsloth

    device = resolve_device(opts.device)

    def left_s() -> float:
        return opts.deadline - time.time()

    if recipe == "original":
        result = project.run_original(opts, paths, device, left_s)
    elif recipe in project.VARIANTS:
        result = project.run_default(opts, paths, left_s, recipe)
    elif recipe == "unsloth":
        result = unsloth.run(opts, paths, device, left_s)
    else:
        result = trl.run(opts, paths, device, left_s)
    result["mfu"] = mfu(result, model_params(paths), opts.peak_tflops)
    return result


def run_child(stage: str, work_dir: str) -> int:
    if stage == "train-unsloth":
        import unsloth  # noqa: F401 - before transformers, so its patches apply everywhere
    from bench.gpu_build import stage_build
    from bench.gpu_generate import stage_generate

    opts = argparse.Namespace(**read_json(Path(work_dir) / "options.json"))
    paths = Paths(opts)
    try:
        if stage == "build":
            result = stage_build(opts, paths)
        elif stage == "generate":
            result = stage_generate(opts, paths)
        else:
            result = stage_train(opts, paths, stage[len("train-"):])
        code = 0
    except Exception as error:  # noqa: BLE001 - the parent records it and goes on with the next stage
        traceback.print_exc()
        result, code = {"error": f"{type(error).__name__}: {error}"[:3000]}, 1
    write_json(paths.results / f"{stage}.json", result)
    return code


class Run:
    """The parent's state: options, paths, the report being filled, the time budget."""

    def __init__(self, opts):
        self.opts = opts
        self.paths = Paths(opts)
        self.report = {
            "gpu": None, "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(),
            "tiny": opts.tiny, "options": vars(opts).copy(), "train_samples_per_s": {}, "peak_gb": {},
            "real_tokens_per_s": {}, "mfu": {}, "mfu_default": None, "generate_35_s": {},
            "training_py_wall_s": None, "testing_py_wall_s": None, "ratios": {}, "stages": {}, "errors": {},
        }
        self.started = time.time()

    def left_s(self) -> float:
        return self.opts.deadline - time.time()

    def record(self, stage: str, result: dict, seconds: float) -> None:
        result = dict(result, stage_wall_s=round(seconds, 1))
        self.report["stages"][stage] = result
        if "error" in result:
            self.report["errors"][stage] = result["error"]
        gpu_report.summarise(self.report)
        self.report["elapsed_s"] = round(time.time() - self.started, 1)
        write_json(Path(self.opts.out), self.report)
        status = "FAILED: " + result["error"].splitlines()[0][:200] if "error" in result else "ok"
        print(f"[gpu_bench] {stage}: {status} ({seconds:.0f} s; {self.left_s():.0f} s of budget left)", flush=True)


def versions() -> dict:
    names = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "unsloth",
             "unsloth_zoo", "liger-kernel", "tokenizers")
    return {**{name: package_version(name) for name in names}, "python": sys.version.split()[0]}


def run_stage_process(run: Run, stage: str) -> None:
    """One stage in a child process of this script, within what is left of the budget."""
    if run.left_s() < 20:
        run.record(stage, {"error": f"skipped: only {run.left_s():.0f} s of --budget-s left"}, 0)
        return
    result_file = run.paths.results / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--only", stage, "--work-dir", run.opts.work_dir]
    outcome = run_logged(command, run.paths, stage, run.left_s(), cwd=REPO)
    result = read_json(result_file) if result_file.is_file() else {}
    if outcome["exit"] != 0:
        result.setdefault("error", f"stage process ended ({outcome['exit']}) without a result")
        result["log_tail"] = outcome.get("log_tail")
    run.record(stage, result, outcome["wall_s"])


def stage_scripts(run: Run) -> None:
    """training.py (its defaults: 3 epochs, eval each epoch) then testing_finetuned_model.py, as a user runs them."""
    from qexpand import rundir

    paths, opts = run.paths, run.opts
    shutil.rmtree(paths.runs / "bench", ignore_errors=True)
    source = ["--datasets", *opts.datasets, "--split", "230", "35", "35"]
    started = time.time()
    training = run_logged(python_command("training.py", "--model", paths.model, *source, "--output-dir", paths.runs,
                                         "--run-name", "bench"), paths, "training.py", run.left_s())
    result = {"training": training}
    run_dir = paths.runs / "bench"
    if "error" not in training:
        result["training"]["finished"] = rundir.read_run_file(run_dir, rundir.FINISHED_FILE)
        args = ["--run", run_dir]
        if (paths.sbert / "config.json").is_file():
            args += ["--sbert-model", paths.sbert]
        testing = run_logged(python_command("testing_finetuned_model.py", *args), paths, "testing", run.left_s())
        if "error" not in testing:
            scores = read_json(rundir.output_paths(run_dir, "test")["scores"])
            testing.update({k: scores.get(k) for k in ("generation_seconds", "merged", "loaded")})
        result["testing"] = testing
    errors = [part["error"] for part in result.values() if "error" in part]
    if errors:
        result["error"] = errors[0]
    run.record("scripts", result, time.time() - started)


def planned_stages(opts) -> list[str]:
    wanted = [f"train-{r}" for r in opts.recipe_list] if "train" in opts.stage_groups else []
    wanted += [s for s in ("generate", "scripts") if s in opts.stage_groups]
    if opts.in_order:
        return wanted
    return sorted(wanted, key=lambda s: FIRST.index(s) if s in FIRST else len(FIRST))


def run_all(opts) -> dict:
    run = Run(opts)
    run.paths.work.mkdir(parents=True, exist_ok=True)
    write_json(run.paths.options, vars(opts))
    print(f"[gpu_bench] work dir {opts.work_dir}; results -> {opts.out}", flush=True)
    run_stage_process(run, "build")
    if "error" not in run.report["stages"]["build"]:
        for stage in planned_stages(opts):
            stage_scripts(run) if stage == "scripts" else run_stage_process(run, stage)
    gpu_report.print_table(run.report)
    return run.report


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.only:
        return run_child(opts.only, opts.work_dir)
    report = run_all(resolve_options(opts))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
