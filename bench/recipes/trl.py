"""TRL's standard QLoRA recipe: SFTTrainer with SFTConfig's defaults (batch 8, gradient
checkpointing, bf16, padding to the longest example) on a prompt-completion data set (loss on the
completion), the base loaded 4-bit with the project's NF4 settings, LoRA on all linear layers."""

from __future__ import annotations

from bench.gpu_build import training_examples
from bench.gpu_common import CountingCollator, gpu_gb, measure_trainer, reset_peak, step_timer, timed


def prompt_completion_rows(paths, count: int):
    from datasets import Dataset

    from qexpand.prompt import PROMPT_TEMPLATE, format_prompt

    topics, _ = training_examples(paths, count)
    return Dataset.from_list([{"prompt": format_prompt(PROMPT_TEMPLATE, t.query), "completion": t.description}
                              for t in topics])


def time_sft_trainer(trainer, opts, device: str, extra: dict) -> dict:
    """Wrap the trainer's collator and add the step timer, train, and return the timed window."""
    args = trainer.args
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    timer = step_timer(device)
    trainer.add_callback(timer)
    result = {**extra, "batch_size": args.per_device_train_batch_size,
              "grad_accum": args.gradient_accumulation_steps, "optim": str(args.optim.value),
              "trainable_params": trainer.model.get_nb_trainable_parameters()[0]}
    result.update(measure_trainer(trainer, collator, timer, opts.warmup_steps, opts.measure_steps,
                                  args.gradient_accumulation_steps))
    result["peak_gb"] = gpu_gb(device, peak=True)
    return result


def run(opts, paths, device, left_s) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from qexpand import modeling

    tokenizer = modeling.load_tokenizer(str(paths.model))
    # TRL's documented QLoRA loading: from_pretrained with a BitsAndBytesConfig (the project's NF4 one).
    model, load_s = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(paths.model), quantization_config=modeling.quantization_config(), dtype=torch.bfloat16,
        device_map={"": device}), device)
    after_load = gpu_gb(device, peak=False)
    reset_peak(device)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(paths.trainer_out / "trl"), max_steps=opts.warmup_steps + opts.measure_steps,
                     save_strategy="no", report_to="none", use_cpu=device != "cuda", seed=opts.seed,
                     disable_tqdm=True)
    rows = prompt_completion_rows(paths, opts.train_examples)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=peft_config)
    extra = {"checkpointing": bool(args.gradient_checkpointing), "model_load_s": round(load_s, 2),
             "after_load_gb": after_load}
    return time_sft_trainer(trainer, opts, device, extra)
