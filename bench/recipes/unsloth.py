"""unsloth's documented QLoRA recipe for Mistral-7B: FastLanguageModel loaded in 4 bits, LoRA r=8
on the attention and MLP projections with dropout 0 and unsloth's own gradient checkpointing,
8-bit AdamW, TRL's SFTTrainer (which unsloth patches) on the same prompt-completion examples. The
batch is the project's default (32 x 1), so samples/s compare at the same batch. unsloth switches
to padding-free batches by itself."""

from __future__ import annotations

from bench.gpu_common import gpu_gb, reset_peak, timed
from bench.recipes.trl import prompt_completion_rows, time_sft_trainer

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(opts, paths, device, left_s) -> dict:
    # unsloth patches transformers, peft and trl when it is imported, so it comes first.
    import unsloth
    from unsloth import FastLanguageModel

    import torch
    from trl import SFTConfig, SFTTrainer

    (model, tokenizer), load_s = timed(lambda: FastLanguageModel.from_pretrained(
        model_name=str(paths.model), max_seq_length=512, dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True), device)
    after_load = gpu_gb(device, peak=False)
    reset_peak(device)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0, bias="none", target_modules=PROJECTIONS,
        use_gradient_checkpointing="unsloth", random_state=opts.seed)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    args = SFTConfig(output_dir=str(paths.trainer_out / "unsloth"), per_device_train_batch_size=32,
                     gradient_accumulation_steps=1, max_steps=opts.warmup_steps + opts.measure_steps,
                     learning_rate=2e-4, optim="adamw_8bit", bf16=True, save_strategy="no", report_to="none",
                     seed=opts.seed, disable_tqdm=True, max_length=512, padding_free=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prompt_completion_rows(paths, opts.train_examples),
                         processing_class=tokenizer)
    extra = {"checkpointing": True, "model_load_s": round(load_s, 2), "after_load_gb": after_load,
             "unsloth": unsloth.__version__, "padding_free": trainer.args.padding_free}
    return time_sft_trainer(trainer, opts, device, extra)
