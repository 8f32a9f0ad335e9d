"""Fine-tune a causal LM with LoRA (4-bit QLoRA on CUDA) to expand a short query into its TREC description.

Run (GPU box with network; Mistral-7B-v0.1 in NF4, the three default TREC topic sets):

    python training.py

The run directory (checkpoints/<run-name>/) gets a standard PEFT adapter, the tokenizer, the split,
run_config.json (every setting, settled), the loss log and its plot. An interrupted run continues
with `python training.py --resume [RUN]`. From Python: `training.main(training.parse_config([...]))`
returns the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qexpand import accel, data, modeling, options, quiet, rundir, runcheck
from qexpand.collation import check_pad_to, data_collator
from qexpand.config import TrainConfig, validate_training
from qexpand.errors import run_cli
from qexpand.prompt import tokenize_example
from qexpand.recipes import epilog, settle_compile, settle_resumed, settle_training

DESCRIPTION = "Fine-tune LoRA adapters that expand short search queries into TREC descriptions."
OOM_HINT = (
    "Lower --batch-size (raising --grad-accum keeps the effective batch), or pass "
    "--gradient-checkpointing on, which trades speed for much less memory."
)
ONE_GRADIENT_BUCKET_MB = 1 << 16  # more than any LoRA adapter's gradients: all go in one bucket


@dataclass
class Plan:
    """What one invocation works on, settled before any model is loaded."""

    config: TrainConfig  # settled: nothing left on 'auto'
    run_dir: Path
    split: dict[str, list[data.Topic]]
    split_json: dict | None  # None when resuming: the run directory already holds it
    record: runcheck.RunRecord | None  # the recorded run, when resuming


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return options.parse_config(TrainConfig, argv, DESCRIPTION, epilog())


@quiet.libraries_silenced()
def main(config: TrainConfig) -> Path:
    """Train one run (or resume one) and return its run directory."""
    from accelerate import PartialState

    validate_training(config)
    record = None
    if config.resume is not None:
        run_dir = rundir.find_run_to_resume(Path(config.output_dir), config.resume)
        record = runcheck.read_record(run_dir)
        settled = settle_resumed(config, run_dir, record)
    else:
        settled = settle_training(config)
    if not settled.stock:
        accel.refuse_unchecked_versions(fused_layers=settled.lora_kernels == "fused")
    modeling.keep_freed_memory(settled.device)
    # One process, or one per GPU under `accelerate launch` / torchrun (data parallel): each rank
    # holds its own copy of the 4-bit base; only the main process writes files or prints.
    state = PartialState(cpu=settled.device == "cpu")  # on the CPU, processes talk through gloo
    if record is None:
        run_dir = Path(settled.output_dir) / shared_run_name(state, settled)
    lock = rundir.RunLock(run_dir) if state.is_main_process else None
    try:
        fit(make_plan(settled, run_dir, record, state.num_processes), state)
    finally:
        if lock:
            lock.release()
    return run_dir


def make_plan(settled: TrainConfig, run_dir: Path, record: runcheck.RunRecord | None, processes: int) -> Plan:
    """The run's settings, final from here on, and its split: read back when resuming; for a new run the
    split made or read (--split-file), and the run name and --compile settled. Nothing is written yet."""
    if record is not None:
        return Plan(settled, run_dir, runcheck.read_split(run_dir), None, record)
    rundir.prepare_new_run_dir(run_dir, settled.overwrite)
    from_file = {}
    if settled.split_file:
        split_json = data.read_split_file(settled.split_file)
        split = data.split_from_json(split_json)
        # The file brings its own topic sets and counts: recorded as the run's.
        from_file = {"datasets": split_json["datasets"],
                     "split": [split_json["counts"][name] for name in data.SPLIT_NAMES]}
    else:
        split = data.split_topics(data.load_all_topics(settled.datasets), tuple(settled.split), settled.seed)
        split_json = data.split_to_json(split, settled.seed, settled.datasets)
    final = dataclasses.replace(settled, run_name=run_dir.name, **from_file,
                                compile=settle_compile(settled, len(split["train"]), processes))
    return Plan(final, run_dir, split, split_json, None)


def shared_run_name(state, config: TrainConfig) -> str:
    """The run name: given, or made by the main process and sent to the others (clocks may differ)."""
    from accelerate.utils import broadcast_object_list

    if config.run_name:
        return config.run_name
    names = [rundir.default_run_name(config.model, config.gguf_file)]
    if state.num_processes > 1:
        broadcast_object_list(names, from_process=0)
    return names[0]


def fit(plan: Plan, state) -> None:
    """Load, train with the Trainer (resuming from the last complete checkpoint), finish the run."""
    from transformers import set_seed

    settled, run_dir = plan.config, plan.run_dir
    set_seed(settled.seed)
    started = time.perf_counter()
    rank_device = f"cuda:{state.local_process_index}" if settled.device == "cuda" else settled.device
    model, tokenizer = load_model(settled, rank_device, tokenizer_dir=run_dir if plan.record else None)
    load_seconds = time.perf_counter() - started
    # The speed-ups are in force from here until training ends, and gone when fit returns.
    with contextlib.ExitStack() as speedups:
        if settled.lora_kernels == "fused":
            speedups.enter_context(fused_layers(settled, model))
        train_set = tokenized_dataset(plan.split["train"], tokenizer, settled)
        eval_set = tokenized_dataset(plan.split["eval"], tokenizer, settled)
        check_pad_to(settled.pad_to, {"training": [len(ids) for ids in train_set["input_ids"]],
                                      "eval": [len(ids) for ids in eval_set["input_ids"]]})
        checkpoint = open_run_dir(plan, model, tokenizer, state)
        steps_per_epoch = math.ceil(len(train_set) / (settled.batch_size * settled.grad_accum * state.num_processes))
        trainer = make_trainer(settled, model, tokenizer, train_set, eval_set, training_arguments(
            settled, run_dir, steps_per_epoch))
        if not settled.stock:
            speedups.enter_context(accel.training_speedups(trainer, settled.pad_to))
        if state.is_main_process:
            print_plan(plan, model, len(train_set), len(eval_set), state.num_processes, steps_per_epoch, checkpoint)
        first_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
        train_started = time.perf_counter()
        with modeling.training_attention(settled.device, compiled=settled.compile == "on"):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - train_started
    if state.is_main_process:
        # Throughput of this invocation only: after a resume, the steps before the checkpoint
        # were run (and timed) by the earlier process.
        share = (trainer.state.global_step - first_step) / steps_per_epoch
        finish_run(run_dir, trainer, result, {
            "train_seconds": round(train_seconds, 2),
            "model_load_seconds": round(load_seconds, 2),
            "resumed_from_step": first_step,
            "train_samples_per_second": round(share * len(train_set) / train_seconds, 2),
            # Tokens of prompt + description + EOS, padding excluded (eval time included).
            "train_real_tokens_per_second": round(
                share * sum(len(ids) for ids in train_set["input_ids"]) / train_seconds, 1),
            "processes": state.num_processes,
            "loaded": modeling.describe_loaded(model),
        })
    state.wait_for_everyone()


def load_model(config: TrainConfig, rank_device: str, tokenizer_dir: Path | None):
    """The base model with fresh LoRA adapters, and the tokenizer (a resumed run's own, from its folder)."""
    from peft import get_peft_model

    if tokenizer_dir is None:
        tokenizer = modeling.load_tokenizer(config.model, config.gguf_file)
    else:
        tokenizer = modeling.load_tokenizer(str(tokenizer_dir))
    # Training batches pad on the right, so positions count from each example's first token;
    # generation pads on the left and says so itself.
    tokenizer.padding_side = "right"
    model = modeling.load_base_model(config.model, config.gguf_file, config.quantization, rank_device, config.precision)
    if config.quantization == "nf4":
        modeling.keep_four_bit_layout_for_training(model)  # gradients through every 4-bit layer, eval or not
    if config.gradient_checkpointing == "on":
        model.enable_input_require_grads()  # LoRA inputs need grads for recomputation
    lora = modeling.lora_config(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    model = get_peft_model(model, lora)
    if config.compile == "on":
        modeling.compile_decoder_layers(model)  # compiles lazily, during the first steps
    return model, tokenizer


def fused_layers(config: TrainConfig, model):
    """The fused LoRA layers, torch's RMSNorm and the one-function rotary embedding (qexpand.accel), as a
    context manager. Never together with compiled blocks: settling keeps them apart, and a run an earlier
    version recorded with both is refused at resume (settle_resumed)."""
    from qexpand.accel.lora_kernels import fused_training, weights_can_wait_for_backward

    keep = weights_can_wait_for_backward(config.gradient_checkpointing == "on", reentrant_recomputation(config))
    return fused_training(model, keep_weights_for_backward=keep)


def make_trainer(config: TrainConfig, model, tokenizer, train_set, eval_set, arguments):
    """The stock Trainer; with compiled blocks, one that evaluates them eagerly (qexpand.trainer)."""
    from transformers import Trainer

    from qexpand.trainer import EagerEvalTrainer

    trainer_type = EagerEvalTrainer if config.compile == "on" else Trainer
    trainer = trainer_type(model=model, args=arguments, train_dataset=train_set, eval_dataset=eval_set,
                           data_collator=data_collator(config.pad_to, tokenizer), callbacks=[step_clock()])
    quiet.hide_eval_progress_bar(trainer)
    return trainer


def training_arguments(config: TrainConfig, run_dir: Path, steps_per_epoch: int):
    from transformers import TrainingArguments

    cuda = config.device == "cuda"
    total_steps = config.max_steps or math.ceil(steps_per_epoch * config.epochs)
    checkpointing = config.gradient_checkpointing == "on"
    return TrainingArguments(
        output_dir=str(run_dir / rundir.TRAINER_DIR),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        # Capped so a run of very few steps still has steps at the full learning rate.
        warmup_steps=min(math.ceil(config.warmup_ratio * total_steps), max(total_steps - 1, 0)),
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        # Fused AdamW on CUDA: one kernel for all LoRA tensors, no paging needed for ~20M params.
        optim=config.optimizer if config.optimizer != "adamw" else ("adamw_torch_fused" if cuda else "adamw_torch"),
        bf16=config.precision == "bf16",  # autocast; on the CPU too
        use_cpu=not cuda,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant_recomputation(config)} if checkpointing else None,
        # Batches of similar length: dynamic padding then wastes little compute.
        train_sampling_strategy="group_by_length",
        # Eval loss once per epoch (or every --save-every steps); the best checkpoint is kept.
        eval_strategy="steps" if config.save_every else "epoch",
        save_strategy="steps" if config.save_every else "epoch",
        eval_steps=config.save_every or None,
        save_steps=config.save_every or None,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        # The loss is logged as it is, NaN included: the filter would read every step's loss back from
        # the GPU (a wait for the whole step) to hide a NaN in the log, not in training.
        logging_nan_inf_filter=False,
        neftune_noise_alpha=config.neftune_alpha or None,  # noise on the training inputs only, not in eval
        label_names=["labels"],
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        # The only buffers are the rotary frequencies, the same in every process from the start: sending
        # them at every forward pass would only make each process wait for the others once more a step.
        ddp_broadcast_buffers=False,
        # One bucket: the LoRA gradients (84 MB in float32 for the default adapter) are summed once, after
        # the backward pass (0.3 ms over NVLink, bench/RESULTS.md), instead of in five parts whose
        # exchange kernels wait for the slower process on the GPU while the backward pass still runs.
        ddp_bucket_cap_mb=ONE_GRADIENT_BUCKET_MB,
        # Each process's summed token loss over the step's token count in all processes: the gradient is
        # the same however the step's examples are shared out (the batches of several processes differ
        # in size, qexpand.accel.batches).
        average_tokens_across_devices=True,
    )


def reentrant_recomputation(config: TrainConfig) -> bool:
    """Re-entrant checkpoints run each block's first forward pass without autograd (nothing recorded,
    nothing saved): 1.10-1.34x the rate on an H200 (bench/RESULTS.md). Compiled blocks keep the other
    kind, which they were measured with: a first pass without autograd would compile a second graph."""
    return config.compile != "on"


def step_clock():
    """A callback that stamps every entry of the loss log with the seconds since this invocation's
    training started: the log then also says how long each optimizer step took."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The Trainer appends the entry before it calls on_log.
            state.log_history[-1]["elapsed_s"] = round(time.perf_counter() - self.started, 3)

    return StepClock()


def tokenized_dataset(topics: list[data.Topic], tokenizer, config: TrainConfig):
    from datasets import Dataset

    rows = [tokenize_example(tokenizer, config.prompt_template, t.query, data.training_target(t, config.target),
                             config.max_length) for t in topics]
    return Dataset.from_list(rows)


def open_run_dir(plan: Plan, model, tokenizer, state) -> Path | None:
    """Start a new run directory, or check a resumed one; the checkpoint to resume from."""
    if plan.record:
        runcheck.verify_tokenizer(tokenizer, plan.record.tokenizer_check, f"saved in {plan.run_dir}")
    elif state.is_main_process:
        rundir.start_run_dir(plan.run_dir, plan.config, plan.split, plan.split_json, model, tokenizer,
                             state.num_processes)
    # The main process removes checkpoints cut off mid-write before the others look.
    checkpoint = rundir.latest_complete_checkpoint(plan.run_dir) if plan.record and state.is_main_process else None
    state.wait_for_everyone()
    if plan.record and not state.is_main_process:
        checkpoint = rundir.latest_complete_checkpoint(plan.run_dir)
    return checkpoint


def print_plan(plan: Plan, model, n_train: int, n_eval: int, processes: int, steps_per_epoch: int, checkpoint) -> None:
    c = plan.config
    recomputation = "" if c.gradient_checkpointing != "on" else (
        " (re-entrant)" if reentrant_recomputation(c) else " (not re-entrant, for the compiled blocks)")
    print(f"run directory: {plan.run_dir}\nbase model: {c.model} ({c.quantization}, {c.device}); precision "
          f"{c.precision}; recipe {c.recipe}; topics: {n_train} train / {n_eval} eval / "
          f"{len(plan.split['test'])} test; {model.get_nb_trainable_parameters()[0]:,} trainable parameters; "
          f"gradient checkpointing {c.gradient_checkpointing}{recomputation}; compiled blocks {c.compile}; "
          f"LoRA layers {c.lora_kernels}\n{processes} process(es) x batch {c.batch_size} x accumulation "
          f"{c.grad_accum} = effective batch {processes * c.batch_size * c.grad_accum}; learning rate "
          f"{c.learning_rate:g}; {steps_per_epoch} steps per epoch"
          + (f"; at most {c.max_steps} steps" if c.max_steps else "")
          + ("\neach step's examples cut into batches of equal padded size, one per process"
             if processes > 1 and not c.stock else "")
          + ("\nstock path (--stock): none of the speed-ups of qexpand.accel" if c.stock else "")
          + (f"\nresuming from {checkpoint}" if checkpoint else ""), flush=True)


def finish_run(run_dir: Path, trainer, result, measures: dict) -> None:
    """Save the best adapter, the loss log and plot, then mark the run finished (in that order)."""
    rundir.save_final_adapter(trainer.model, run_dir)
    rundir.write_loss_outputs(run_dir, trainer.state.log_history)
    best_eval = trainer.state.best_metric
    rundir.mark_finished(run_dir, {
        "best_eval_loss": best_eval,
        "train_loss": result.training_loss,
        "peak_gpu_memory_gb": modeling.peak_gpu_memory_gb(),
        "peak_rss_gb": modeling.peak_rss_gb(),  # of the whole process, model loading included
        "global_steps": trainer.state.global_step,
        **measures,
    })
    print(f"done in {measures['train_seconds']:.1f} s; best eval loss {best_eval:.4f}; adapter saved in "
          f"{run_dir}\ntest it with: python testing_finetuned_model.py --run {run_dir}", flush=True)


def cli() -> int:
    main(parse_config())
    return 0


if __name__ == "__main__":
    quiet.setup_logging()
    run_cli(cli, OOM_HINT, "training stopped; continue with `python training.py --resume`.")
