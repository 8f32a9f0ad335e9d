"""Greedy decoding on a GPU with the one-token step replayed as a CUDA graph.

A decoding step of a 7B model for a few dozen rows is a few hundred small kernels, and launching them
one by one from Python takes longer than running them. `GraphedGreedy` keeps the KV cache in fixed
buffers and replays the step as a CUDA graph; `graphed_greedy_decoding` hands
`qexpand.generation.generate_descriptions` a decoder that uses it for the batches it supports.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from transformers.cache_utils import Cache, StaticLayer

# GraphedGreedy looks whether every row has ended once per this many steps (each look waits for the GPU).
FINISHED_CHECK_STEPS = 8

log = logging.getLogger(__name__)


class GraphedGreedy:
    """Greedy decoding of one batch with a static KV cache; on CUDA its one-token step is a CUDA graph.

    It computes what the library's greedy search computes (same positions, same masks, finished rows
    fed the pad token), but every step reads and writes the same buffers: the cache has room for
    prompt + budget tokens from the start, and the attention mask comes from a step counter kept on
    the device. So the step (forward, argmax, bookkeeping) is captured once and replayed. Capturing
    costs about two steps, where torch.compile of the same step (the library's route to CUDA graphs,
    `cache_implementation="static"`) takes about a minute for a 7B model (bench/RESULTS.md). On the
    CPU the same step runs without a graph.
    """

    def __init__(self, model, prompts: list[list[int]], pad_id: int, eos_id: int, budget: int):
        self.model, self.budget, self.eos = model, budget, eos_id
        self.device = next(model.parameters()).device
        rows, self.width = len(prompts), max(len(p) for p in prompts)
        length = self.width + budget
        ids = torch.full((rows, self.width), pad_id, dtype=torch.long)
        valid = torch.zeros((rows, length), dtype=torch.bool)  # prompt keys each row may attend
        for row, prompt in enumerate(prompts):
            ids[row, self.width - len(prompt):] = torch.tensor(prompt)
            valid[row, self.width - len(prompt):self.width] = True
        self.prompt_ids, self.valid = ids.to(self.device), valid.to(self.device)
        self.key_index = torch.arange(length, device=self.device)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[StaticLayer(max_cache_len=length) for _ in range(layers)])
        self.pad = torch.tensor(pad_id, device=self.device)
        self.tokens = torch.full((rows, budget), pad_id, dtype=torch.long, device=self.device)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)  # index of the token being chosen
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=self.device)
        self.next_ids = torch.full((rows, 1), pad_id, dtype=torch.long, device=self.device)
        self.graphed, self.capture_s = False, 0.0

    @staticmethod
    def supports(model, length: int) -> bool:
        """Whether prompt + new tokens fit the model's attention span: the cache here attends to
        every earlier token, which a sliding-window model only does within its window."""
        window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
        return window is None or length <= window

    def _choose(self, logits: torch.Tensor) -> None:
        """Record the argmax of each row at `step` (pad once a row has ended) and make it the next input."""
        chosen = logits.float().argmax(dim=-1)
        chosen = torch.where(self.unfinished, chosen, self.pad)
        self.unfinished &= chosen != self.eos
        self.tokens.index_copy_(1, self.step, chosen[:, None])
        self.next_ids.copy_(chosen[:, None])

    def _prefill(self) -> None:
        prompt_valid = self.valid[:, :self.width]
        # Positions as the library counts them under left padding (pads get 1).
        self.positions = (prompt_valid.long().cumsum(-1) - 1).masked_fill(~prompt_valid, 1)
        causal = self.key_index[None, :] <= torch.arange(self.width, device=self.device)[:, None]
        mask = causal[None] & self.valid[:, None, :]
        # A query on a pad sees no key at all; let it see every key (its output is never used) so the
        # attention softmax stays finite, as the library does.
        mask |= ~mask.any(dim=-1, keepdim=True)
        out = self.model(input_ids=self.prompt_ids, position_ids=self.positions, attention_mask=mask[:, None],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self._choose(out.logits[:, -1])
        self.positions = self.positions[:, -1:] + 1

    def _decode_step(self) -> None:
        """One token for every row, on fixed buffers only (no host sync): capturable as a CUDA graph."""
        # The token fed in now sits at width + step; it and the tokens before it are attended.
        generated = (self.key_index >= self.width) & (self.key_index <= self.width + self.step)
        mask = self.valid | generated[None, :]
        out = self.model(input_ids=self.next_ids, position_ids=self.positions, attention_mask=mask[:, None, None],
                         past_key_values=self.cache, use_cache=True)
        self.step += 1
        self._choose(out.logits[:, -1])
        self.positions += 1

    def _capture(self):
        """The decode step as a CUDA graph, or None where capture fails (then steps run eagerly)."""
        saved = [t.clone() for t in self._state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy library handles and kernels
            self._decode_step()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._decode_step()
        except RuntimeError as error:  # e.g. a kernel that synchronises with the host
            log.warning("decoding without a CUDA graph: %s", str(error).splitlines()[0])
            torch.cuda.synchronize()
            return None
        return graph

    def _state(self) -> list[torch.Tensor]:
        cache_lengths = [layer.cumulative_length for layer in self.cache.layers]
        return [self.next_ids, self.positions, self.step, self.unfinished, self.tokens, *cache_lengths]

    @torch.inference_mode()
    def run(self) -> list[list[int]]:
        self._prefill()
        started = time.perf_counter()
        graph = self._capture() if self.device.type == "cuda" and self.budget > 1 else None
        self.graphed, self.capture_s = graph is not None, time.perf_counter() - started
        done = 1
        while done < self.budget:
            graph.replay() if graph is not None else self._decode_step()
            done += 1
            if done % FINISHED_CHECK_STEPS == 0 and not bool(self.unfinished.any()):
                break
        return self.tokens[:, :done].tolist()


@contextlib.contextmanager
def graphed_greedy_decoding():
    """While inside, a greedy decoder for `qexpand.generation.generate_descriptions`: a batch that fits
    the model's attention span (`GraphedGreedy.supports`) goes through `GraphedGreedy`, any other gets
    None (the library's generate then decodes it). Nothing of the libraries is changed; the decoder
    refuses to run once the block is left."""
    from qexpand.accel import checked_versions

    checked_versions.require("graphed_decoding")
    inside = [True]

    def decode(model, prompts: list[list[int]], pad_id: int, eos_id: int, budget: int) -> list[list[int]] | None:
        if not inside[0]:
            raise RuntimeError("the graphed decoder was used after its graphed_greedy_decoding block ended")
        if not GraphedGreedy.supports(model, max(len(p) for p in prompts) + budget):
            return None
        return GraphedGreedy(model, prompts, pad_id, eos_id, budget).run()

    try:
        yield decode
    finally:
        inside[0] = False
