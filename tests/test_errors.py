"""Every bad input gets one clear paragraph, exit code 2, no traceback, and nothing on disk changes."""

from __future__ import annotations

import json

import pytest
import torch

from qexpand import data
from qexpand.errors import run_cli
from tests.conftest import run_script, snapshot
from tests.fixtures import SUBJECTS, tiny_mistral_folder, write_topic_files

SPLIT = ("--split", "30", "5", "5")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Topic files, plus an output folder holding one finished run and one interrupted run."""
    root = tmp_path_factory.mktemp("errors")
    write_topic_files(root / "irds")
    runs = root / "runs"
    signature = {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "vocab_size": 32000}
    for name, finished in (("done", True), ("cut", False)):
        (runs / name).mkdir(parents=True)
        config = {"base_model": str(tiny_model), "gguf_file": None, "base_model_signature": signature,
                  "prompt_template": "{query}"}
        (runs / name / "run_config.json").write_text(json.dumps(config))
        if finished:
            (runs / name / "finished.json").write_text(json.dumps({"finished_at": "2026-01-01T00:00:00"}))
    # The finished run was trained on every query of the Web 2009 stand-in.
    web = [data.Topic("clueweb09/catb/trec-web-2009", str(i), s, "d") for i, s in enumerate(SUBJECTS[:12], 1)]
    split = data.split_to_json({"train": web, "eval": [], "test": []}, 42, ["clueweb09/catb/trec-web-2009"])
    (runs / "done" / "split.json").write_text(json.dumps(split))
    (runs / "not-a-run").mkdir()
    return root


def expect_error(world, script, *args, match: str):
    before = snapshot(world / "runs")
    result = run_script(script, "--output-dir", world / "runs", *args, home=world / "irds", cwd=world)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "error:" in message and match in message, message
    assert snapshot(world / "runs") == before
    return message


@pytest.mark.parametrize("args, match", [
    (("--datasets", "no/such-set"), "unknown data set id 'no/such-set'"),
    (("--datasets", "antique/test"), "a 'description' field are needed"),
    (("--split", "0", "5", "5"), "each count must be at least 1"),
    (("--split", "30", "-1", "5"), "each count must be at least 1"),
    (("--split", "300", "35", "35"), "the data sets hold only 41"),
    (("--run-name", "done"), "already exists"),
    (("--device", "cuda"), "PyTorch sees no CUDA GPU"),
    (("--epochs", "0", "--lora-dropout", "1.5"), "--epochs must be positive"),
    (("--gguf-file", "missing.gguf"), "--gguf-file missing.gguf: no such file"),
    (("--resume", "not-a-run"), "is not a run directory"),
    (("--resume", "done"), "has already finished"),
])
def test_training_bad_input(world, tiny_model, args, match):
    model = ("--model", tiny_model) if "--model" not in args else ()
    expect_error(world, "training.py", *model, *SPLIT, *args, match=match)


def test_training_reports_all_option_problems_at_once(world, tiny_model):
    message = expect_error(world, "training.py", "--model", tiny_model, "--epochs", "0", "--lora-dropout", "1.5",
                           "--batch-size", "-2", match="--epochs must be positive")
    assert "--lora-dropout must be in [0, 1)" in message and "--batch-size must be positive" in message


def test_unknown_model_offline(world):
    message = expect_error(world, "training.py", "--model", "nobody-here/no-such-model", *SPLIT,
                           "--run-name", "x", match="could not load 'nobody-here/no-such-model'")
    assert "HF_HUB_OFFLINE" in message


def test_missing_local_model_folder(world):
    expect_error(world, "training.py", "--model", "./no/such/folder", *SPLIT, match="is not a folder")


def test_topic_file_that_cannot_be_downloaded(world, tiny_model, tmp_path):
    home = tmp_path / "irds"
    write_topic_files(home, with_gov=False)  # gov/trec-web-2002 missing: ir_datasets tries to download it
    before = snapshot(world / "runs")
    result = run_script("training.py", "--model", tiny_model, *SPLIT, "--output-dir", world / "runs",
                        home=home, cwd=world)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "gov/trec-web-2002" in message and "IR_DATASETS_HOME" in message
    assert str(home / "gov" / "trec-web-2002" / "queries.txt.gz") in message
    assert snapshot(world / "runs") == before


@pytest.mark.parametrize("args, match", [
    (("--run", "nope"), "no such run directory"),
    (("--run", "not-a-run"), "is not a run directory"),
    (("--run", "cut"), "has not finished training"),
    (("--run", "done", "--query", "   "), "empty or whitespace-only query"),
    (("--run", "done", "--device", "cuda"), "PyTorch sees no CUDA GPU"),
    (("--run", "done", "--batch-size", "0"), "--batch-size must be positive"),
    (("--run", "done", "--test-datasets", "clueweb09/catb/trec-web-2009"), "has a query this run was trained"),
])
def test_testing_bad_input(world, args, match):
    message = expect_error(world, "testing_finetuned_model.py", *args, match=match)
    if "cut" in args:
        assert "python training.py --resume" in message


def test_no_finished_run_at_all(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "irds").mkdir()
    expect_error(tmp_path, "testing_finetuned_model.py", match="no finished training run")


def test_adapter_on_a_different_base_model(world, tmp_path):
    other = tiny_mistral_folder(tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 32, 64
    (other / "config.json").write_text(json.dumps(config))
    expect_error(world, "testing_finetuned_model.py", "--run", "done", "--model", other,
                 match="is a different model (hidden_size 64 vs 32)")


def test_out_of_memory_becomes_a_hint(capsys):
    def runs_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as stop:
        run_cli(runs_out, "Lower --batch-size.")
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # the paragraph is wrapped
    assert "ran out of memory" in err and "Lower --batch-size." in err and "Traceback" not in err
