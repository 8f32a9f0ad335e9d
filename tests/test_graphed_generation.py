"""Greedy decoding through GraphedGreedy gives token for token what the library's greedy search gives:
on the CPU through its eager step, on a CUDA GPU through its step captured and replayed as a CUDA graph
(skipped, saying so, where there is no GPU)."""

from __future__ import annotations

import contextlib

import pytest

from qexpand import generation, modeling
from qexpand.accel import graphed_decoding
from qexpand.accel.graphed_decoding import GraphedGreedy, graphed_greedy_decoding
from qexpand.prompt import PROMPT_TEMPLATE, prompt_ids

QUERIES = ["internet privacy", "hubble telescope", "obama family tree", "hoboken",
           "how to build a compost pile in a small city garden", "toilets", "french lick resort and casino",
           "cheap internet", "solar panels on flat roofs"]
BATCHES = 3  # the 9 queries in batches of 4

NO_GPU = ("no CUDA GPU on this machine: the CUDA-graph capture of the greedy decoding step "
          "(GraphedGreedy._capture in qexpand/accel/graphed_decoding.py) and its replay are untested here; "
          "only the eager step ran (the cpu cases)")


def expansions(model, tokenizer, graphed: bool, new_tokens: int = 14) -> list[tuple]:
    with graphed_greedy_decoding() if graphed else contextlib.nullcontext(None) as decoder:
        out = generation.generate_descriptions(model, tokenizer, PROMPT_TEMPLATE, QUERIES, batch_size=4,
                                               max_new_tokens=new_tokens, progress=False, greedy_decoder=decoder)
    return [(g[0].text, g[0].ended_at_eos, g[0].new_tokens) for g in out]


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def tiny(request, tiny_model):
    """The tiny model in float32 on the CPU, and on a CUDA GPU where there is one."""
    import torch

    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    tokenizer = modeling.load_tokenizer(str(tiny_model))
    model = modeling.load_base_model(str(tiny_model), None, "none", device, "fp32")
    assert model.device.type == device
    return model.eval(), tokenizer


@pytest.fixture()
def decoders(monkeypatch) -> list[GraphedGreedy]:
    """Every GraphedGreedy that graphed_greedy_decoding's decoder makes, to see how it decoded."""
    made = []

    class Recorded(GraphedGreedy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(graphed_decoding, "GraphedGreedy", Recorded)
    return made


def assert_decoded_as_the_device_does(decoders, model):
    """Every batch went through GraphedGreedy: on CUDA with its step captured as a graph (a capture that
    failed falls back to eager steps with only a logged warning), on the CPU eagerly."""
    on_gpu = model.device.type == "cuda"
    assert len(decoders) == BATCHES
    assert [d.graphed for d in decoders] == [on_gpu] * BATCHES


def test_graphed_greedy_matches_the_library_on_a_float32_model(tiny, decoders):
    model, tokenizer = tiny
    library = expansions(model, tokenizer, graphed=False)
    assert decoders == []  # the library's generate decoded those
    assert expansions(model, tokenizer, graphed=True) == library
    assert_decoded_as_the_device_does(decoders, model)
    assert len({text for text, _, _ in library}) > 1  # the prompts lead to different texts


@pytest.mark.parametrize("position", [3, 6])
def test_rows_that_end_early_match_too(tiny, decoders, position):
    """A token the random model emits plays EOS, so rows end at different steps (the random model's
    texts share their first few tokens, so with position 3 whole batches end before the budget)."""
    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer, PROMPT_TEMPLATE, QUERIES[0])
    ids = GraphedGreedy(model, [prompt], tokenizer.pad_token_id, tokenizer.eos_token_id, 30).run()[0]
    original = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[position])
    try:
        library = expansions(model, tokenizer, graphed=False, new_tokens=30)
        decoders.clear()  # the probe above
        assert expansions(model, tokenizer, graphed=True, new_tokens=30) == library
    finally:
        tokenizer.eos_token = original
    assert_decoded_as_the_device_does(decoders, model)
    assert any(ended for _, ended, _ in library)


def test_on_the_cpu_the_form_is_the_trained_or_the_asked_for_one():
    form = generation.choose_generation_form("cpu", "auto", "none", "unused", None)
    assert (form.quantization, form.merged) == ("none", True)
    assert generation.choose_generation_form("cpu", "nf4", "none", "unused", None).quantization == "nf4"
