"""The run directory: what a training run leaves for the test script, written safely.

checkpoints/<run-name>/
    run_config.json        base model, prompt template, hyper-parameters, versions
    split.json             the seeded train/eval/test topics
    adapter_config.json    a standard PEFT adapter (PeftModel.from_pretrained(base, run_dir))
    adapter_model.safetensors
    tokenizer files
    loss_log.json, loss_curve.png
    trainer_checkpoints/   resumable checkpoints while training runs
    finished.json          written last: the run is complete
    predictions*.jsonl, scores*.json, scores*.md   written by the test script

Besides writing files safely, it names new runs, finds the run to resume and its newest complete
checkpoint, and finishes a run: the adapter, the loss log and plot, then finished.json.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from qexpand import runcheck
from qexpand.errors import UserError

# The file names and the safe writing and reading of single files live in the leaf module runfiles
# (which runcheck uses too); they are re-exported here, where the scripts have always found them.
from qexpand.runfiles import (  # noqa: F401 - re-exported
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CONFIG_FILE, FINISHED_FILE, LOSS_LOG_FILE, LOSS_PLOT_FILE,
    ORDINARY_FILE_MODE, SPLIT_FILE, TRAINER_DIR, atomic_write_bytes, atomic_write_json, atomic_write_text,
    create_temp_file, give_ordinary_mode, is_finished, is_run_dir, move_files_into, ordinary_mode, output_paths,
    read_json, read_run_file, write_failed)

log = logging.getLogger(__name__)


class RunLock:
    """An exclusive lock on a run name, held while one process writes that run; a second process
    asking for it is refused at once.

    The lock file sits beside the run directory (which may not exist yet) and is removed on
    release. If a process is killed, the operating system drops its lock and the stale file is
    simply locked again by the next process.
    """

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us may have removed the file between our open and our lock.
            if os.stat(self.path).st_ino != os.fstat(self.handle.fileno()).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            self.handle.close()
            raise UserError(f"another training process is already writing the run {run_dir}. Wait for it to "
                            "end, or choose another --run-name.") from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


def finished_at(run_dir: Path) -> str | None:
    """When the run finished, as its finished.json says; None (and a one-line warning on stderr naming
    the file) when that file cannot be read or does not hold a 'finished_at' time."""
    path = Path(run_dir) / FINISHED_FILE
    try:
        finished = read_json(path)
    except (OSError, ValueError) as error:  # unreadable, not UTF-8 or not JSON
        problem = f"could not be read ({error})"
    else:
        if isinstance(finished, dict) and isinstance(finished.get("finished_at"), str):
            return finished["finished_at"]
        problem = "has no 'finished_at' time"
    print(f"warning: skipping the run {run_dir}: {path} {problem}.", file=sys.stderr)
    return None


def scan_finished_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """The finished runs under `root`, oldest first by the time they finished, and apart those whose
    finished.json is damaged (each named in a warning on stderr)."""
    if not Path(root).is_dir():
        return [], []
    times = {p: finished_at(p) for p in sorted(Path(root).iterdir()) if p.is_dir() and is_finished(p)}
    good = sorted((p for p, time in times.items() if time is not None), key=lambda p: (times[p], p.name))
    return good, [p for p, time in times.items() if time is None]


def finished_runs(root: Path) -> list[Path]:
    """The finished runs under `root`, oldest first by the time they finished; damaged ones left out."""
    return scan_finished_runs(root)[0]


def resolve_run(root: Path, run: str | None, resume_hint: str) -> Path:
    """The run directory named by --run (a path or a name under root), or the newest finished one."""
    if run is None:
        runs, damaged = scan_finished_runs(root)
        if damaged and not runs:
            names = ", ".join(str(p / FINISHED_FILE) for p in damaged)
            raise UserError(
                f"no usable finished training run in {root}: the only finished "
                f"{'run has' if len(damaged) == 1 else 'runs have'} a damaged {FINISHED_FILE} ({names}), which "
                "does not say when it finished. Restore that file from a copy, train a run with "
                "`python training.py`, or name another run directory with --run."
            )
        if not runs:
            raise UserError(
                f"no finished training run in {root}. Train one first with `python training.py`, "
                "or name a run directory with --run."
            )
        return runs[-1]
    path = Path(run) if Path(run).is_dir() else Path(root) / run
    if not path.is_dir():
        raise UserError(f"--run {run}: no such run directory (looked at {run} and {Path(root) / run}).")
    if not is_run_dir(path):
        raise UserError(
            f"--run {run}: {path} is not a run directory (it has no {CONFIG_FILE}); name a folder "
            "that training.py created."
        )
    if not is_finished(path):
        raise UserError(
            f"the run {path} has not finished training (no {FINISHED_FILE}); it was probably "
            f"interrupted. Resume it with `{resume_hint} {path}`, then test it."
        )
    return path


def prepare_new_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse to reuse an existing run directory unless --overwrite; never touch it otherwise."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise UserError(
                f"the run directory {path} already exists. Choose another --run-name, resume it "
                "with --resume, or pass --overwrite to replace it."
            )


def replace_run_dir(path: Path) -> None:
    """Create an empty run directory, deleting an old one only now (after all checks passed)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def start_run_dir(run_dir: Path, config, split: dict, split_json: dict, model, tokenizer, processes: int):
    """Create a new run directory: the tokenizer (checked against the ids training uses), the split and
    the run's record (settings, base model, tokenizer check, processes, library versions)."""
    from qexpand import modeling
    from qexpand.data import training_target
    from qexpand.prompt import format_prompt

    texts = [format_prompt(config.prompt_template, t.query) for t in split["train"]]
    texts += [training_target(t, config.target) for t in split["train"]]
    # The tokenizer is saved and checked before an earlier run of this name (--overwrite) is removed.
    with tempfile.TemporaryDirectory(dir=run_dir.parent, prefix=f".{run_dir.name}-tokenizer-") as staging:
        tokenizer.save_pretrained(staging)
        runcheck.verify_tokenizer(modeling.load_tokenizer(staging), runcheck.tokenizer_check(tokenizer, texts),
                                  f"saved for {run_dir}")
        replace_run_dir(run_dir)
        move_files_into(Path(staging), run_dir)
    atomic_write_json(run_dir / SPLIT_FILE, split_json)
    # A few texts whose ids are recorded, so a tokenizer loaded later can be checked against them.
    checked_texts = [format_prompt(config.prompt_template, split["train"][0].query)]
    checked_texts += [training_target(t, config.target) for t in split["train"][:3]]
    record = runcheck.RunRecord(
        config=config, base_model_signature=modeling.model_signature(model.config),
        tokenizer_check=runcheck.tokenizer_check(tokenizer, checked_texts), processes=processes,
        versions=library_versions(), created_at=datetime.now(timezone.utc).isoformat())
    runcheck.write_record(run_dir, record)
    return record


def library_versions() -> dict:
    """The versions of the libraries that decide what a run trains, for its record."""
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def default_run_name(model: str, gguf_file: str | None) -> str:
    """The model's (or GGUF file's) name and the time: a new run's name when --run-name is not given."""
    base = Path(gguf_file).stem if gguf_file else Path(model.rstrip("/")).name
    return f"{base}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def find_run_to_resume(output_dir: Path, resume: str) -> Path:
    """The run that --resume names (a path, or a name under `output_dir`); '' names the newest
    unfinished run under `output_dir`."""
    root = Path(output_dir)
    if resume:
        path = Path(resume) if Path(resume).is_dir() else root / resume
        if not is_run_dir(path):
            raise UserError(f"--resume {resume}: {path} is not a run directory made by training.py.")
    else:
        unfinished = [p for p in root.glob("*") if is_run_dir(p) and not is_finished(p)] if root.is_dir() else []
        if not unfinished:
            raise UserError(f"--resume: no unfinished run in {root}; name one with --resume RUN.")
        path = max(unfinished, key=lambda p: p.stat().st_mtime)
    if is_finished(path):
        raise UserError(f"the run {path} has already finished; test it with testing_finetuned_model.py.")
    return path


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest Trainer checkpoint whose files were all written.

    The Trainer writes trainer_state.json last, so a checkpoint without it (or without its
    optimizer/scheduler state) was cut off mid-write: it is skipped and removed.
    """
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt", ADAPTER_CONFIG_FILE)
    folder = Path(run_dir) / TRAINER_DIR
    candidates = (sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
                  if folder.is_dir() else [])
    complete = None
    for checkpoint in reversed(candidates):
        if complete is None and all((checkpoint / name).is_file() for name in needed):
            complete = checkpoint
        elif complete is None:
            # Cut off mid-write. Removed, so the Trainer's checkpoint rotation never takes it
            # for the newest one and deletes a good checkpoint instead.
            log.warning("removing the incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)
    return complete


def write_loss_outputs(run_dir: Path, log_history: list[dict]) -> None:
    """The Trainer's log as loss_log.json, and the training and eval losses plotted in loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_json(run_dir / LOSS_LOG_FILE, log_history)
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on description tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # A file of the ordinary mode (savefig keeps it when it writes over it), renamed into place when complete.
    descriptor, temp = create_temp_file(run_dir, prefix=f".{LOSS_PLOT_FILE}.", suffix=".png")
    os.close(descriptor)
    try:
        fig.savefig(temp, dpi=120)
        os.replace(temp, run_dir / LOSS_PLOT_FILE)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise write_failed(run_dir / LOSS_PLOT_FILE, error) from None
    finally:
        plt.close(fig)


def save_final_adapter(model, run_dir: Path) -> None:
    """Write the adapter into a temp folder, then rename each file into the run dir."""
    from qexpand.modeling import no_progress_bars

    try:
        with tempfile.TemporaryDirectory(dir=run_dir, prefix=".final-") as staging, no_progress_bars():
            model.save_pretrained(staging)
            # NaN or infinite weights (training diverged) never enter the run, which then stays unfinished.
            runcheck.refuse_diverged_adapter(Path(staging) / ADAPTER_WEIGHTS_FILE, run_dir)
            move_files_into(Path(staging), run_dir)
    except OSError as error:
        raise write_failed(Path(run_dir) / ADAPTER_WEIGHTS_FILE, error) from None


def mark_finished(run_dir: Path, summary: dict) -> None:
    """Write finished.json (the time it finished and `summary`), then remove the resumable checkpoints,
    which only a finished run no longer needs."""
    atomic_write_json(Path(run_dir) / FINISHED_FILE, {"finished_at": datetime.now(timezone.utc).isoformat(), **summary})
    shutil.rmtree(Path(run_dir) / TRAINER_DIR, ignore_errors=True)
