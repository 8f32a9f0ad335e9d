"""End-to-end: both scripts run as subprocesses on a tiny Mistral model, offline, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qexpand import rundir
from qexpand.accel import batches
from qexpand.accel.batches import balanced_batches
from qexpand.accel.operation_tally import operations_counted_once
from qexpand.collation import data_collator
from tests.conftest import REPO, run_script
from tests.fixtures import write_topic_files

SPLIT = ("--split", "30", "5", "5")


def train(tiny_model, home, out, *extra):
    return run_script("training.py", "--model", tiny_model, *SPLIT, "--epochs", "2", "--batch-size", "8",
                      "--output-dir", out, *extra, home=home, cwd=out.parent)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_topic_files(root / "irds")
    (root / "runs").mkdir()
    return root


@pytest.fixture(scope="module")
def trained_run(workspace, tiny_model):
    result = train(tiny_model, workspace / "irds", workspace / "runs", "--run-name", "tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    (workspace / "training-tiny.stderr").write_text(result.stderr)
    return workspace / "runs" / "tiny"


@pytest.mark.parametrize("script", ["training.py", "testing_finetuned_model.py"])
def test_help(script, tmp_path):
    result = run_script(script, "--help", home=tmp_path, cwd=tmp_path)
    assert result.returncode == 0
    assert "--model" in result.stdout and "usage:" in result.stdout


def test_unknown_flag_is_rejected(tmp_path):
    result = run_script("training.py", "--epoch", "3", home=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --epoch" in result.stderr


def settled_on_the_cpu(*flags):
    """training.py's settled config for these flags (no model is loaded; a later --model replaces the stand-in)."""
    import training
    from qexpand.recipes import settle_training

    return settle_training(training.parse_config(["--model", "some/model", "--device", "cpu", *flags]))


def test_neftune_noise_reaches_the_trainer_on_in_the_default_recipe_only(tmp_path):
    import training

    def noise(*flags):
        return training.training_arguments(settled_on_the_cpu(*flags), tmp_path, 10).neftune_noise_alpha

    assert noise() == 5.0 and noise("--neftune-alpha", "0") is None
    assert noise("--recipe", "original", "--optimizer", "adamw") is None


def test_the_trainer_counts_parameters_once_and_logs_the_loss_as_it_is(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    import training

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    counted, count = [], model.num_parameters
    model.num_parameters = lambda **kwargs: counted.append(kwargs) or count(**kwargs)
    arguments = training.training_arguments(settled_on_the_cpu(), tmp_path, 10)
    assert arguments.logging_nan_inf_filter is False  # no read-back of every step's loss to hide a NaN
    eval_set = [{"input_ids": [1, 2]}]  # the run's arguments evaluate once an epoch
    ours, theirs = (Trainer(model=model, args=arguments, eval_dataset=eval_set) for _ in range(2))
    with operations_counted_once(ours):
        for rows, tokens in ((4, 16), (2, 40), (32, 56)):
            batch = {"input_ids": torch.ones(rows, tokens, dtype=torch.long)}
            assert ours.floating_point_ops(batch) == theirs.floating_point_ops(batch) == 6 * rows * tokens * count(
                exclude_embeddings=True)
        assert len(counted) == 1 + 3  # ours once, the Trainer's own at every batch
        assert ours.floating_point_ops({"labels": torch.ones(2, 3)}) == 0  # no input ids: the Trainer's answer
    assert "floating_point_ops" not in vars(ours)  # the Trainer's own again


def test_data_parallel_processes_sum_gradients_in_one_bucket_they_live_in_and_send_no_buffers(
        tmp_path, tiny_model, monkeypatch):
    """Settings for several processes (the model is wrapped in DistributedDataParallel only then)."""
    from transformers import Trainer, TrainingArguments

    import training

    settled = settled_on_the_cpu("--model", str(tiny_model))
    model, _ = training.load_model(settled, "cpu", None)
    # Nothing to send at each forward pass: the only buffers are the rotary frequencies, fixed at load.
    assert {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} == {"inv_freq", "original_inv_freq"}
    arguments = training.training_arguments(settled, tmp_path, 10)
    # Batches of unequal size in one step: each process's loss is divided by the step's token count.
    assert arguments.average_tokens_across_devices is True
    trainer = Trainer(model=model, args=arguments, eval_dataset=[{"input_ids": [1]}])
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    # One bucket of gradients, summed once after the backward pass.
    gradient_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    assert training.ONE_GRADIENT_BUCKET_MB > 100 * max(gradient_mb, 84)  # the default Mistral adapter's: 84 MB
    with balanced_batches(trainer, None):
        assert trainer.accelerator.ddp_handler.to_kwargs() == {
            "broadcast_buffers": False, "gradient_as_bucket_view": True,
            "bucket_cap_mb": training.ONE_GRADIENT_BUCKET_MB}
    assert "gradient_as_bucket_view" not in trainer.accelerator.ddp_handler.to_kwargs()  # as it was


def test_with_several_processes_the_trainer_s_loader_yields_this_process_s_share_of_each_balanced_step(
        tmp_path, tiny_model, monkeypatch):
    import random

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerState, TrainingArguments

    import training
    from qexpand import modeling
    from qexpand.accel.batches import epoch_for_balanced_batches
    from qexpand.collation import data_collator

    settled = settled_on_the_cpu("--batch-size", "4", "--model", str(tiny_model))
    arguments = training.training_arguments(settled, tmp_path, 10)
    rng = random.Random(2)
    # Each example's tokens are its number + 1: the batches show which examples they hold.
    train_set = Dataset.from_list([{"input_ids": [i + 1] * n, "labels": [i + 1] * n}
                                   for i, n in enumerate(rng.randint(5, 60) for _ in range(40))])
    tokenizer = modeling.load_tokenizer(str(tiny_model))
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def loader_batches(rank):
        # Process `rank` of two, as the Trainer sees it under `accelerate launch`.
        monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: rank))
        trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=train_set[:1],
                          data_collator=data_collator(settled.pad_to, tokenizer))
        with balanced_batches(trainer, settled.pad_to):
            loader = trainer.get_train_dataloader()
            return [batch["input_ids"].tolist() for batch in loader], trainer._get_train_sampler(), loader

    first, sampler, loader = loader_batches(0)
    second, _, _ = loader_batches(1)
    assert len(first) == len(second) == len(sampler) == 5  # 40 examples, 2 processes x 4 a step
    assert any(len(rows) != 4 for rows in first)  # the cut is not always 4 and 4
    for step, window in enumerate(sampler.windows()):
        lengths = sorted([len(train_set[int(i)]["input_ids"]) for i in window], reverse=True)
        shares = [first[step], second[step]]
        assert sum(len(rows) for rows in shares) == 8 and sorted(len(rows) for rows in shares) != [0, 8]
        # Padded as the collator pads; the larger of the two no larger than the best cut's.
        sizes = batches.group_sizes(lengths, 2)
        best = max(batches.padded_cost(size, lengths[sum(sizes[:i])]) for i, size in enumerate(sizes))
        assert max(len(rows) * len(rows[0]) for rows in shares) == best <= batches.padded_cost(4, lengths[0])
    # With every example padded to one length (--pad-to, the original recipe), equal halves.
    monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: 0))
    fixed = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=train_set[:1])
    with balanced_batches(fixed, pad_to=64):
        assert {len(batch) for batch in fixed._get_train_sampler()} == {4}
    # Resumed two steps into the second epoch: the Trainer skips the first two batches through accelerate;
    # the callback tells the batches the epoch.
    from accelerate import skip_first_batches

    epoch_for_balanced_batches().on_epoch_begin(arguments, TrainerState(epoch=1.4), None,
                                                         train_dataloader=loader)
    second_epoch = [batch["input_ids"].tolist() for batch in loader]
    assert second_epoch != first
    resumed = skip_first_batches(loader, 2)
    assert [batch["input_ids"].tolist() for batch in resumed] == second_epoch[2:]


def test_training_batches_leave_out_the_padding_mask_and_the_loss_and_gradients_stay(tiny_model):
    """Pads sit after every real token of their row and the model attends causally: no real token sees one."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    import training
    from qexpand import modeling
    from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

    tokenizer = modeling.load_tokenizer(str(tiny_model))
    tokenizer.padding_side = "right"
    pairs = [("internet privacy", "What are effective methods for ensuring online privacy?"),
             ("hubble", "Find the Hubble telescope's discoveries about distant galaxies and dark energy."),
             ("jaguar", "The animal, not the car.")]
    features = [tokenize_example(tokenizer, PROMPT_TEMPLATE, q, d, 256) for q, d in pairs]
    batch = data_collator(settled_on_the_cpu().pad_to, tokenizer)(features)
    masked = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8)(features)
    assert "attention_mask" not in batch and (masked["attention_mask"] == 0).sum(dim=1).max() >= 8  # real padding
    assert torch.equal(batch["input_ids"], masked["input_ids"]) and torch.equal(batch["labels"], masked["labels"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def loss_and_grads(inputs):
        loss = model(**inputs).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        return loss.item(), grads

    loss, grads = loss_and_grads(batch)
    masked_loss, masked_grads = loss_and_grads(masked)
    assert loss == pytest.approx(masked_loss, rel=1e-5)
    for grad, masked_grad in zip(grads, masked_grads):
        assert torch.allclose(grad, masked_grad, atol=1e-6, rtol=1e-4)
    tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="on the right"):
        data_collator(settled_on_the_cpu().pad_to, tokenizer)


def test_cpu_micro_batches_step_with_the_loss_and_gradient_of_one_batch(workspace, tiny_model):
    """On the CPU the recipe's effective batch of 16 is 4 micro-batches of 4 (a third of the peak memory):
    its first step must log the loss and gradient norm of one batch of all 16 examples. Noise and dropout
    are off, so the two differ only by the grouping; a gradient divided per micro-batch instead of by the
    step's token count would be 4 times too small."""
    first = {}
    for name, flags in (("micro", []), ("whole", ["--batch-size", "16", "--grad-accum", "1"])):
        result = run_script("training.py", "--model", tiny_model, "--split", "16", "5", "5", "--max-steps", "1",
                            "--neftune-alpha", "0", "--lora-dropout", "0", "--output-dir", workspace / "runs",
                            "--run-name", f"batching-{name}", *flags, home=workspace / "irds", cwd=workspace)
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = workspace / "runs" / f"batching-{name}"
        config = json.loads((run_dir / "run_config.json").read_text())["config"]
        step = next(e for e in json.loads((run_dir / "loss_log.json").read_text()) if "grad_norm" in e)
        first[name] = (config["batch_size"], config["grad_accum"], step["loss"], step["grad_norm"])
    assert first["micro"][:2] == (4, 4) and first["whole"][:2] == (16, 1)
    assert first["micro"][2] == pytest.approx(first["whole"][2], rel=1e-5)
    assert first["micro"][3] == pytest.approx(first["whole"][3], rel=1e-4)


def test_the_default_recipe_fuses_lora_layers_on_a_four_bit_base_only():
    assert settled_on_the_cpu().lora_kernels == "peft"  # the CPU default base is not quantized
    assert settled_on_the_cpu("--quantization", "nf4").lora_kernels == "fused"
    assert settled_on_the_cpu("--quantization", "nf4", "--lora-kernels", "peft").lora_kernels == "peft"
    # The original recipe keeps peft's layers, as the original code trained.
    original = ("--recipe", "original", "--optimizer", "adamw", "--quantization", "nf4")
    assert settled_on_the_cpu(*original).lora_kernels == "peft"


def test_recomputation_is_re_entrant_unless_the_blocks_are_compiled(tmp_path):
    import dataclasses

    import training

    def reentrant(*flags):
        config = settled_on_the_cpu("--gradient-checkpointing", "on", *flags)
        config = dataclasses.replace(config, compile=config.compile if config.compile != "auto" else "off")
        return training.training_arguments(config, tmp_path, 10).gradient_checkpointing_kwargs["use_reentrant"]

    assert reentrant() is True and reentrant("--compile", "on") is False
    assert training.training_arguments(settled_on_the_cpu(), tmp_path, 10).gradient_checkpointing_kwargs is None


def test_compile_auto_turns_on_only_for_long_cuda_runs():
    import dataclasses

    from qexpand.recipes import COMPILE_PAYS_FROM_EXAMPLES, settle_compile

    def decided(topics, processes=1, device="cuda", *flags):
        return settle_compile(dataclasses.replace(settled_on_the_cpu(*flags), device=device), topics, processes)

    enough = -(-COMPILE_PAYS_FROM_EXAMPLES // 3)  # topics that make enough examples in the default 3 epochs
    assert decided(280) == "off"  # the README's default run: compiling would cost more than it saves
    assert decided(enough) == "on" and decided(enough, device="cpu") == "off"
    assert decided(enough, 2) == "off"  # two processes share the examples: each sees half
    assert decided(enough, 1, "cuda", "--max-steps", "10") == "off"
    assert decided(280, 1, "cuda", "--compile", "on") == "on" and decided(enough, 1, "cuda", "--compile", "off") == "off"
    assert decided(enough, 1, "cuda", "--quantization", "nf4") == "off"  # the fused layers are not compiled


def test_compiled_blocks_get_peft_s_layers_and_refuse_the_fused_ones():
    from qexpand.errors import UserError

    assert settled_on_the_cpu("--quantization", "nf4", "--compile", "on").lora_kernels == "peft"
    with pytest.raises(UserError, match="--compile on cannot go with --lora-kernels fused"):
        settled_on_the_cpu("--quantization", "nf4", "--compile", "on", "--lora-kernels", "fused")


def test_compiled_blocks_train_on_the_cpu(workspace, tiny_model):
    out = workspace / "runs-compiled"
    result = train(tiny_model, workspace / "irds", out, "--run-name", "compiled", "--compile", "on", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled blocks on" in result.stdout
    assert json.loads((out / "compiled" / "run_config.json").read_text())["config"]["compile"] == "on"
    finished = json.loads((out / "compiled" / "finished.json").read_text())
    assert finished["global_steps"] == 4 and finished["best_eval_loss"] > 0


def test_run_directory_holds_everything_the_test_script_needs(trained_run, tiny_model):
    names = {p.name for p in trained_run.iterdir()}
    for needed in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "split.json",
                   "run_config.json", "loss_log.json", "loss_curve.png", "finished.json"):
        assert needed in names, needed
    assert rundir.TRAINER_DIR not in names  # resumable checkpoints are cleaned up once finished
    config = json.loads((trained_run / "run_config.json").read_text())["config"]
    assert config["model"] == str(tiny_model) and config["recipe"] == "default"
    assert "{query}" in config["prompt_template"]
    assert config["lora_r"] == 8 and config["lora_alpha"] == 16
    # Every device-dependent choice is recorded as decided, none as "auto".
    assert (config["device"], config["quantization"], config["precision"]) == ("cpu", "none", "fp32")
    assert (config["batch_size"], config["gradient_checkpointing"]) == (8, "off")
    split = json.loads((trained_run / "split.json").read_text())
    assert split["counts"] == {"train": 30, "eval": 5, "test": 5}
    assert config["compile"] == "off"  # auto: compiling pays only for long runs on CUDA
    log = json.loads((trained_run / "loss_log.json").read_text())
    assert sum("eval_loss" in entry for entry in log) == 2  # once per epoch
    # Each entry carries the seconds since training began, so step times can be read off the log.
    clock = [entry["elapsed_s"] for entry in log]
    assert clock == sorted(clock) and clock[0] > 0


def test_training_console_has_one_progress_bar(trained_run, workspace):
    console = (workspace / "training-tiny.stderr").read_text()
    # 30 examples in batches of 8 for 2 epochs: the training bar counts to 8 steps. The eval pass
    # (5 examples, one batch) would draw a bar of its own counting to 1/1 at every epoch.
    assert "| 8/8 [" in console
    assert "| 1/1 [" not in console


def test_stock_peft_loads_the_adapter(trained_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    ids = torch.tensor([[1, 7865, 12917]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(trained_run))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    assert not torch.allclose(model(ids).logits, before)


def test_testing_script_reports_the_test_split(trained_run, workspace):
    result = run_script("testing_finetuned_model.py", "--output-dir", workspace / "runs", "--max-new-tokens", "8",
                        "--baseline", home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("QUERY:") == 5 and out.count("GENERATED:") == 5 and out.count("FROM DATASET:") == 5
    split = json.loads((trained_run / "split.json").read_text())
    predictions = [json.loads(line) for line in (trained_run / "predictions.jsonl").read_text().splitlines()]
    assert [p["query"] for p in predictions] == [t["query"] for t in split["test"]]
    assert all(p["description"] and "zero_shot" in p for p in predictions)
    scores = json.loads((trained_run / "scores.json").read_text())
    assert list(scores["rows"]) == ["finetuned", "zero_shot", "nearest_neighbour", "title", "template"]
    for row in scores["rows"].values():
        for metric in ("sbert", "rougeL", "bleu", "content_f1"):
            low, high = row[metric]["ci"]
            assert low <= row[metric]["mean"] <= high
    assert {"finetuned_minus_template", "finetuned_minus_nearest_neighbour"} <= set(scores["paired"])
    assert "| template |" in (trained_run / "scores.md").read_text()


def test_adhoc_queries_with_candidates(trained_run, workspace):
    result = run_script("testing_finetuned_model.py", "--run", trained_run, "--query", "café prices in Zürich",
                        "--query", "hubble telescope", "--num-candidates", "3", "--max-new-tokens", "6",
                        home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QUERY:        café prices in Zürich" in result.stdout
    lines = (trained_run / "predictions-adhoc.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["query"] for r in records] == ["café prices in Zürich", "hubble telescope"]
    assert all(len(r["candidates"]) == 3 and r["generated"] in [c["text"] for c in r["candidates"]] for r in records)


def test_other_topic_sets_are_scored_without_the_seen_queries(trained_run, workspace):
    result = run_script("testing_finetuned_model.py", "--run", trained_run, "--test-datasets", "gov/trec-web-2002",
                        "--max-new-tokens", "4", home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((trained_run / "split.json").read_text())
    seen = {t["query"] for t in split["train"] + split["eval"]}
    gov_seen = sum(t["dataset"] == "gov/trec-web-2002" for t in split["train"] + split["eval"])
    assert gov_seen > 0 and f"left out {gov_seen} of 10 topics" in result.stdout
    lines = (trained_run / "predictions-testsets-gov_trec-web-2002.jsonl").read_text().splitlines()
    queries = [json.loads(line)["query"] for line in lines]
    assert len(queries) == 10 - gov_seen and not seen & set(queries)
    assert (trained_run / "scores-testsets-gov_trec-web-2002.json").is_file()


def test_four_bit_path_trains_and_tests(workspace, tiny_model):
    out = workspace / "runs-nf4"
    out.mkdir()
    result = train(tiny_model, workspace / "irds", out, "--run-name", "nf4", "--quantization", "nf4",
                   "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(nf4, cpu)" in result.stdout
    config = json.loads((out / "nf4" / "run_config.json").read_text())["config"]
    assert config["quantization"] == "nf4"
    assert json.loads((out / "nf4" / "finished.json").read_text())["loaded"]["quantization"] == "nf4"
    # The test script loads the base as the run was trained (4-bit), without being told.
    result = run_script("testing_finetuned_model.py", "--output-dir", out, "--max-new-tokens", "4",
                        home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "nf4" / "scores.json").read_text())["loaded"]["quantization"] == "nf4"


def test_fused_lora_layers_train_like_peft_s_on_the_four_bit_path(workspace, tiny_model):
    """Six optimizer steps of training.py on the 4-bit base with each kind of LoRA layer follow the same
    trajectory: the same loss and gradient norm at every step, and the same trained B matrices.

    Dropout is off. With dropout the two paths could not be compared step for step: the fused layers
    draw one dropout mask for the sibling layers that read the same input (q/k/v and gate/up share a
    mask, lora_kernels.LoraOnNF4), where peft draws one mask per layer, so the two runs draw different
    masks and consume the random stream differently from the first block on. Without dropout both
    compute the same float32 arithmetic (the base computes in fp32 on the CPU), in another order
    (stacked A products, fused additions): they differ by rounding, which Adam's normalised steps
    amplify a little. Measured: losses within 5e-5, gradient norms within 4e-4 relative, B within
    3e-3 relative. The learning rate is ten times the default so that the adapters move enough in six
    steps for a wrong gradient of A (which B, zero at the start, keeps small) to show in the gradient
    norm. A backward pass of the fused layers with its LoRA gradients zeroed or halved, those of A or
    of B alone, or the input gradient halved or zeroed, fails the gradient-norm check by 10x its
    tolerance or more (halving A's: 2.3e-2 relative; zeroing the LoRA gradients also moves the losses
    by 1e-2)."""
    from safetensors.torch import load_file

    out = workspace / "runs-nf4-kernels"
    out.mkdir()
    logged, adapters = {}, {}
    for kernels in ("peft", "fused"):
        result = train(tiny_model, workspace / "irds", out, "--run-name", kernels, "--quantization", "nf4",
                       "--lora-kernels", kernels, "--max-steps", "6", "--lora-dropout", "0",
                       "--learning-rate", "2e-3")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"LoRA layers {kernels}" in result.stdout
        config = json.loads((out / kernels / "run_config.json").read_text())["config"]
        assert (config["lora_kernels"], config["lora_dropout"], config["precision"]) == (kernels, 0.0, "fp32")
        logged[kernels] = [e for e in json.loads((out / kernels / "loss_log.json").read_text()) if "loss" in e]
        adapters[kernels] = load_file(out / kernels / "adapter_model.safetensors")
    fused, peft = logged["fused"], logged["peft"]
    assert [e["step"] for e in fused] == [e["step"] for e in peft] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in fused] == pytest.approx([e["loss"] for e in peft], abs=3e-4)
    assert all(e["grad_norm"] > 0 for e in peft)
    assert [e["grad_norm"] for e in fused] == pytest.approx([e["grad_norm"] for e in peft], rel=2e-3)
    # The B matrices start at zero: what they hold now is all that training moved them by.
    assert adapters["fused"].keys() == adapters["peft"].keys()
    names = sorted(n for n in adapters["peft"] if "lora_B" in n)
    assert len(names) == 14  # 7 projections in each of the 2 blocks
    trained_b = {k: torch.cat([adapters[k][n].flatten() for n in names]) for k in adapters}
    assert trained_b["peft"].norm() > 0
    assert (trained_b["fused"] - trained_b["peft"]).norm() <= 1e-2 * trained_b["peft"].norm()


def test_topic_file_is_expanded_for_retrieval_toolkits(trained_run, workspace):
    from qexpand.topicfiles import parse_tsv

    topics = workspace / "topics.tsv"
    topics.write_text("q1\tsolar panels\nq2\thubble telescope\n")
    out = workspace / "expanded.tsv"
    result = run_script("testing_finetuned_model.py", "--run", trained_run, "--topics", topics, "--out", out,
                        "--max-new-tokens", "4", home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    expanded = parse_tsv(out.read_text(), str(out))
    assert [t.query_id for t in expanded] == ["q1", "q2"]
    assert expanded[0].query.startswith("solar panels ")  # the query, then its expansion
    # Standard input to standard output, for pipelines: nothing but the TSV on stdout.
    piped = subprocess.run([sys.executable, str(REPO / "testing_finetuned_model.py"), "--run", str(trained_run),
                            "--topics", "-", "--out", "-", "--query-form", "expansion", "--max-new-tokens", "4"],
                           input="7\tcoral reefs\n", capture_output=True, text=True, cwd=workspace,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert piped.returncode == 0, piped.stderr[-3000:]
    lines = piped.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("7\t")


def test_original_recipe_preset(workspace, tiny_model):
    from safetensors import safe_open

    out = workspace / "runs-original"
    result = run_script("training.py", "--model", tiny_model, *SPLIT, "--output-dir", out, "--run-name", "orig",
                        "--recipe", "original", "--optimizer", "adamw", "--max-steps", "2",
                        home=workspace / "irds", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "orig" / "run_config.json").read_text())["config"]
    assert (config["recipe"], config["learning_rate"], config["pad_to"], config["grad_accum"]) == ("original", 2.5e-5, 512, 4)
    assert config["lora_targets"] == "all-linear+lm_head" and config["batch_size"] == 2
    assert config["optimizer"] == "adamw"  # given on the command line, over the recipe's
    assert json.loads((out / "orig" / "finished.json").read_text())["global_steps"] == 2
    with safe_open(str(out / "orig" / "adapter_model.safetensors"), framework="pt") as weights:
        assert any("lm_head.lora_A" in name for name in weights.keys())
