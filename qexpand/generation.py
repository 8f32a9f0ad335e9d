"""Batched generation of descriptions: left padding, KV cache on, stop at EOS.

Prompts are sorted by length so each batch carries little padding, generated in batches, and
returned in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qexpand.prompt import prompt_ids


@dataclass
class Generation:
    text: str
    ended_at_eos: bool  # False: cut by max_new_tokens
    new_tokens: int


def _decode_row(tokenizer, row: list[int]) -> Generation:
    eos = tokenizer.eos_token_id
    ended = eos in row
    kept = row[: row.index(eos)] if ended else row
    # Padding after EOS (finished rows in a batch) is dropped with the EOS cut above.
    return Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), ended, len(kept) + int(ended))


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
) -> list[list[Generation]]:
    """`num_candidates` generations per query: greedy for one, sampled for more."""
    encoded = [prompt_ids(tokenizer, template, q) for q in queries]
    order = sorted(range(len(queries)), key=lambda i: len(encoded[i]))
    results: list[list[Generation]] = [[] for _ in queries]
    sampling = num_candidates > 1
    if sampling:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        padded = tokenizer.pad(
            {"input_ids": [encoded[i] for i in batch]}, padding_side="left", return_tensors="pt"
        ).to(device)
        output = model.generate(
            **padded,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            num_return_sequences=num_candidates,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()
        for row_number, row in enumerate(new_tokens):
            results[batch[row_number // num_candidates]].append(_decode_row(tokenizer, row))
    return results
