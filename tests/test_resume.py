"""A run killed with SIGKILL mid-training resumes from its last complete checkpoint and ends where an
uninterrupted run with the same seed ends; secrets never reach the run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_script, snapshot
from tests.fixtures import write_topic_files

# 4-bit NF4 on the CPU: a resumed run must load the base as it was recorded, not by the device default.
TRAIN_ARGS = ("--split", "30", "5", "5", "--epochs", "4", "--batch-size", "2", "--save-every", "5",
              "--quantization", "nf4")
FAKE_TOKEN = "hf_" + "Q" * 34


def train_command(tiny_model, out, name, *extra):
    return [sys.executable, str(REPO / "training.py"), "--model", str(tiny_model), *TRAIN_ARGS,
            "--output-dir", str(out), "--run-name", name, *extra]


def kill_after_first_checkpoint(command, env, run_dir, timeout=300):
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = list((run_dir / "trainer_checkpoints").glob("checkpoint-*/trainer_state.json"))
            if done:
                break
            assert process.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def built_runs(tmp_path_factory, tiny_model):
    """The runs every test of this module reads (built once): "straight", trained without a break, and
    "killed", killed after its first checkpoint and resumed. Tests read them through `runs`; a test that
    writes to a run works on its own copy (`own_copy`)."""
    root = tmp_path_factory.mktemp("resume")
    write_topic_files(root / "irds")
    env = {**os.environ, "IR_DATASETS_HOME": str(root / "irds"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    out = root / "runs"
    straight = subprocess.run(train_command(tiny_model, out, "straight"), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    code = kill_after_first_checkpoint(train_command(tiny_model, out, "killed"), env, out / "killed")
    assert code == -signal.SIGKILL
    assert not (out / "killed" / "finished.json").exists()
    split_before = (out / "killed" / "split.json").read_bytes()
    # A checkpoint the kill cut off mid-write: no trainer_state.json, optimizer state missing.
    partial = out / "killed" / "trainer_checkpoints" / "checkpoint-99999"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    conflicting = run_script("training.py", "--output-dir", out, "--resume", "killed", "--epochs", "9",
                             "--quantization", "none", home=root / "irds", cwd=root)
    resumed = subprocess.run(
        [sys.executable, str(REPO / "training.py"), "--output-dir", str(out), "--resume", "killed"],
        env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"root": root, "out": out, "resumed": resumed, "split_before": split_before, "conflicting": conflicting,
            "files": snapshot(out)}


@pytest.fixture()
def runs(built_runs):
    """The module's runs, checked after each test to be as they were built: a test that wrote to them
    would make the tests after it depend on the order they run in (only the test that wrote fails here)."""
    yield built_runs
    before, now = built_runs["files"], snapshot(built_runs["out"])
    built_runs["files"] = now
    assert now == before, "a test changed the module's shared runs; it must work on its own copy (own_copy)"


def own_copy(runs, name, tmp_path):
    """A copy of the module's run `name` in an output folder of the test's own; that folder."""
    out = tmp_path / "runs"
    shutil.copytree(runs["out"] / name, out / name)
    return out


def eval_losses(run_dir):
    return [e["eval_loss"] for e in json.loads((run_dir / "loss_log.json").read_text()) if "eval_loss" in e]


def test_resumed_run_matches_uninterrupted_run(runs):
    out = runs["out"]
    assert "resuming from" in runs["resumed"].stdout
    assert "checkpoint-99999" in runs["resumed"].stderr and not (out / "killed" / "trainer_checkpoints").exists()
    straight = json.loads((out / "straight" / "finished.json").read_text())
    killed = json.loads((out / "killed" / "finished.json").read_text())
    assert killed["global_steps"] == straight["global_steps"]
    assert killed["best_eval_loss"] == pytest.approx(straight["best_eval_loss"], rel=1e-4)
    assert eval_losses(out / "killed") == pytest.approx(eval_losses(out / "straight"), rel=1e-4)


def test_resumed_run_keeps_its_recorded_settings(runs):
    out = runs["out"]
    assert "(nf4, cpu)" in runs["resumed"].stdout
    assert json.loads((out / "killed" / "finished.json").read_text())["loaded"]["quantization"] == "nf4"
    conflicting = runs["conflicting"]
    message = " ".join(conflicting.stderr.split())
    assert conflicting.returncode == 2 and "Traceback" not in conflicting.stderr
    assert "--epochs 9.0 differs from the run's recorded 4.0" in message
    assert "--quantization none differs from the run's recorded nf4" in message


def test_resumed_throughput_counts_only_the_resumed_steps(runs):
    finished = json.loads((runs["out"] / "killed" / "finished.json").read_text())
    steps_per_epoch = 30 // 2
    resumed_steps = finished["global_steps"] - finished["resumed_from_step"]
    assert finished["resumed_from_step"] > 0 and resumed_steps > 0
    samples = finished["train_samples_per_second"] * finished["train_seconds"]
    assert samples == pytest.approx(30 * resumed_steps / steps_per_epoch, rel=0.02)


def test_resume_reuses_the_split(runs):
    assert (runs["out"] / "killed" / "split.json").read_bytes() == runs["split_before"]


def test_resumed_run_is_testable(runs, tmp_path):
    out = own_copy(runs, "killed", tmp_path)  # the test script writes its predictions and scores there
    result = run_script("testing_finetuned_model.py", "--output-dir", out, "--run", "killed",
                        "--max-new-tokens", "4", home=runs["root"] / "irds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "killed" / "scores.json").read_text())
    assert scores["loaded"]["quantization"] == "nf4"  # as the run was trained
    assert len((out / "killed" / "predictions.jsonl").read_text().splitlines()) == 5  # the 5 test topics


def test_token_never_lands_in_a_run_directory(runs):
    for path in runs["out"].rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in runs["resumed"].stdout + runs["resumed"].stderr


def test_existing_run_is_kept_without_overwrite_and_replaced_with_it(runs, tiny_model, tmp_path):
    out, home = own_copy(runs, "straight", tmp_path), runs["root"] / "irds"  # it replaces the run
    before = snapshot(out)
    refused = run_script("training.py", "--model", tiny_model, *TRAIN_ARGS, "--output-dir", out,
                         "--run-name", "straight", home=home, cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert snapshot(out) == before
    replaced = run_script("training.py", "--model", tiny_model, "--split", "30", "5", "5", "--epochs", "1",
                          "--output-dir", out, "--run-name", "straight", "--overwrite", home=home, cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((out / "straight" / "run_config.json").read_text())["config"]["epochs"] == 1


def test_a_run_recorded_before_later_settings_existed_still_reads(tmp_path):
    from dataclasses import asdict

    from qexpand.config import TrainConfig
    from qexpand.runcheck import RunRecord, read_record

    record = RunRecord(config=TrainConfig(compile="on", lora_kernels="fused"), base_model_signature={},
                       tokenizer_check={"texts": [], "ids": []}, processes=1, versions={}, created_at="then")
    written = asdict(record)
    for added_later in ("compile", "lora_kernels"):
        del written["config"][added_later]
    (tmp_path / "run_config.json").write_text(json.dumps(written))
    config = read_record(tmp_path).config
    # Such a run trained eagerly with peft's layers, and says so now.
    assert (config.compile, config.lora_kernels) == ("off", "peft")
    written["config"]["lora_kernels"] = "fused"
    (tmp_path / "run_config.json").write_text(json.dumps(written))
    assert read_record(tmp_path).config.lora_kernels == "fused"  # a recorded value is kept


def test_a_run_recorded_with_compiled_blocks_over_fused_layers_is_not_resumed(tmp_path):
    """An earlier version settled --compile on to fused layers; that pair trained to a wrong loss on a GPU."""
    import pytest

    import training
    from qexpand.config import TrainConfig
    from qexpand.errors import UserError
    from qexpand.recipes import settle_resumed
    from qexpand.runcheck import RunRecord

    def resumed(lora_kernels: str):
        record = RunRecord(config=TrainConfig(device="cpu", compile="on", lora_kernels=lora_kernels),
                           base_model_signature={}, tokenizer_check={"texts": [], "ids": []}, processes=1,
                           versions={}, created_at="then")
        return settle_resumed(training.parse_config(["--resume", str(tmp_path)]), tmp_path, record)

    with pytest.raises(UserError, match="not continued"):
        resumed("fused")
    assert resumed("peft").compile == "on"
