"""Every bad input gets one clear paragraph, exit code 2, no traceback, and nothing on disk changes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qexpand import data
from qexpand.errors import run_cli
from tests.conftest import run_script, snapshot
from tests.fixtures import SUBJECTS, finished_run, tiny_mistral_folder, write_topic_files

SPLIT = ("--split", "30", "5", "5")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Topic files, plus an output folder holding one finished run and one interrupted run."""
    root = tmp_path_factory.mktemp("errors")
    write_topic_files(root / "irds")
    runs = root / "runs"
    # The finished run was trained on every query of the Web 2009 stand-in.
    web = [data.Topic("clueweb09/catb/trec-web-2009", str(i), s, "d") for i, s in enumerate(SUBJECTS[:12], 1)]
    split = data.split_to_json({"train": web, "eval": web[:1], "test": web[:2]}, 42, ["clueweb09/catb/trec-web-2009"])
    finished_run(runs / "done", tiny_model, split)
    shutil.copytree(runs / "done", runs / "cut")
    (runs / "cut" / "finished.json").unlink()
    (runs / "not-a-run").mkdir()
    return root


def damaged_copy(world, name: str, damage) -> str:
    """A copy of the finished run with one file damaged by `damage(run_dir)`; its name."""
    target = world / "runs" / name
    if not target.exists():
        shutil.copytree(world / "runs" / "done", target)
        damage(target)
    return name


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
    (("--neftune-alpha", "-1"), "--neftune-alpha must be >= 0"),
    (("--compile", "yes"), "invalid choice: 'yes'"),
    (("--gguf-file", "missing.gguf"), "--gguf-file missing.gguf: no such file"),
    (("--resume", "not-a-run"), "is not a run directory"),
    (("--resume", "done"), "has already finished"),
    (("--resume", "cut", "--run-name", "x"), "cannot go with --run-name"),
    (("--split-file", "s.json", "--datasets", "a/b"), "cannot go with --datasets or --split"),
    (("--optimizer", "paged_adamw_8bit"), "needs CUDA"),
    (("--lora-kernels", "fused"), "computes LoRA layers on a 4-bit base"),
    (("--recipe", "original", "--optimizer", "adamw", "--epochs", "2"), "cut short by the original recipe's cap of 100"),
])
def test_training_bad_input(world, tiny_model, args, match):
    model = ("--model", tiny_model) if "--model" not in args else ()
    expect_error(world, "training.py", *model, *SPLIT, *args, match=match)


def test_training_reports_all_option_problems_at_once(world, tiny_model):
    message = expect_error(world, "training.py", "--model", tiny_model, "--epochs", "0", "--lora-dropout", "1.5",
                           "--batch-size", "-2", match="--epochs must be positive")
    assert "--lora-dropout must be in [0, 1)" in message and "--batch-size must be positive" in message


def test_settling_reports_every_problem_at_once(world, tiny_model):
    message = expect_error(world, "training.py", "--model", tiny_model, *SPLIT, "--recipe", "original", "--epochs", "2",
                           "--lora-kernels", "fused", match="computes LoRA layers on a 4-bit base")
    assert "needs CUDA" in message and "cut short by the original recipe's cap" in message


def test_the_7b_default_on_a_cpu_is_refused_before_any_download(world):
    message = expect_error(world, "training.py", *SPLIT, match="the default base mistralai/Mistral-7B-v0.1 would be")
    assert "--model smollm2-135m" in message and "add --device cpu" in message


def test_gguf_file_needs_a_model_folder(world):
    message = expect_error(world, "training.py", *SPLIT, "--gguf-file", "x.gguf", match="needs --model")
    # Refused while the options are checked, before the base model is even considered.
    assert "--gguf-file names a file inside --model" in message and "python training.py --help" in message
    assert "Mistral-7B" not in message


def test_unknown_model_offline(world):
    message = expect_error(world, "training.py", "--model", "nobody-here/no-such-model", *SPLIT,
                           "--run-name", "x", match="could not load 'nobody-here/no-such-model'")
    assert "HF_HUB_OFFLINE" in message


def test_missing_local_model_folder(world):
    message = expect_error(world, "training.py", "--model", "./no/such/folder", *SPLIT, match="is not a folder")
    # The path as given, taken for a local folder rather than looked up on the Hub.
    assert "--model ./no/such/folder looks like a local path" in message and "HF_HUB_OFFLINE" not in message


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
    (("--run", "done", "--queries-per-batch", "0"), "--queries-per-batch must be positive"),
    (("--run", "done", "--test-datasets", "clueweb09/catb/trec-web-2009"), "has a query this run was trained"),
    (("--run", "done", "--gguf-file", "x.gguf"), "needs --model"),
    (("--run", "done", "--query", "jazz", "--split-part", "eval"), "cannot go with --query or --test-datasets"),
    (("--run", "done", "--temperature", "0.5"), "only apply when sampling"),
    (("--run", "done", "--sampling-seed", "7"), "--sampling-seed only apply when sampling"),
    (("--run", "done", "--generation-form", "nf4", "--precision", "fp32"), "always computes in bf16"),
    # Old names that training.py uses with another meaning: refused, naming the new one.
    (("--run", "done", "--seed", "7"), "--seed is now --sampling-seed in this script"),
    (("--run", "done", "--batch-size=8"), "--batch-size is now --queries-per-batch"),
    (("--run", "done", "--quantization", "none"), "--quantization is now --generation-form"),
    (("--run", "done", "--merge"), "--merge is now --generation-form merged"),
    (("--run", "done", "--query", "jazz", "--sbert-model", "all-MiniLM-L6-v2"), "--sbert-model is unused with --query"),
    (("--run", "done", "--topics", "topics.tsv", "--out", "expanded.tsv", "--sbert-model", "all-MiniLM-L6-v2"),
     "--sbert-model is unused with --topics"),
    (("--run", "done", "--topics", "topics.tsv", "--out", "expanded.tsv", "--feedback-terms", "5"),
     "--feedback-terms only applies with --query-form feedback"),
    (("--run", "done", "--topics", "topics.tsv", "--out", "expanded.tsv", "--query-form", "feedback",
      "--repeat-query", "3"), "--repeat-query repeats the query before a pasted expansion"),
    (("--run", "done", "--topics", "topics.tsv", "--out", "x.tsv", "--feedback-terms", "0"),
     "--feedback-terms must be positive"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--query-weight", "1.5"),
     "--query-weight must be in [0, 1)"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--query-weight", "0.5", "--repeat-query", "2"),
     "--query-weight and --repeat-query both say how often the query is repeated"),
    (("--run", "done", "--feedback-terms", "5"), "describe the output of --topics"),
    (("--run", "done", "--term-relatedness", "none"), "describe the output of --topics"),
    (("--run", "done", "--rm3-split", "4"), "describe the output of --topics"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--rm3-split", "0"), "--rm3-split must be positive"),
    (("--run", "done", "--topics", "t.tsv", "--out", "-", "--rm3-split", "4"), "--out cannot be - (standard output)"),
    (("--run", "done", "--passages", "2"), "--passages adds passages to the expansions of --topics"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--passages", "-1"), "--passages must be >= 0"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--passages", "2"),
     "--passages are feedback documents, weighed with the candidates by --query-form feedback"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--term-relatedness", "sbert"),
     "--term-relatedness only applies with --query-form feedback"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--term-relatedness", "cosine"),
     "invalid choice: 'cosine'"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.tsv", "--query-form", "expansion", "--query-weight", "0.5"),
     "there is no query to weigh or repeat"),
    (("--run", "done", "--topics", "t.tsv", "--out", "x.trec", "--format", "trec", "--query-weight", "0.5"),
     "--query-weight would change nothing"),
])
def test_testing_bad_input(world, args, match):
    message = expect_error(world, "testing_finetuned_model.py", *args, match=match)
    if "cut" in args:
        assert "python training.py --resume" in message


@pytest.mark.parametrize("flags, unused_with", [
    # each accepted set of flags, and the same request where the model would neither score nor pick
    ({"query": ["jazz"], "num_candidates": 2}, {"query": ["jazz"]}),  # it picks one of the sampled candidates
    ({}, {"query": ["jazz"]}),  # the run's test split: it scores the expansions
    ({"test_datasets": ["clueweb09/catb/trec-web-2010"]}, {"query": ["jazz"]}),
])
def test_sbert_model_is_accepted_where_it_scores_or_picks(flags, unused_with):
    """Here before the run is read; with --topics, once its recipe has said how the topics are expanded
    (tests/test_expander.py, and the command-line case above)."""
    from qexpand.config import TestConfig, validate_testing
    from qexpand.errors import UserError

    assert validate_testing(TestConfig(sbert_model="all-MiniLM-L6-v2", **flags)) is None
    validate_testing(TestConfig(**unused_with))  # fine without the model
    # Accepted because it scores or picks there: the same request with nothing to score or pick is refused.
    with pytest.raises(UserError, match="--sbert-model is unused with --query"):
        validate_testing(TestConfig(sbert_model="all-MiniLM-L6-v2", **unused_with))


def test_sbert_model_is_refused_where_the_candidates_are_joined():
    from qexpand.config import TestConfig, validate_testing
    from qexpand.errors import UserError

    with pytest.raises(UserError, match="--sbert-model is unused with --query"):
        validate_testing(TestConfig(query=["jazz"], num_candidates=4, select="join", sbert_model="all-MiniLM-L6-v2"))


@pytest.mark.parametrize("part, args", [("test", ()), ("eval", ("--split-part", "eval"))])
def test_a_split_without_the_part_to_expand_says_what_to_do(world, part, args):
    run = damaged_copy(world, f"no-{part}", set_key("split.json", part, []))
    message = expect_error(world, "testing_finetuned_model.py", "--run", run, *args,
                           match=f"has no {part} topics (split.json lists none)")
    assert str(world / "runs" / run) in message
    assert all(flag in message for flag in ("--query", "--topics", "--test-datasets", "--split"))


def test_no_finished_run_at_all(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "irds").mkdir()
    message = expect_error(tmp_path, "testing_finetuned_model.py", match="no finished training run")
    # Names the folder it looked in, and the two ways on.
    assert f"no finished training run in {tmp_path / 'runs'}." in message
    assert "python training.py" in message and "--run" in message


def test_adapter_on_a_different_base_model(world, tiny_model, tmp_path):
    other = tiny_mistral_folder(tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 32, 64
    (other / "config.json").write_text(json.dumps(config))
    message = expect_error(world, "testing_finetuned_model.py", "--run", "done", "--model", other,
                           match="is a different model (hidden_size 64 vs 32)")
    # Both models named, and the way on.
    assert f"trained on '{tiny_model}'" in message and f"--model '{other}'" in message
    assert "Leave --model out" in message


def test_out_of_memory_becomes_a_hint(capsys):
    def runs_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as stop:
        run_cli(runs_out, "Lower --batch-size.")
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # the paragraph is wrapped
    assert "ran out of memory" in err and "Lower --batch-size." in err and "Traceback" not in err


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def drop_key(name, *keys):
    def damage(run_dir):
        content = json.loads((run_dir / name).read_text())
        inner = content
        for key in keys[:-1]:
            inner = inner[key]
        del inner[keys[-1]]
        (run_dir / name).write_text(json.dumps(content))
    return damage


def set_key(name, key, value):
    def damage(run_dir):
        content = json.loads((run_dir / name).read_text())
        content[key] = value
        (run_dir / name).write_text(json.dumps(content))
    return damage


def poison_adapter(run_dir):
    """One weight of the adapter set to NaN and another to infinity, as a diverged training leaves them."""
    from safetensors.torch import load_file, save_file

    path = run_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    names = sorted(tensors)
    tensors[names[0]][0, 0] = float("nan")
    tensors[names[-1]][-1, -1] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})


def drop_merges(run_dir):
    """A tokenizer that splits words into single characters, as a GGUF conversion once saved one."""
    content = json.loads((run_dir / "tokenizer.json").read_text())
    content["model"]["merges"] = []
    (run_dir / "tokenizer.json").write_text(json.dumps(content))


@pytest.mark.parametrize("name, damage, match", [
    ("truncated", lambda d: truncate(d / "adapter_model.safetensors"),
     "adapter_model.safetensors cannot be read"),
    ("no-seed", drop_key("run_config.json", "config", "seed"), "missing key 'seed'"),
    ("no-check", drop_key("run_config.json", "tokenizer_check"), "missing key 'tokenizer_check'"),
    ("bad-type", lambda d: set_key("run_config.json", "processes", "two")(d), "'processes' should be"),
    ("wrong-rank", set_key("adapter_config.json", "r", 4), "does not match adapter_config.json (rank 4)"),
    ("not-lora", drop_key("adapter_config.json", "r"), "is not a LoRA adapter config"),
    ("no-tokenizer", lambda d: (d / "tokenizer_config.json").unlink(), "the tokenizer is missing"),
    ("bad-split", set_key("split.json", "train", 5), "split.json is not a train/eval/test split"),
    ("bad-finished", drop_key("finished.json", "finished_at"), "finished.json has no 'finished_at'"),
    ("no-merges", drop_merges, "does not give the token ids that training used"),
    ("nan-adapter", poison_adapter, "adapter_model.safetensors holds NaN or infinite weights in 2 of"),
])
def test_damaged_run_directory_is_named_before_loading(world, name, damage, match):
    run = damaged_copy(world, name, damage)
    message = expect_error(world, "testing_finetuned_model.py", "--run", run, match=match)
    assert str(world / "runs" / run) in message


def test_a_pad_to_shorter_than_an_example_is_refused_before_training(world, tiny_model):
    message = expect_error(world, "training.py", "--model", tiny_model, *SPLIT, "--pad-to", "12", "--run-name",
                           "short-pad", match="--pad-to 12 is shorter than 30 of the 30 training examples")
    assert "5 of the 5 eval examples" in message and "--pad-to 0" in message
    assert not (world / "runs" / "short-pad").exists()


def test_second_training_process_on_the_same_run_name_refuses(world, tiny_model):
    from qexpand import rundir

    from qexpand.errors import UserError

    lock = rundir.RunLock(world / "runs" / "busy")  # as a first training process holds it
    try:
        message = expect_error(world, "training.py", "--model", tiny_model, *SPLIT, "--run-name", "busy",
                               match="another training process is already writing the run")
        assert str(world / "runs" / "busy") in message and "another --run-name" in message
        # The refused process left the first one's lock as it was: still held.
        with pytest.raises(UserError, match="already writing"):
            rundir.RunLock(world / "runs" / "busy")
        assert not (world / "runs" / "busy").exists()
    finally:
        lock.release()
    rundir.RunLock(world / "runs" / "busy").release()  # free once the first process lets go


def test_a_write_that_fails_part_way_keeps_the_earlier_file(tmp_path, monkeypatch):
    from qexpand import rundir
    from qexpand.errors import UserError

    target = tmp_path / "scores.json"
    target.write_text('{"old": true}')

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError) as error:
        rundir.atomic_write_json(target, {"new": True})
    assert "earlier version of that file is intact" in str(error.value) and "disk is full" in str(error.value)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temporary file left behind


def test_training_refuses_a_tokenizer_that_does_not_save_faithfully(world, tiny_model, topics_home, monkeypatch):
    import training
    from transformers import PreTrainedTokenizerBase

    from qexpand.errors import UserError

    faithful_save = PreTrainedTokenizerBase.save_pretrained

    def lossy_save(self, folder, *args, **kwargs):
        saved = faithful_save(self, folder, *args, **kwargs)
        drop_merges(Path(folder))
        return saved

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", lossy_save)
    before = snapshot(world / "runs")
    config = training.parse_config(["--model", str(tiny_model), *SPLIT, "--output-dir", str(world / "runs"),
                                    "--run-name", "lossy"])
    with pytest.raises(UserError, match="does not give the token ids that training used"):
        training.main(config)
    assert snapshot(world / "runs") == before  # refused before anything was trained or written


def test_adapter_with_non_finite_weights_is_refused_as_diverged(tmp_path):
    from safetensors.torch import save_file

    from qexpand.errors import UserError
    from qexpand.runcheck import non_finite_summary, refuse_diverged_adapter

    finite = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}
    save_file(finite, tmp_path / "finite.safetensors")
    # Trained normally: accepted, and so is a weight at float32's largest finite value (large is not diverged).
    assert non_finite_summary(tmp_path / "finite.safetensors") is None
    assert refuse_diverged_adapter(tmp_path / "finite.safetensors", tmp_path) is None
    largest = {name: tensor.clone() for name, tensor in finite.items()}
    largest["a.lora_B.weight"][0, 0] = torch.finfo(torch.float32).max
    save_file(largest, tmp_path / "largest.safetensors")
    assert refuse_diverged_adapter(tmp_path / "largest.safetensors", tmp_path) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        weights = {name: tensor.clone() for name, tensor in finite.items()}
        weights["a.lora_B.weight"][3, 1] = bad
        save_file(weights, tmp_path / "diverged.safetensors")
        with pytest.raises(UserError) as error:
            refuse_diverged_adapter(tmp_path / "diverged.safetensors", tmp_path / "run")
        message = str(error.value)
        assert message.startswith("training diverged") and "1 of 2 tensors (the first: a.lora_B.weight)" in message
        assert "--learning-rate" in message and f"{tmp_path / 'run'} is left unfinished" in message


def test_training_that_diverges_leaves_its_run_unfinished(world, tiny_model, tmp_path):
    # A learning rate of 1e30 sends the LoRA weights past float32's range within two steps.
    result = run_script("training.py", "--model", tiny_model, *SPLIT, "--epochs", "1", "--batch-size", "8",
                        "--learning-rate", "1e30", "--output-dir", tmp_path / "runs", "--run-name", "diverged",
                        home=world / "irds", cwd=tmp_path)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: training diverged" in message and "lower --learning-rate" in message
    run = tmp_path / "runs" / "diverged"
    assert (run / "run_config.json").is_file()
    assert not (run / "finished.json").exists() and not (run / "adapter_model.safetensors").exists()
