"""Training batches as the collator makes them: padded on the right, labels padded so they carry no
loss, no padding mask."""

from __future__ import annotations

from qexpand.errors import UserError

PAD_MULTIPLE = 8  # the collator pads each batch to a multiple of this many tokens


def collator_padding(pad_to: int | None) -> dict:
    """How the training collator pads (the arguments of transformers' DataCollatorForSeq2Seq): each
    batch to its longest example, rounded up to PAD_MULTIPLE; with `pad_to` (--pad-to, the original
    recipe) every example to that fixed length."""
    if pad_to:
        return {"padding": "max_length", "max_length": pad_to}
    return {"padding": True, "pad_to_multiple_of": PAD_MULTIPLE}


def check_pad_to(pad_to: int | None, lengths: dict[str, list[int]]) -> None:
    """With `pad_to` (--pad-to) every example is padded to that many tokens, which an example longer than
    that cannot be: the collator would stop the run at the first batch holding one. Refused before
    training instead. `lengths`: the tokens of each example (prompt + description + EOS) by split."""
    longest = max((max(counts) for counts in lengths.values() if counts), default=0)
    if not pad_to or longest <= pad_to:
        return
    longer = ", ".join(f"{sum(n > pad_to for n in counts)} of the {len(counts)} {split} examples"
                       for split, counts in lengths.items() if any(n > pad_to for n in counts))
    raise UserError(f"--pad-to {pad_to} is shorter than {longer} (prompt, description and end token; the "
                    f"longest has {longest} tokens), and no example is cut to fit it. Give --pad-to {longest} "
                    "or more, --pad-to 0 (each batch padded to its own longest example), or a --max-length "
                    f"of at most {pad_to}, which cuts the longer descriptions.")


def data_collator(pad_to: int | None, tokenizer):
    """Batches for training and the eval loss, padded on the right, without a padding mask."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.padding_side != "right":
        raise ValueError("training batches are padded on the right (load_model sets it)")
    # Labels are padded with IGNORE_INDEX. By default each batch is padded to its own longest example
    # (a multiple of 8); with --pad-to every example to that fixed length, as the original recipe did
    # (collator_padding, which the balanced cut of several processes counts by as well).
    pad = DataCollatorForSeq2Seq(tokenizer, **collator_padding(pad_to))

    def collate(features):
        # Pads come after every real token of their row and the model attends causally, so no real token
        # attends to a pad, and the pads' own outputs carry no loss: the padding mask changes nothing the
        # loss sees. Without it the attention is plain causal attention (PyTorch's flash kernel, the key
        # and value heads shared inside it), where a mask makes the library copy them once for each
        # query head that reads them and use a slower kernel.
        batch = pad(features)
        batch.pop("attention_mask", None)
        return batch

    return collate
