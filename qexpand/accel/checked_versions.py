"""Every private API of a library that `qexpand.accel` relies on, and the library versions it was checked on.

The speed machinery replaces forwards of peft's layers, reads bitsandbytes' quantization state, hands the
Trainer its own batch sampler and records CUDA graphs over the library's static cache: none of that is a
promise the libraries make. On versions other than the ones below, a part of the machinery refuses to
start (a UserError naming the stock path) rather than compute something else without a word.
"""

from __future__ import annotations

import importlib.metadata
from typing import NamedTuple

from qexpand.errors import UserError

# The versions each library was checked on (requirements.txt pins the same; torch: the builds the
# suite and the GPU runs used). A version matches an entry if it starts with it ("0.21." is any 0.21.x).
CHECKED_ON = {
    "torch": ("2.11.", "2.13."),
    "transformers": ("5.17.0",),
    "peft": ("0.21.",),
    "bitsandbytes": ("0.50.2",),
    "accelerate": ("1.15.0",),
    "ir_datasets": ("0.6.3",),
}


class PrivateUse(NamedTuple):
    library: str
    what: str  # the private API
    used_for: str


PRIVATE_APIS = {
    "fused_layers": (
        PrivateUse("peft", "peft.tuners.lora.bnb.Linear4bit: its forward replaced per instance; its "
                   "active_adapters, lora_A, lora_B, lora_dropout, lora_variant, scaling, disable_adapters, "
                   "merged and get_base_layer() read at every call", "the fused LoRA layers"),
        PrivateUse("bitsandbytes", "Params4bit.quant_state fields absmax, nested, state2, offset, blocksize, "
                   "quant_type, shape, dtype and packing_format_for_cpu; Linear4bit.compute_dtype",
                   "the 4-bit weight's operands, taken once at fusing"),
        PrivateUse("bitsandbytes", "bitsandbytes.functional.dequantize_blockwise and the operator "
                   "torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, "
                   "shape, dtype)", "de-quantizing the weights inside the fused function"),
        PrivateUse("torch", "Tensor._version (the in-place write counter) and "
                   "torch.optim.optimizer.register_optimizer_step_post_hook (process-wide)",
                   "keeping the LoRA weights' casts for one optimizer step"),
        PrivateUse("torch", "torch.native_dropout and torch.ops.aten.native_dropout_backward",
                   "the dropout of the LoRA input and its gradient"),
        PrivateUse("transformers", "the module-level apply_rotary_pos_emb of a model's modeling module, "
                   "looked up by the attention at every call", "the rotary embedding as one function"),
        PrivateUse("transformers", "an RMSNorm module's weight and variance_epsilon attributes",
                   "torch's rms_norm in place of the model's norm"),
    ),
    # balanced batches for several processes, and the operation tally counted once
    "trainer_hooks": (
        PrivateUse("transformers", "Trainer._get_train_sampler, replaced on the Trainer instance",
                   "each process's share of every step's examples"),
        PrivateUse("transformers", "transformers.trainer_pt_utils.BatchRebalanceSampler (the Trainer hands "
                   "a batch sampler of this type to the loader as it is) and get_length_grouped_indices",
                   "the balanced sampler's type and its length-grouped order"),
        PrivateUse("accelerate", "the batch_sampler attribute of accelerate's loader, SkipBatchSampler and "
                   "BatchSamplerShard", "reaching the balanced batches to tell them the epoch"),
        PrivateUse("accelerate", "Accelerator.ddp_handler (DistributedDataParallelKwargs) and its "
                   "gradient_as_bucket_view", "gradients kept in DDP's buckets"),
        PrivateUse("transformers", "Trainer.floating_point_ops, replaced on the Trainer instance",
                   "counting the parameters once for the operation tally"),
    ),
    "labelled_loss": (
        PrivateUse("transformers", "a causal LM's forward without labels returns get_output_embeddings() of "
                   "its final hidden states as logits, softcapped when config.final_logit_softcapping is set; "
                   "the output layer's forward replaced per instance", "the final hidden states handed to the "
                   "loss, which runs the output layer itself"),
        PrivateUse("transformers", "Trainer.compute_loss_func, set on the Trainer instance after construction, "
                   "and Trainer.label_smoother", "the loss at labelled positions"),
    ),
    "graphed_decoding": (
        PrivateUse("transformers", "transformers.cache_utils.Cache(layers=...), StaticLayer(max_cache_len) "
                   "and StaticLayer.cumulative_length", "a KV cache in fixed buffers, its lengths restored "
                   "after the capture's warm-up"),
        PrivateUse("transformers", "a decoder model's forward with a 4-D boolean attention_mask, "
                   "position_ids, a static cache and logits_to_keep", "one decoding step on fixed buffers"),
    ),
    # Outside the speed machinery, on every path (the stock one too), so listed here for the record and checked
    # by the tests (tests/test_accel.py), not refused: there is no path without them.
    "loading": (
        PrivateUse("transformers", "the GGUF reader's module-level tqdm (transformers.modeling_gguf_pytorch_utils."
                   "tqdm), swapped for the library's switchable tqdm while a model loads (modeling.no_progress_bars)",
                   "no de-quantizing bar"),
        PrivateUse("transformers", "PreTrainedModel.hf_quantizer.remove_quantization_config, on a model "
                   "de-quantized from GGUF (modeling.load_base_model)", "the Trainer training a GGUF base"),
        PrivateUse("bitsandbytes", "Linear4bit.support_avx512bf16_for_cpu, set False "
                   "(modeling.keep_four_bit_layout_for_training)", "no gradient lost to the CPU inference kernel"),
        PrivateUse("ir_datasets", "the _cache_path and mirrors attributes of the Download objects inside a "
                   "queries handler (data._wanted_files)", "naming the file a failed offline load needs"),
    ),
}

# The switch that leaves each part out, for the refusal's message.
STOCK_SWITCH = {
    "fused_layers": "`python training.py --stock` (peft's LoRA layers, the stock Trainer)",
    "trainer_hooks": "`python training.py --stock` (peft's LoRA layers, the stock Trainer)",
    "labelled_loss": "`python training.py --stock` (peft's LoRA layers, the stock Trainer)",
    "graphed_decoding": "`python testing_finetuned_model.py --stock` (the library's generate)",
}


def installed_version(library: str) -> str:
    return importlib.metadata.version(library)


def checked(library: str, version: str) -> bool:
    """Whether `version` (a local build suffix such as +cu128 aside) is one `library` was checked on."""
    release = version.split("+")[0]
    return any(release == entry or (entry.endswith(".") and release.startswith(entry))
               for entry in CHECKED_ON[library])


def shown_checked_versions() -> str:
    """CHECKED_ON as a reader writes it: torch 2.11.x or 2.13.x, transformers 5.17.0, ..."""
    return ", ".join(f"{library} {' or '.join(entry + 'x' if entry.endswith('.') else entry for entry in entries)}"
                     for library, entries in CHECKED_ON.items())


def unchecked_libraries(part: str) -> list[str]:
    """'library version' for each library that `part` uses privately and whose installed version is not
    one it was checked on."""
    libraries = dict.fromkeys(use.library for use in PRIVATE_APIS[part])
    versions = {library: installed_version(library) for library in libraries}
    return [f"{library} {version}" for library, version in versions.items() if not checked(library, version)]


def require(part: str) -> None:
    """Refuse to start `part` of the speed machinery on library versions it was not checked on."""
    unchecked = unchecked_libraries(part)
    if unchecked:
        raise UserError(f"the speed-ups of qexpand.accel ({part.replace('_', ' ')}) use private parts of "
                        f"{', '.join(unchecked)}, and were checked only on {shown_checked_versions()} "
                        "(qexpand/accel/checked_versions.py lists them). Install those versions "
                        f"(requirements.txt), or run on the stock path: {STOCK_SWITCH[part]}.")
