"""Greedy decoding through GraphedGreedy gives token for token what the library's greedy search gives."""

from __future__ import annotations

import contextlib

import pytest

from qexpand import generation, modeling
from qexpand.accel.graphed_decoding import GraphedGreedy, graphed_greedy_decoding
from qexpand.prompt import PROMPT_TEMPLATE, prompt_ids

QUERIES = ["internet privacy", "hubble telescope", "obama family tree", "hoboken",
           "how to build a compost pile in a small city garden", "toilets", "french lick resort and casino",
           "cheap internet", "solar panels on flat roofs"]


def expansions(model, tokenizer, graphed: bool, new_tokens: int = 14) -> list[tuple]:
    with graphed_greedy_decoding() if graphed else contextlib.nullcontext(None) as decoder:
        out = generation.generate_descriptions(model, tokenizer, PROMPT_TEMPLATE, QUERIES, batch_size=4,
                                               max_new_tokens=new_tokens, progress=False, greedy_decoder=decoder)
    return [(g[0].text, g[0].ended_at_eos, g[0].new_tokens) for g in out]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    tokenizer = modeling.load_tokenizer(str(tiny_model))
    model = modeling.load_base_model(str(tiny_model), None, "none", "cpu", "fp32")
    return model.eval(), tokenizer


def test_graphed_greedy_matches_the_library_on_a_float32_model(tiny):
    model, tokenizer = tiny
    library = expansions(model, tokenizer, graphed=False)
    assert expansions(model, tokenizer, graphed=True) == library
    assert len({text for text, _, _ in library}) > 1  # the prompts lead to different texts


@pytest.mark.parametrize("position", [3, 6])
def test_rows_that_end_early_match_too(tiny, position):
    """A token the random model emits plays EOS, so rows end at different steps (the random model's
    texts share their first few tokens, so with position 3 whole batches end before the budget)."""
    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer, PROMPT_TEMPLATE, QUERIES[0])
    ids = GraphedGreedy(model, [prompt], tokenizer.pad_token_id, tokenizer.eos_token_id, 30).run()[0]
    original = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[position])
    try:
        library = expansions(model, tokenizer, graphed=False, new_tokens=30)
        assert expansions(model, tokenizer, graphed=True, new_tokens=30) == library
    finally:
        tokenizer.eos_token = original
    assert any(ended for _, ended, _ in library)


def test_on_the_cpu_the_form_is_the_trained_or_the_asked_for_one():
    form = generation.choose_generation_form("cpu", "auto", "none", "unused", None)
    assert (form.quantization, form.merged) == ("none", True)
    assert generation.choose_generation_form("cpu", "nf4", "none", "unused", None).quantization == "nf4"
