"""The run directory: its files' modes, finding the newest finished run, and the package's import graph."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from qexpand import rundir, runfiles
from qexpand.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "qexpand"


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_give_the_mode_of_an_ordinary_open(tmp_path, umask_022):
    written = {
        "text.md": lambda p: rundir.atomic_write_text(p, "# scores\n"),
        "data.json": lambda p: rundir.atomic_write_json(p, {"ndcg": 0.5}),
        "raw.bin": lambda p: runfiles.atomic_write_bytes(p, b"\x00\x01"),
    }
    for name, write in written.items():
        write(tmp_path / name)
    (tmp_path / "ordinary.txt").write_text("x")  # what the helpers must match
    assert mode(tmp_path / "ordinary.txt") == 0o644
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {name: 0o644 for name in [*written, "ordinary.txt"]}
    assert json.loads((tmp_path / "data.json").read_text()) == {"ndcg": 0.5}

    # Writing over an existing file still replaces it atomically, with the mode of the umask now.
    os.umask(0o002)  # a shared group folder
    rundir.atomic_write_json(tmp_path / "data.json", {"ndcg": 0.75})
    assert mode(tmp_path / "data.json") == 0o664
    assert json.loads((tmp_path / "data.json").read_text()) == {"ndcg": 0.75}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written, "ordinary.txt"])  # no temp file left


def test_a_run_directory_written_by_the_helpers_has_no_private_file(tmp_path, umask_022, mistral_tokenizer):
    """A whole run as training.py writes one (start, adapter, loss outputs, finished): every file is
    readable by the group and others, as files that open(..., "w") creates under umask 022 are."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qexpand.config import TrainConfig
    from qexpand.data import Topic, split_to_json

    run_dir = tmp_path / "runs" / "shared-run"
    run_dir.parent.mkdir()
    topics = [Topic("set", str(i), f"query {i}", f"Description of topic {i}.") for i in range(4)]
    split = {"train": topics[:2], "eval": topics[2:3], "test": topics[3:]}
    config = TrainConfig(prompt_template="Query: {query}\nDescription:", target="description")
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2))
    rundir.start_run_dir(run_dir, config, split, split_to_json(split, 0, ["set"]), model, mistral_tokenizer, 1)

    torch.manual_seed(0)
    adapter = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    (run_dir / rundir.TRAINER_DIR).mkdir()
    rundir.save_final_adapter(adapter, run_dir)
    rundir.write_loss_outputs(run_dir, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}])
    rundir.mark_finished(run_dir, {"steps": 2})

    names = {p.name for p in run_dir.iterdir()}
    assert {rundir.CONFIG_FILE, rundir.SPLIT_FILE, rundir.ADAPTER_CONFIG_FILE, rundir.ADAPTER_WEIGHTS_FILE,
            rundir.LOSS_LOG_FILE, rundir.LOSS_PLOT_FILE, rundir.FINISHED_FILE} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file or staging folder left
    files = {str(p.relative_to(run_dir)): mode(p) for p in run_dir.rglob("*") if p.is_file()}
    assert {name: m for name, m in files.items() if m != 0o644} == {}
    assert mode(run_dir) == 0o755
    assert rundir.resolve_run(run_dir.parent, None, "resume") == run_dir


def finished_run(root: Path, name: str, finished: str | bytes) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text("{}")
    target = run / rundir.FINISHED_FILE
    target.write_bytes(finished) if isinstance(finished, bytes) else target.write_text(finished)
    return run


DAMAGED = {
    "not-json": "{finished_at: ",
    "list": "[]",
    "string": '"x"',
    "number-time": '{"finished_at": 5}',
    "no-time": '{"steps": 3}',
    "not-utf8": b"\xff\xfe{}",
    "empty": "",
}


def test_the_newest_run_lookup_skips_a_damaged_finished_file_with_a_warning(tmp_path, capsys):
    older = finished_run(tmp_path, "older", json.dumps({"finished_at": "2026-01-01T00:00:00+00:00"}))
    newer = finished_run(tmp_path, "newer", json.dumps({"finished_at": "2026-02-01T00:00:00+00:00"}))
    damaged = [finished_run(tmp_path, f"z-{name}", text) for name, text in DAMAGED.items()]
    (tmp_path / "unfinished").mkdir()  # no finished.json: not a candidate, no warning
    (tmp_path / "unfinished" / rundir.CONFIG_FILE).write_text("{}")

    assert rundir.resolve_run(tmp_path, None, "python training.py --resume") == newer
    assert rundir.finished_runs(tmp_path) == [older, newer]
    lines = capsys.readouterr().err.splitlines()
    warnings = lines[:len(damaged)]
    assert len(lines) == 2 * len(damaged)  # one line per damaged run, for each of the two lookups
    for run in damaged:
        [line] = [w for w in warnings if str(run / rundir.FINISHED_FILE) in w]
        assert line.startswith("warning: skipping the run")
    assert "Traceback" not in "\n".join(lines)


def test_no_good_finished_run_left_is_a_user_error(tmp_path, capsys):
    from qexpand.errors import EXIT_USER_ERROR, run_cli

    damaged = [finished_run(tmp_path, name, text) for name, text in DAMAGED.items()]
    with pytest.raises(UserError) as error:
        rundir.resolve_run(tmp_path, None, "python training.py --resume")
    message = str(error.value)
    assert "\n" not in message and "no usable finished training run" in message
    assert all(str(run / rundir.FINISHED_FILE) in message for run in damaged)
    assert "--run" in message and "python training.py" in message
    assert len(capsys.readouterr().err.splitlines()) == len(damaged)

    # As the test script reports it: a paragraph and exit code 2, no traceback.
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: rundir.resolve_run(tmp_path, None, "resume"), oom_hint="")
    assert exit_.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: no usable finished training run" in err

    # An empty folder keeps its own message.
    (tmp_path / "no-runs").mkdir()
    with pytest.raises(UserError, match="no finished training run in"):
        rundir.resolve_run(tmp_path / "no-runs", None, "resume")


def test_the_names_used_elsewhere_are_still_found_where_they_were():
    for name in ("CONFIG_FILE", "SPLIT_FILE", "FINISHED_FILE", "LOSS_LOG_FILE", "LOSS_PLOT_FILE", "TRAINER_DIR",
                 "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "write_failed", "atomic_write_text",
                 "atomic_write_json", "read_json", "read_run_file", "output_paths", "move_files_into",
                 "is_run_dir", "is_finished", "RunLock", "resolve_run", "finished_runs", "start_run_dir",
                 "save_final_adapter", "write_loss_outputs", "mark_finished", "find_run_to_resume",
                 "latest_complete_checkpoint", "prepare_new_run_dir", "default_run_name"):
        assert hasattr(rundir, name), name
    from qexpand import runcheck

    assert runcheck.ADAPTER_WEIGHTS_FILE == rundir.ADAPTER_WEIGHTS_FILE


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports anywhere in it (top level, functions, classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # `from package import module` imports the module; `from module import name`, the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import qexpand.x.y` of a name that is no module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    modules = project_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert "qexpand.runfiles" in graph["qexpand.runcheck"] and "qexpand.runcheck" in graph["qexpand.rundir"]
    assert graph["qexpand.runfiles"] <= {"qexpand.errors"}  # the leaf


def test_files_moved_into_a_run_get_the_mode_of_an_ordinary_open(tmp_path):
    import tempfile

    staging, target = tmp_path / "staging", tmp_path / "run"
    staging.mkdir()
    target.mkdir()
    old = os.umask(0o002)  # a shared group folder
    try:
        descriptor, private = tempfile.mkstemp(dir=staging)  # as a library that writes atomically leaves it
        os.close(descriptor)
        os.rename(private, staging / "weights.safetensors")
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "vocab.txt").write_text("a")
        os.chmod(staging / "sub" / "vocab.txt", 0o600)
        rundir.move_files_into(staging, target)
    finally:
        os.umask(old)
    assert mode(target / "weights.safetensors") == 0o664
    assert mode(target / "sub") == 0o775 and mode(target / "sub" / "vocab.txt") == 0o664
    assert list(staging.iterdir()) == [] and sorted(p.name for p in target.iterdir()) == ["sub", "weights.safetensors"]
