"""The files of a run directory: their names, and writing and reading them safely.

A leaf module: it imports no other module of the project but `qexpand.errors`, so both
`qexpand.runcheck` (which reads a run back, checked) and `qexpand.rundir` (which writes a whole run)
can use it without importing each other. `qexpand.rundir` re-exports every name defined here.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path

from qexpand.errors import UserError

CONFIG_FILE = "run_config.json"
SPLIT_FILE = "split.json"
FINISHED_FILE = "finished.json"
LOSS_LOG_FILE = "loss_log.json"
LOSS_PLOT_FILE = "loss_curve.png"
TRAINER_DIR = "trainer_checkpoints"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# What an ordinary open(path, "w") asks for; the kernel takes the umask (or a default ACL) off it.
ORDINARY_FILE_MODE = 0o666


def write_failed(path: Path, error: OSError) -> UserError:
    full = " The disk is full: free some space and run again." if error.errno == errno.ENOSPC else ""
    return UserError(f"could not write {path} ({error.strerror or error}); nothing was replaced, so any "
                     f"earlier version of that file is intact.{full}")


def create_temp_file(folder: Path, prefix: str = "", suffix: str = "") -> tuple[int, Path]:
    """A new, empty file in `folder` with a name no other file has: (its open descriptor, its path).

    Unlike tempfile's files (always mode 0600), it is created as open(path, "w") creates a file, so
    the umask (or a shared folder's default ACL) decides its mode: once renamed into a run directory,
    the other members of a shared group folder can read it. O_EXCL makes the name ours alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, ORDINARY_FILE_MODE), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(folder))


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file, and
    a write that fails part-way (a full disk) leaves the earlier file as it was. The file gets the
    mode an ordinary open(path, "w") would give it."""
    path = Path(path)
    try:
        descriptor, temp = create_temp_file(path.parent, prefix=f".{path.name}.")
    except OSError as error:
        raise write_failed(path, error) from None
    try:
        with open(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise write_failed(path, error) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_run_file(run_dir: Path, name: str):
    """A JSON file of a run directory; a missing or damaged one is a user error, not a crash."""
    try:
        return read_json(Path(run_dir) / name)
    except (OSError, ValueError) as error:
        raise UserError(
            f"the run directory {run_dir} is damaged: {name} could not be read ({error}). "
            "Train the run again, or restore the file."
        ) from None


def output_paths(run_dir: Path, evaluation: str) -> dict[str, Path]:
    """Where the test script writes its files for one evaluation (test, eval, adhoc, testsets-...)."""
    suffix = "" if evaluation == "test" else f"-{evaluation}"  # the run's own test split keeps the plain names
    return {kind: Path(run_dir) / f"{stem}{suffix}.{ext}" for kind, stem, ext in (
        ("predictions", "predictions", "jsonl"), ("scores", "scores", "json"), ("table", "scores", "md"))}


def ordinary_mode(folder: Path) -> int:
    """The mode open(path, "w") gives a new file in `folder` (0644 under umask 022), measured on a probe
    file: exact (a default ACL included) and, unlike os.umask(0) then back, safe beside other threads."""
    descriptor, probe = create_temp_file(folder, prefix=".mode-probe-")
    try:
        return stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def give_ordinary_mode(path: Path, file_mode: int) -> None:
    """`file_mode` for a file; for a folder the same plus search where it may read, and so for all it holds."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        os.chmod(path, file_mode | (file_mode & 0o444) >> 2)
        for item in path.iterdir():
            give_ordinary_mode(item, file_mode)
    else:
        os.chmod(path, file_mode)


def move_files_into(source: Path, target: Path) -> None:
    """Move every file of `source` into `target` by rename (atomic per file on one filesystem).

    Each file first gets the mode a file newly opened in `target` would get: libraries that write
    atomically themselves (safetensors) leave mode 0600 files, which other members of a shared
    group folder could not read."""
    file_mode = ordinary_mode(target)
    for item in Path(source).iterdir():
        give_ordinary_mode(item, file_mode)
        os.replace(item, Path(target) / item.name)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def is_finished(path: Path) -> bool:
    return (Path(path) / FINISHED_FILE).is_file()
