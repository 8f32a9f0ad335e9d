"""Batches of several data-parallel processes: each step's window cut so that no process waits on a longer batch."""

from __future__ import annotations

import itertools
import random

import pytest

from qexpand.accel import batches
from qexpand.collation import collator_padding


def costliest(groups: list[list[int]]) -> int:
    return max(batches.padded_cost(len(group), max(group)) for group in groups)


def cuts(lengths: list[int], sizes: list[int]) -> list[list[int]]:
    starts = list(itertools.accumulate([0, *sizes]))
    return [lengths[start:end] for start, end in zip(starts, starts[1:])]


def test_padded_cost_rounds_the_longest_example_up_to_the_collator_s_multiple():
    assert batches.padded_cost(32, 57) == 32 * 64 and batches.padded_cost(3, 64) == 3 * 64
    assert batches.padded_cost(1, 1) == 8
    assert batches.batch_tokens([2, 0], [57, 3, 10]) == 2 * 64  # two examples, the longest 57 tokens


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_the_cut_leaves_the_costliest_group_as_cheap_as_any_contiguous_cut_can(groups):
    rng = random.Random(groups)
    for _ in range(60):
        lengths = sorted((rng.randint(20, 200) for _ in range(rng.randint(groups, 14))), reverse=True)
        sizes = batches.group_sizes(lengths, groups)
        assert len(sizes) == groups and min(sizes) >= 1 and sum(sizes) == len(lengths)
        best = min(costliest(cuts(lengths, list(split)))
                   for split in itertools.product(range(1, len(lengths) + 1), repeat=groups)
                   if sum(split) == len(lengths))
        assert costliest(cuts(lengths, sizes)) == best


def test_longer_examples_go_in_smaller_groups():
    lengths = [200] * 4 + [40] * 60  # sorted, longest first
    assert batches.group_sizes(lengths, 2) == [10, 54]  # 10 x 200 = 2,000 tokens, 54 x 40 = 2,160 (32/32: 6,400)
    assert batches.group_sizes([64] * 64, 2) == [32, 32]  # equal lengths: equal halves
    with pytest.raises(ValueError, match="3 examples into 4"):
        batches.group_sizes([50, 40, 30], 4)


def test_a_step_s_groups_are_dealt_costliest_first_to_each_process_s_first_micro_batch():
    rng = random.Random(7)
    lengths = [rng.randint(20, 200) for _ in range(200)]
    window = list(range(3, 3 + 64))
    per_process = batches.step_groups(window, lengths, processes=2, accumulation=2)
    assert len(per_process) == 2 and all(len(micro) == 2 for micro in per_process)
    assert sorted(i for micro in per_process for group in micro for i in group) == window

    first, second = ([batches.batch_tokens(micro[slot], lengths) for micro in per_process] for slot in (0, 1))
    assert min(first) >= max(second)


def sampler(lengths, processes, rank, batch_size=4, accumulation=1, seed=3):
    return batches.balanced_sampler_class()(lengths, batch_size, processes, accumulation, rank, seed)


def slowest_per_step(lengths, per_rank_batches):
    return [max(batches.batch_tokens(b, lengths) for b in step) for step in zip(*per_rank_batches)]


def test_every_process_gets_its_share_of_each_window_and_each_example_comes_once_an_epoch():
    rng = random.Random(1)
    lengths = [rng.randint(20, 200) for _ in range(40)]  # 5 windows of 2 x 4
    ranks = [sampler(lengths, 2, rank) for rank in range(2)]
    for epoch in (0, 1):
        for each in ranks:
            each.set_epoch(epoch)
        per_rank = [list(each) for each in ranks]
        assert [len(b) for b in per_rank] == [len(ranks[0])] * 2 == [5, 5]
        windows = ranks[0].windows()
        for step, window in enumerate(windows):  # the same windows on both ranks, split between them
            assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(window)
        assert sorted(i for b in per_rank[0] + per_rank[1] for i in b) == list(range(40))
    assert ranks[0].windows() != (sampler(lengths, 2, 0).windows())  # epoch 1 is shuffled anew
    assert sampler(lengths, 2, 1).windows() == sampler(lengths, 2, 0).windows()  # same seed, same order


def test_a_last_window_too_small_for_every_group_borrows_from_the_first():
    lengths = list(range(30, 30 + 17))  # two windows of 8 and one of 1, for 2 processes x batch 4
    per_rank = [list(sampler(lengths, 2, rank)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(sampler(lengths, 2, 0)) == 3
    assert all(per_rank[0][-1]) and all(per_rank[1][-1])  # nobody idles
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        sampler([30], 2, 0)


def test_the_slowest_process_s_batch_is_shorter_than_when_accelerate_deals_the_length_grouped_batches():
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rng = random.Random(5)
    lengths = [int(rng.lognormvariate(4.2, 0.35)) for _ in range(280)]  # ~70 tokens, as the TREC examples
    balanced = slowest_per_step(lengths, [list(sampler(lengths, 2, rank, batch_size=32)) for rank in range(2)])
    order = get_length_grouped_indices(lengths, 32, generator=torch.Generator().manual_seed(3))
    dealt = [order[start:start + 32] for start in range(0, len(order), 32)]
    dealt = slowest_per_step(lengths, [dealt[0::2], dealt[1::2]])
    assert len(balanced) == 5 and sum(balanced) / len(balanced) < 0.9 * sum(dealt) / len(dealt)


def test_the_epoch_reaches_the_batches_through_accelerate_s_sharding_and_skipping_wrappers():
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    ours = sampler(list(range(30, 70)), 2, 0)
    # Several processes, resumed mid-epoch: loader -> skipping -> sharding (made a pass-through) -> ours.
    # Neither wrapper has set_epoch, so the Trainer's own call stops short of the batches.
    shard = BatchSamplerShard(ours, num_processes=1, process_index=0)
    loader = SimpleNamespace(batch_sampler=SkipBatchSampler(shard, skip_batches=2))
    assert not hasattr(loader.batch_sampler, "set_epoch") and not hasattr(shard, "set_epoch")
    batches.set_epoch_of_balanced_batches(loader, 3)
    assert ours.epoch == 3
    batches.set_epoch_of_balanced_batches(SimpleNamespace(batch_sampler=[[0, 1]]), 3)  # other batches: nothing


@pytest.mark.parametrize("pad_to", [None, 40])
def test_the_cut_counts_each_batch_as_the_training_collator_pads_it(own_mistral_tokenizer, pad_to):
    from transformers import DataCollatorForSeq2Seq

    own_mistral_tokenizer.padding_side = "right"  # as training.py sets it (a copy: see conftest)
    lengths = [3, 11, 29]
    features = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    collated = DataCollatorForSeq2Seq(own_mistral_tokenizer, **collator_padding(pad_to))(features)
    counted = [batches.length_padded_at_least(n, pad_to) for n in lengths]
    # 3 rows of 32 (29 rounded up to a multiple of 8), or of 40 with every example padded to 40.
    assert collated["input_ids"].numel() == batches.batch_tokens([0, 1, 2], counted) == 3 * (pad_to or 32)
