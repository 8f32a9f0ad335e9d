"""Batched generation: the sampling filter matches the library's, and early-stopped batches
continue their unfinished rows to the same text."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from qexpand import generation, modeling
from tests.test_smollm2 import GGUF, smollm2_folder


def library_filter(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    tempered = TemperatureLogitsWarper(temperature)(None, scores.clone())
    return TopPLogitsWarper(top_p)(None, tempered)


@pytest.mark.parametrize("spread", [2.0, 6.0])
def test_tempered_nucleus_keeps_exactly_what_the_library_keeps(spread):
    scores = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * spread
    ours = generation.TemperedNucleus(0.7, 0.95, k=1000)(None, scores.clone())
    theirs = library_filter(scores, 0.7, 0.95)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])
    assert (torch.isfinite(ours).sum(dim=-1) > 1).all()  # a real nucleus, not just the top token


def test_a_nucleus_wider_than_k_is_cut_to_the_k_best():
    scores = torch.linspace(0, 0.1, 500).repeat(2, 1)  # nearly flat: the 0.95 nucleus is ~475 tokens
    kept = torch.isfinite(generation.TemperedNucleus(1.0, 0.95, k=16)(None, scores))
    assert kept.sum(dim=-1).tolist() == [16, 16] and kept[:, -16:].all()


def test_stragglers_continue_to_the_same_greedy_text(monkeypatch):
    tokenizer = modeling.load_tokenizer(str(smollm2_folder()), GGUF)
    modeling.choose_pad_token(tokenizer)
    model = modeling.load_base_model(str(smollm2_folder()), GGUF, "none", "cpu", "fp32")
    template = "<|im_start|>user\nWrite one short search question about: {query}<|im_end|>\n<|im_start|>assistant\n"
    queries = ["internet privacy", "hubble telescope", "obama family tree", "hoboken", "cheap internet",
               "compost pile", "french lick resort", "toilets"]
    passes = []
    library_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: passes.append(len(kw["input_ids"])) or library_generate(**kw))

    def texts(share: float) -> list[tuple]:
        monkeypatch.setattr(generation, "STRAGGLER_SHARE", share)
        passes.clear()
        out = generation.generate_descriptions(model, tokenizer, template, queries, batch_size=8,
                                               max_new_tokens=40, progress=False)
        return [(g[0].text, g[0].ended_at_eos, g[0].new_tokens) for g in out]

    whole_batch = texts(0.0)
    assert passes == [8]  # no early stop: one pass
    early_stopped = texts(0.5)
    assert len(passes) > 1 and passes[0] == 8 and passes[1] < 8  # the batch stopped; stragglers went on
    assert early_stopped == whole_batch
    assert all(ended for _, ended, _ in whole_batch)



def test_no_repeated_ngram_keeps_a_looping_model_from_looping(tiny_model, monkeypatch):
    """A random tiny model, decoded greedily, repeats itself; with no_repeat_ngram no n-gram of a row
    (prompt and new tokens) occurs twice. Checked on the token ids that generation produced."""
    tokenizer = modeling.load_tokenizer(str(tiny_model))
    modeling.choose_pad_token(tokenizer)
    model = modeling.load_base_model(str(tiny_model), None, "none", "cpu", "fp32")
    template, queries = "Query: {query}\nNeed:", ["internet privacy", "hubble telescope", "dam removal"]
    produced = []
    library_rows = generation._generate_rows

    def recording(model, tokenizer, prompts, copies, budget, sampling, stops):
        rows = library_rows(model, tokenizer, prompts, copies, budget, sampling, stops)
        produced.extend(prompt + row for prompt, row in zip(prompts, rows))
        return rows

    monkeypatch.setattr(generation, "_generate_rows", recording)

    def repeated_trigrams(no_repeat_ngram: int) -> list[int]:
        produced.clear()
        generation.generate_descriptions(model, tokenizer, template, queries, max_new_tokens=40, progress=False,
                                         no_repeat_ngram=no_repeat_ngram)
        assert len(produced) == len(queries)
        counts = []
        for ids in produced:
            ids = [i for i in ids if i != tokenizer.pad_token_id]
            grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
            counts.append(len(grams) - len(set(grams)))
        return counts

    assert sum(repeated_trigrams(0)) > 0  # the model loops when let
    assert repeated_trigrams(3) == [0, 0, 0]


def test_an_instruct_model_is_asked_for_a_passage_in_its_chat_template_and_stops_at_its_turn_s_end():
    from qexpand.prompt import passage_prompt_ids

    tokenizer = modeling.load_tokenizer(str(smollm2_folder()), GGUF)
    model = modeling.load_base_model(str(smollm2_folder()), GGUF, "none", "cpu", "fp32")
    prompt = tokenizer.decode(passage_prompt_ids(tokenizer, "galactosemia"))
    assert "<|im_start|>user\nWrite a short encyclopedia paragraph about: galactosemia<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation.passage_stops(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    passages = generation.generate_passages(model, tokenizer, ["galactosemia"], 2, max_new_tokens=200,
                                            progress=False)[0]
    assert len(passages) == 2 and all(p.text for p in passages)
    # The model ends its answer within the budget, on its own end of turn, which is not in the text.
    assert any(p.ended_at_eos and p.new_tokens < 200 for p in passages)
    assert all("<|im_end|>" not in p.text and "assistant" not in p.text for p in passages)
