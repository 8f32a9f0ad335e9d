"""Training batches for several data-parallel processes, cut so that no process waits on a longer batch.

One process trains on the Trainer's length-grouped order: batches of similar length, each padded to
its longest example. With several processes, accelerate deals those batches out in turn, so each
optimizer step pairs neighbours of one sorted window, the first mostly the longer; every process then
waits, at the gradient all-reduce, for the one with the most padded tokens (on the 280 default topics,
23% more than a lone process's batch on average; bench/RESULTS.md). Here each optimizer step takes one
window of the same length-grouped order (batch x processes x accumulation examples), sorted by length,
and cuts it into one contiguous group per process and micro-batch so that the largest group's padded
tokens are as few as they can be: the groups holding the longest examples get fewer of them. The
Trainer divides every process's summed token loss by the step's token count over all processes
(`average_tokens_across_devices`, on by default), so the gradient does not depend on how a step's
examples are shared out.
"""

from __future__ import annotations

import contextlib
import functools
import math

from qexpand.collation import PAD_MULTIPLE


def length_padded_at_least(length: int, pad_to: int | None) -> int:
    """The fewest tokens an example of `length` tokens takes once collated (`qexpand.collation`),
    whatever batch it lands in: what the balanced cut counts it as."""
    return max(length, pad_to or 0)


def padded_cost(count: int, longest: int, multiple: int = PAD_MULTIPLE) -> int:
    """Tokens of a batch of `count` examples padded to its longest (rounded up to `multiple`)."""
    return count * math.ceil(longest / multiple) * multiple


def batch_tokens(indices: list[int], lengths: list[int]) -> int:
    """Padded tokens of the batch of these examples (`indices` into `lengths`)."""
    return padded_cost(len(indices), max(lengths[i] for i in indices))


def group_sizes(lengths_longest_first: list[int], groups: int, multiple: int = PAD_MULTIPLE) -> list[int]:
    """How many examples each of `groups` contiguous groups takes from `lengths_longest_first` (sorted,
    longest first; at least one each) so that the largest group's padded tokens are fewest."""
    count = len(lengths_longest_first)
    if not 1 <= groups <= count:
        raise ValueError(f"cannot cut {count} examples into {groups} non-empty groups")
    padded = [padded_cost(1, length, multiple) for length in lengths_longest_first]

    def fill(limit: int) -> list[int] | None:
        # Greedy: each group, from the longest examples on, takes as many as stay within `limit`,
        # leaving one for each group after it. A group that takes fewer only pushes examples to
        # groups that cost no more per example, so if this fails no cut within `limit` exists.
        sizes, start = [], 0
        for group in range(groups):
            later = groups - group - 1
            take = count - start if later == 0 else min(max(limit // padded[start], 1), count - start - later)
            if take * padded[start] > limit:
                return None
            sizes.append(take)
            start += take
        return sizes

    limits = sorted({size * cost for cost in set(padded) for size in range(1, count + 1)})
    low, high = 0, len(limits) - 1  # the largest limit always fits: one group holds all but groups - 1
    while low < high:
        middle = (low + high) // 2
        if fill(limits[middle]) is None:
            low = middle + 1
        else:
            high = middle
    return fill(limits[low])


def step_groups(indices: list[int], lengths: list[int], processes: int, accumulation: int) -> list[list[list[int]]]:
    """One optimizer step's examples (`indices` into `lengths`) as [process][micro-batch] groups: cut by
    `group_sizes`, then dealt by cost, the `processes` costliest groups to the first micro-batch of each
    process, the next ones to the second, so that the processes of each micro-batch cost alike."""
    ordered = sorted(indices, key=lambda i: lengths[i], reverse=True)
    sizes = group_sizes([lengths[i] for i in ordered], processes * accumulation)
    groups, start = [], 0
    for size in sizes:
        groups.append(ordered[start:start + size])
        start += size
    groups.sort(key=lambda group: batch_tokens(group, lengths), reverse=True)
    return [[groups[slot * processes + rank] for slot in range(accumulation)] for rank in range(processes)]


@functools.cache
def balanced_sampler_class():
    """The batch sampler class (built on first use: it derives from the Trainer's rank-aware sampler,
    which the Trainer hands to the data loader as it is, without accelerate dealing its batches out)."""
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler, get_length_grouped_indices

    class BalancedLengthGroupedBatches(BatchRebalanceSampler):
        """This process's micro-batches: each optimizer step one window of the length-grouped order,
        cut by `step_groups`. Every process computes the same windows from the same seed and epoch."""

        def __init__(self, lengths: list[int], batch_size: int, processes: int, accumulation: int,
                     rank: int, seed: int):
            # The parent's constructor is not called: only its type matters to the Trainer.
            self.lengths, self.processes, self.accumulation = list(lengths), processes, accumulation
            self.rank, self.seed, self.epoch = rank, seed, 0
            self.window = batch_size * processes * accumulation
            if len(self.lengths) < processes * accumulation:
                raise ValueError(f"{len(self.lengths)} training examples cannot fill one micro-batch for each "
                                 f"of {processes} processes x {accumulation} accumulation steps")

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def windows(self) -> list[list[int]]:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = get_length_grouped_indices(self.lengths, self.window, generator=generator)
            windows = [order[start:start + self.window] for start in range(0, len(order), self.window)]
            short = self.processes * self.accumulation - len(windows[-1])
            if short > 0:  # a last window too small to give every group an example borrows from the first
                windows[-1] = windows[-1] + order[:short]
            return windows

        def __iter__(self):
            for window in self.windows():
                yield from step_groups(window, self.lengths, self.processes, self.accumulation)[self.rank]

        def __len__(self) -> int:
            return math.ceil(len(self.lengths) / self.window) * self.accumulation

    return BalancedLengthGroupedBatches


def set_epoch_of_balanced_batches(train_dataloader, epoch: int) -> None:
    """Tell the balanced batches of a prepared training loader which epoch's windows to cut (nothing
    for other batches). The Trainer's own call does not reach them in an epoch it resumes mid-way:
    then accelerate's batch skipping stands between the loader and them."""
    sampler = getattr(train_dataloader, "batch_sampler", None)
    while sampler is not None and not isinstance(sampler, balanced_sampler_class()):
        sampler = getattr(sampler, "batch_sampler", None)
    if sampler is not None:
        sampler.set_epoch(epoch)


@contextlib.contextmanager
def balanced_batches(trainer, pad_to: int | None):
    """While inside and with several processes, the Trainer cuts each optimizer step's examples into
    batches of equal padded size (`balanced_sampler_class`; with `pad_to`, every example counted at the
    length the collator pads it to), tells them the epoch at its start, a resumed one included, and
    keeps each LoRA weight's gradient in the buffer the processes sum (DistributedDataParallel's
    `gradient_as_bucket_view`: no copy of every gradient out of it after the sum, one launch per weight
    and step fewer). One process keeps the Trainer's own length-grouped batches: nothing is installed.
    On leaving, the Trainer is as it was."""
    if trainer.args.world_size == 1:
        yield
        return
    from qexpand.accel import checked_versions

    checked_versions.require("trainer_hooks")
    trainer.__dict__["_get_train_sampler"] = functools.partial(balanced_train_sampler, trainer, pad_to=pad_to)
    callback = epoch_for_balanced_batches()
    trainer.add_callback(callback)
    handler = trainer.accelerator.ddp_handler  # the settings accelerate wraps the model with
    shared_before = handler.gradient_as_bucket_view if handler is not None else None
    if handler is not None:
        handler.gradient_as_bucket_view = True
    try:
        yield
    finally:
        if handler is not None:
            handler.gradient_as_bucket_view = shared_before
        trainer.remove_callback(callback)
        del trainer.__dict__["_get_train_sampler"]


def balanced_train_sampler(trainer, train_dataset=None, pad_to: int | None = None):
    """What `balanced_batches` makes the Trainer's `_get_train_sampler` return: this process's
    balanced batches of the training set."""
    args = trainer.args
    dataset = trainer.train_dataset if train_dataset is None else train_dataset
    return balanced_sampler_class()(
        [length_padded_at_least(len(ids), pad_to) for ids in dataset["input_ids"]],
        args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps,
        args.process_index, args.data_seed if args.data_seed is not None else args.seed)


def epoch_for_balanced_batches():
    """A callback that gives several processes' balanced batches the epoch at its start, a resumed
    one included (`set_epoch_of_balanced_batches`)."""
    from transformers import TrainerCallback

    class EpochForBalancedBatches(TrainerCallback):
        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # state.epoch is the epochs done so far, a fraction into the current one when resumed mid-way.
            set_epoch_of_balanced_batches(train_dataloader, int(state.epoch))

    return EpochForBalancedBatches()
