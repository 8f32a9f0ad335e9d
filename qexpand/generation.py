"""Batched generation of descriptions: left padding, KV cache on, stop at EOS.

Prompts are sorted by length so each batch carries little padding, generated in batches, and
returned in the caller's order.

Two things keep generation cheap on a CPU, where every row of a batch costs a full forward pass
at every step until the last row of the batch ends:
- A batch stops early once only a few of its rows are still running, and those rows go on in a
  small batch of their own (prompt plus what they have so far). Of 1,800 sampled candidates of a
  fine-tuned SmolLM2 the median was 17 new tokens but 30 ran to the 64-token limit, so nearly
  every batch of 192 rows ran all 64 steps for a handful of rows.
- Nucleus (top-p) filtering ranks only the k most likely tokens rather than the whole vocabulary
  (the library's sort of 192 x 49,152 logits took about 0.7 s of a 2 s step on 2 cores).
Together they cut sampling 6 candidates for 32 queries (64 tokens at most) from 135 s to 64 s.

On a GPU the opposite holds: a decoding step of a 7B model for a few dozen rows is a few hundred
small kernels, launched one by one from Python. The caller may hand `generate_descriptions` a greedy
decoder that avoids that (`qexpand.accel.graphed_decoding`); without one, the library's generate
decodes. `choose_generation_form` decides how the fine-tuned model is held (merged into a bf16 base
when the GPU has the memory, else 4-bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from qexpand import modeling
from qexpand.prompt import passage_prompt_ids, prompt_ids

# A batch stops once at most this share of its rows are still running; they continue on their own.
STRAGGLER_SHARE = 0.1
# Cap on a passage's tokens: about 100 words, a paragraph.
PASSAGE_MAX_NEW_TOKENS = 128
# Room beside the merged bf16 weights for the KV cache, activations and the CUDA context (bytes).
GENERATION_HEADROOM = 4 * 1024**3


@dataclass
class Generation:
    text: str
    ended_at_eos: bool  # False: cut by max_new_tokens
    new_tokens: int


class TemperedNucleus(LogitsProcessor):
    """Temperature, then top-p filtering over the `k` best tokens (probabilities over the whole vocabulary).

    It keeps exactly the tokens that full-vocabulary top-p keeps whenever that nucleus has at most
    `k` tokens (after temperature 0.7 it is far smaller); a larger nucleus is cut to its best `k`.
    Temperature is applied here because the library runs processors passed in before its own
    temperature step, and the nucleus must be taken on the tempered distribution.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        self.temperature, self.top_p, self.k = temperature, top_p, k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature
        best, index = scores.topk(min(self.k, scores.shape[-1]), dim=-1)  # sorted, most likely first
        probs = (best - scores.logsumexp(dim=-1, keepdim=True)).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        kept = torch.where(mass_before < self.top_p, best, torch.full_like(best, -float("inf")))
        return torch.full_like(scores, -float("inf")).scatter(-1, index, kept)


class StopForStragglers(StoppingCriteria):
    """Ends a batch once at most `STRAGGLER_SHARE` of its rows have not produced a stop token (EOS) yet."""

    def __init__(self, prompt_length: int, stops: list[int], rows: int):
        self.prompt_length, self.stops = prompt_length, torch.tensor(stops)
        self.limit = int(STRAGGLER_SHARE * rows)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length :]
        running = ~torch.isin(new, self.stops.to(new.device)).any(dim=-1)
        stop = bool(running.sum() <= self.limit)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _decode_row(tokenizer, row: list[int], stops: list[int] | None = None) -> Generation:
    """The text of a row up to its first stop token (by default the tokenizer's EOS)."""
    stops = [tokenizer.eos_token_id] if stops is None else stops
    end = next((i for i, token in enumerate(row) if token in stops), None)
    ended = end is not None
    kept = row[:end] if ended else row
    # Padding after EOS (finished rows in a batch) is dropped with the EOS cut above.
    return Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), ended, len(kept) + int(ended))


def _generate_rows(model, tokenizer, prompts: list[list[int]], copies: int, budget: int,
                   sampling: dict, stops: list[int] | None = None) -> list[list[int]]:
    """New token ids for `copies` rows per prompt (prompt-major), each ending at a stop token (by default
    the tokenizer's EOS) or after `budget` tokens."""
    device = next(model.parameters()).device
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)
    width = padded["input_ids"].shape[1]
    stops = [tokenizer.eos_token_id] if stops is None else stops
    # Only on the CPU: a GPU step costs about the same for 3 rows as for 300, so stopping early saves nothing.
    stop_early = [StopForStragglers(width, stops, len(prompts) * copies)] if device.type == "cpu" else []
    output = model.generate(
        **padded, max_new_tokens=budget, num_return_sequences=copies,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id, use_cache=True, stopping_criteria=StoppingCriteriaList(stop_early),
        **sampling,
    )
    rows = output[:, width:].tolist()
    stragglers = [i for i, row in enumerate(rows) if not set(stops) & set(row) and len(row) < budget]
    if stragglers:
        # Each straggler goes on from its own prompt plus the tokens it has so far.
        tails = _generate_rows(model, tokenizer, [prompts[i // copies] + rows[i] for i in stragglers], 1,
                               budget - len(rows[stragglers[0]]), sampling, stops)
        for i, tail in zip(stragglers, tails):
            rows[i] = rows[i] + tail
    return rows


@torch.inference_mode()
def generate_descriptions(
    model,
    tokenizer,
    template: str,
    queries: list[str],
    batch_size: int = 32,
    max_new_tokens: int = 96,
    num_candidates: int = 1,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    greedy_decoder: Callable | None = None,
    no_repeat_ngram: int = 0,
) -> list[list[Generation]]:
    """`num_candidates` generations per query: greedy for one, sampled for more.

    no_repeat_ngram: when above 0, no n-gram of that many tokens occurs twice in a row's tokens (prompt
    included), so a generation cannot loop on a sentence; the library's generate does it.

    greedy_decoder: with one candidate, decodes each batch instead of the library's generate
    (`decoder(model, prompts, pad_id, eos_id, budget)`, the new token ids of each row, or None for a
    batch it does not take; `qexpand.accel.graphed_decoding.graphed_greedy_decoding` gives one).
    """
    encoded = [prompt_ids(tokenizer, template, q) for q in queries]
    sampling = _sampling(temperature, top_p, seed) if num_candidates > 1 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if no_repeat_ngram:
        sampling["no_repeat_ngram_size"] = no_repeat_ngram
        greedy_decoder = None  # the graphed decoder has no n-gram blocking
    return _generate(model, tokenizer, encoded, num_candidates, max_new_tokens, sampling, batch_size, progress,
                     greedy_decoder)


@torch.inference_mode()
def generate_passages(model, tokenizer, queries: list[str], passages: int, batch_size: int = 32,
                      max_new_tokens: int = PASSAGE_MAX_NEW_TOKENS, temperature: float = 0.7, top_p: float = 0.95,
                      seed: int = 0, progress: bool = True) -> list[list[Generation]]:
    """`passages` sampled passages per query, each a short encyclopedia paragraph about the query written by
    `model` as it is handed in (the caller switches a fine-tuned adapter off: the base model writes them).

    A passage ends at the tokenizer's EOS or at the model's own end of text (an instruct model's end of turn).
    """
    encoded = [passage_prompt_ids(tokenizer, q) for q in queries]
    return _generate(model, tokenizer, encoded, passages, max_new_tokens, _sampling(temperature, top_p, seed),
                     batch_size, progress, stops=passage_stops(model, tokenizer))


def passage_stops(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, then the model's own end-of-text ids where they differ (SmolLM2-Instruct's
    tokenizer ends with <|im_start|>, a chat turn with <|im_end|>)."""
    own = model.config.eos_token_id
    own = own if isinstance(own, list) else [] if own is None else [own]
    return list(dict.fromkeys([tokenizer.eos_token_id, *own]))


def _sampling(temperature: float, top_p: float, seed: int) -> dict:
    """The sampling arguments of generate, the global generator seeded first."""
    torch.manual_seed(seed)
    # temperature 1, top_p 1 and top_k 0 switch off the library's own steps; TemperedNucleus does them.
    return {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "logits_processor": LogitsProcessorList([TemperedNucleus(temperature, top_p)])}


def _generate(model, tokenizer, encoded: list[list[int]], copies: int, budget: int, sampling: dict,
              batch_size: int, progress: bool, greedy_decoder: Callable | None = None,
              stops: list[int] | None = None) -> list[list[Generation]]:
    """`copies` generations per prompt, in batches of prompts of similar length, in the caller's order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[Generation]] = [[] for _ in encoded]
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        prompts = [encoded[i] for i in batch]
        rows = None
        if greedy_decoder is not None and copies == 1:
            rows = greedy_decoder(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, budget)
        if rows is None:
            rows = _generate_rows(model, tokenizer, prompts, copies, budget, sampling, stops)
        for row_number, row in enumerate(rows):
            results[batch[row_number // copies]].append(_decode_row(tokenizer, row, stops))
    return results


@dataclass(frozen=True)
class GenerationForm:
    """How the fine-tuned model is held while it generates, and why."""

    quantization: str  # "none": plain weights (bf16 on CUDA), the adapter merged in; "nf4": 4-bit base + LoRA
    reason: str
    # On plain weights too the adapter stays beside the base where the base itself must write with it
    # switched off (--zero-shot, --passages): a merged adapter cannot be switched off.
    adapter_apart: bool = False

    @property
    def merged(self) -> bool:
        return self.quantization == "none" and not self.adapter_apart


def bf16_weight_bytes(base_model: str, gguf_file: str | None) -> int:
    """Size of the base model's weights in bf16, counted on an empty (meta-device) copy."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(modeling.load_config(base_model, gguf_file))
    return 2 * sum(p.numel() for p in skeleton.parameters())


# --generation-form as the base is loaded: "none" is unquantized (the adapter then merged into it).
LOADED_AS = {"merged": "none", "nf4": "nf4"}


def choose_generation_form(device: str, requested: str, trained: str, base_model: str,
                           gguf_file: str | None) -> GenerationForm:
    """How to hold the model for generation: `requested` ("auto", "nf4" or "none": unquantized, merged),
    else on CUDA the adapter merged into a bf16 base wherever that fits, else as it was `trained`.

    On CUDA a merged bf16 model decodes faster than the 4-bit base with LoRA layers beside it, though
    it reads about 3.7x the weight bytes per step: the 4-bit path de-quantizes every weight at every
    step and runs the LoRA kernels on the side (bench/RESULTS.md has the measurements).
    """
    if requested != "auto":
        shown = "merged" if requested == "none" else requested
        return GenerationForm(requested, f"--generation-form {shown} was asked for")
    if device != "cuda" or trained != "nf4":
        return GenerationForm(trained, f"as the run was trained ({trained})")
    needed = bf16_weight_bytes(base_model, gguf_file) + GENERATION_HEADROOM
    free, _ = torch.cuda.mem_get_info()
    fits = free >= needed
    reason = (f"bf16 weights plus room for the cache ({needed / 2**30:.1f} GiB) "
              f"{'fit in' if fits else 'exceed'} the GPU's free {free / 2**30:.1f} GiB")
    return GenerationForm("none" if fits else "nf4", reason)


def load_with_adapter(base_model: str, gguf_file: str | None, adapter_dir, device: str, quantization: str,
                        precision: str):
    """The base model with the run's adapter attached (merging is left to the caller, which may
    first generate with the adapter switched off)."""
    from peft import PeftModel

    model = modeling.load_base_model(base_model, gguf_file, quantization, device, precision)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    if device == "cuda" and quantization == "nf4":
        # LoRA weights load in float32; in bf16 they skip two casts per LoRA layer and token, which
        # halved generation time on an H100 (bench/RESULTS.md).
        for name, module in model.named_modules():
            if name.endswith((".lora_A", ".lora_B")):
                module.to(torch.bfloat16)
    model.config.use_cache = True
    return model
