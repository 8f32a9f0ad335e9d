"""Candidate changes to the default recipe, each measured beside a copy of the default in the same
way (a window of optimizer steps), so that only the change differs.

The copy is built from the project's public pieces (qexpand's loader, LoRA settings and example
tokenisation) with the Trainer settings training.py used when these variants were first measured:
batch 32, peft's LoRA layers, recomputation without re-entrant checkpoints, fused AdamW, bf16
autocast, length-grouped batches padded to a multiple of 8. It stays that way so that the commands in
bench/RESULTS.md keep measuring what they measured; training.py's default is now the variant
`fused-reentrant-norms-attention-grouped`. The `fused` variants take the fused layers as of the
checkout (since they cast the LoRA weights once per optimizer step, every one includes that), one
call per layer unless `grouped` is set, so `fused-reentrant-norms-attention` is training.py's
default before sibling layers were grouped. A change that pays here is proposed for training.py,
not made behind its back.
"""

from __future__ import annotations

import contextlib

from bench.gpu_build import training_examples
from bench.gpu_common import CountingCollator, gpu_gb, measure_trainer, reset_peak, step_timer, timed

# name -> the changes against the copy of the default recipe
VARIANTS = {
    "copy": {},
    "nodrop": {"lora_dropout": 0.0},
    "liger": {"liger": True},
    "packed": {"packed": True},
    "packed-nodrop-liger": {"packed": True, "lora_dropout": 0.0, "liger": True},
    "packed-nodrop-liger-b64": {"packed": True, "lora_dropout": 0.0, "liger": True, "batch_size": 64},
    "compile": {"compile": True},
    # The same as compile, in a later process: the compile caches on disk are warm.
    "compile-warm": {"compile": True},
    "compile-graphs": {"compile": True, "compile_mode": "reduce-overhead"},
    "compile-nodrop": {"compile": True, "lora_dropout": 0.0},
    "compile-nockpt": {"compile": True, "checkpointing": False},
    "compile-b64": {"compile": True, "batch_size": 64},
    # training.py --lora-kernels fused (qexpand.accel.lora_kernels)
    "fused": {"fused": True},
    "fused-compile": {"fused": True, "compile": True},
    # Re-entrant checkpoints: the first forward pass runs without autograd.
    "reentrant": {"reentrant": True},
    "fused-reentrant": {"fused": True, "reentrant": True},
    # On top: torch's RMSNorm while training (qexpand.accel.lora_kernels.fuse_rms_norms), attention kernels
    # other than cuDNN's (qexpand.modeling.training_attention), both (training.py's default since).
    "fused-reentrant-norms": {"fused": True, "reentrant": True, "norms": True},
    "fused-reentrant-attention": {"fused": True, "reentrant": True, "attention": True},
    "fused-reentrant-norms-attention": {"fused": True, "reentrant": True, "norms": True, "attention": True},
    # The same, compiled, non-re-entrant: it trained to a far higher loss on an H200, so training.py
    # compiles peft's layers only (bench/results/gpu_compiled_fused_window.json).
    "fused-norms-attention-compile": {"fused": True, "norms": True, "attention": True, "compile": True},
    # On top: sibling layers (q/k/v, gate/up) as one call each, sharing one dropout mask, and the
    # de-quantized weights of the recomputation kept for the backward pass (training.py's default since;
    # at be0a17d the same name meant the first version, a mask per layer).
    "fused-reentrant-norms-attention-grouped": {"fused": True, "reentrant": True, "norms": True, "attention": True,
                                                "grouped": True, "keep_weights": True},
}
# A second measurement of a variant in the same call, for an A-B-B-A order against the host's drift.
VARIANTS.update({f"{name}-again": VARIANTS[name]
                 for name in ("copy", "fused", "reentrant", "fused-reentrant", "fused-reentrant-norms-attention",
                             "fused-reentrant-norms-attention-grouped")})
COPY = {"batch_size": 32, "lora_dropout": 0.05, "liger": False, "packed": False, "checkpointing": True,
        "reentrant": False, "fused": False, "compile": False, "compile_mode": None, "norms": False,
        "attention": False, "grouped": False, "keep_weights": False}
# Compiled variants are not profiled: a profiled step recompiles.
PROFILED = ("copy", "fused", "reentrant", "fused-reentrant", "fused-reentrant-norms", "fused-reentrant-attention",
            "fused-reentrant-norms-attention", "fused-reentrant-norms-attention-grouped")


def collator_for(tokenizer, packed: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packed:
        # One row per batch, the examples end to end, position ids restarting at each example: no
        # padding, and the attention mask keeps the examples apart.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8)


def run(opts, paths, device, left_s, variant: str) -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from qexpand import modeling
    from qexpand.accel import lora_kernels
    from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

    settings = {**COPY, **VARIANTS[variant]}
    tokenizer = modeling.load_tokenizer(str(paths.model))
    tokenizer.padding_side = "right"
    model, load_s = timed(lambda: modeling.load_base_model(str(paths.model), None, "nf4", device, "bf16"), device)
    reset_peak(device)
    model.enable_input_require_grads()
    model = get_peft_model(model, modeling.lora_config(model, 8, 16, settings["lora_dropout"], "all-linear"))
    keep = settings["keep_weights"] and lora_kernels.weights_can_wait_for_backward(settings["checkpointing"],
                                                                                   settings["reentrant"])
    fused_layers = lora_kernels.fuse_lora_layers(model, group_siblings=settings["grouped"],
                                                 keep_weights_for_backward=keep) if settings["fused"] else 0
    fused_norms = lora_kernels.fuse_rms_norms(model) if settings["norms"] else 0
    compiled_layers = modeling.compile_decoder_layers(model, settings["compile_mode"]) if settings["compile"] else 0
    topics, _ = training_examples(paths, opts.train_examples)
    rows = Dataset.from_list([tokenize_example(tokenizer, PROMPT_TEMPLATE, t.query, t.description, 256)
                              for t in topics])
    args = TrainingArguments(
        output_dir=str(paths.trainer_out / f"tuning-{variant}"), per_device_train_batch_size=settings["batch_size"],
        max_steps=opts.warmup_steps + opts.measure_steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=device == "cuda",
        use_cpu=device != "cuda", gradient_checkpointing=settings["checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": settings["reentrant"]}, train_sampling_strategy="group_by_length",
        use_liger_kernel=settings["liger"], save_strategy="no", eval_strategy="no", report_to="none",
        seed=opts.seed, data_seed=opts.seed, dataloader_num_workers=0, label_names=["labels"], disable_tqdm=True)
    collator = CountingCollator(collator_for(tokenizer, settings["packed"]))
    timer = step_timer(device)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[timer])
    result = {"settings": settings, "checkpointing": settings["checkpointing"], "batch_size": settings["batch_size"],
              "grad_accum": 1, "model_load_s": round(load_s, 2), "compiled_layers": compiled_layers,
              "fused_layers": fused_layers, "fused_norms": fused_norms}
    attention = modeling.training_attention(device, compiled=False)  # as asked, compiled variants too
    with attention if settings["attention"] else contextlib.nullcontext():
        result.update(measure_trainer(trainer, collator, timer, opts.warmup_steps, opts.measure_steps, 1))
        result["peak_gb"] = gpu_gb(device, peak=True)
        if variant.removesuffix("-again") in PROFILED and device == "cuda":
            result["profile"] = profile_step(trainer, collator)
    if settings["compile"]:
        from torch._dynamo.utils import counters

        result["graph_breaks"] = {reason[:120]: count for reason, count in counters["graph_break"].items()}
    return result


def profile_step(trainer, collator) -> dict:
    """The CUDA kernels that take most time in one more training step (forward, recomputation,
    backward), and how much of the step's wall time the GPU spent running kernels at all."""
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batch = collator.inner([trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    trainer.model.train()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.model(**batch).loss
        loss.backward()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
    # Operator rows repeat the time of the kernels they launch: only kernel rows are summed.
    kernels = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    return {"wall_ms": round(wall_ms, 1), "kernel_ms": round(total_ms, 1),
            "gpu_busy_share": round(total_ms / wall_ms, 3), "kernel_launches": sum(e.count for e in kernels),
            "top_kernels": [{"name": e.key[:90], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 2),
                             "share": round(e.self_device_time_total / 1e3 / total_ms, 3) if total_ms else None}
                            for e in kernels[:12]]}
