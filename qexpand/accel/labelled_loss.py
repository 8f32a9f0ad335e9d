"""The training loss with the output layer run only where a token is scored, a chunk at a time.

The stock causal-LM loss multiplies every position's hidden state by the output layer and keeps the
whole batch of logits, in float32, for the backward pass: batch x positions x vocabulary. Most of those
positions are the prompt, whose labels are masked, and the vocabulary makes the tensor large (SmolLM2's
49k words: 0.2 GB a micro-batch of 4 x 256; Gemma 3's 262k: 1 GB, and its softmax and gradient as much
again). Here, while training runs, the model's output layer hands back its input (the final hidden
states) and the Trainer's `compute_loss_func` scores them: the positions that have a label are gathered,
and each chunk of them goes through the output layer and the cross-entropy under activation
checkpointing, so that only one chunk's logits exist at a time, in the forward pass and again in the
backward. The sum is divided by the step's labelled-token count (`num_items_in_batch`), or by the
batch's own in evaluation, as the stock loss does: same loss, same gradients (tests/test_labelled_loss.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding)
# Float32 logits (positions x vocabulary) that exist at once, by the device the output layer is on. On an
# H100 chunks of 2^26 (256 MiB) made the loss + backward faster than the stock loss for Gemma, SmolLM2 and
# Mistral shapes (2^24: up to 1.8x slower than stock) at under 0.9 GB; on the CPU, where memory is what
# is short, 2^24 is already faster than the stock loss and 2^26 saved at most 16% more
# (bench/labelled_loss_chunks.py, bench/RESULTS.md).
CHUNK_LOGITS = {"cuda": 2**26, "cpu": 2**24}


def chunked_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head, softcap: float | None, chunk: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of scored tokens) of next-token prediction: `hidden` (batch x
    positions x width) predicts `labels` shifted one to the left; `head` computes in `dtype`."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    states, targets = hidden[:, :-1][scored], targets[scored]
    total = states[:0].float().sum()  # 0, inside the graph: a batch with nothing to score has zero gradients
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(_summed_loss, states[start:start + chunk], targets[start:start + chunk],
                                   head, softcap, dtype, use_reentrant=False)
    return total, scored.sum()


def positions_per_chunk(logits: int, vocabulary: int) -> int:
    """Positions whose logits make at most `logits` numbers (at least one position)."""
    return max(1, logits // vocabulary)


def default_chunk(device_type: str, vocabulary: int) -> int:
    """Positions a chunk takes on this kind of device (CHUNK_LOGITS; other accelerators as CUDA)."""
    return positions_per_chunk(CHUNK_LOGITS["cpu" if device_type == "cpu" else "cuda"], vocabulary)


def _summed_loss(states, targets, head, softcap, dtype):
    # In mixed precision the output layer ran inside the model's autocast, which accelerate leaves before
    # handing the outputs back in float32: the states go to the layer in its own dtype, as autocast sent them.
    logits = head(states.to(dtype)).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@contextlib.contextmanager
def loss_at_labelled_positions(trainer, model, chunk: int | None = None):
    """While inside, `model` (the causal LM the Trainer trains, peft-wrapped or not) returns its final
    hidden states as `logits`, and `trainer` scores them with `chunked_token_loss`, `chunk` positions at a
    time (default: as many as make CHUNK_LOGITS logits on the output layer's device). On leaving, the output
    layer and the Trainer's loss are the stock ones again."""
    from qexpand.accel import checked_versions

    checked_versions.require("labelled_loss")
    head = model.get_output_embeddings()
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    chunk = chunk or default_chunk(head.weight.device.type, head.weight.shape[0])
    stock_forward = head.forward

    def loss(outputs, labels, num_items_in_batch=None):
        summed, scored = chunked_token_loss(outputs.logits, labels, stock_forward, softcap, chunk, head.weight.dtype)
        return summed / (num_items_in_batch if num_items_in_batch is not None else scored)

    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        raise RuntimeError("the labelled-position loss replaces the stock loss, and this Trainer has another one")
    own_forward = head.__dict__.get("forward")  # a forward already replaced on this instance, if any
    head.forward = lambda states: states  # the final hidden states come out as the model's "logits"
    if softcap is not None:
        config.final_logit_softcapping = None  # applied to the logits here instead
    trainer.compute_loss_func = loss
    try:
        yield
    finally:
        trainer.compute_loss_func = None
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
        if softcap is not None:
            config.final_logit_softcapping = softcap
