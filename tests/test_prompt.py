"""Label masking checked on exact token ids of the real Mistral-7B tokenizer."""

from transformers import DataCollatorForSeq2Seq

from qexpand.generation import _decode_row
from qexpand.prompt import (IGNORE_INDEX, PASSAGE_PROMPT, PROMPT_TEMPLATE, format_prompt, passage_prompt_ids,
                            tokenize_example, truncate_query)

QUERY = "internet privacy"
DESCRIPTION = "What are effective methods for ensuring online privacy?"


def test_tokenizer_is_the_real_mistral_one(mistral_tokenizer):
    assert mistral_tokenizer("internet privacy", add_special_tokens=False)["input_ids"] == [7865, 12917]
    assert (mistral_tokenizer.bos_token_id, mistral_tokenizer.eos_token_id) == (1, 2)
    # pad is <unk> (0), never EOS, so a padded batch cannot be mistaken for stopped text.
    assert mistral_tokenizer.pad_token_id == 0


def test_a_test_that_changed_the_session_tokenizer_would_be_caught(mistral_tokenizer, own_mistral_tokenizer):
    """conftest's check after each test compares the session tokenizer's state with its state as built:
    a change to an attribute or to the backend shows, a call (which sets truncation and padding on the
    backend for itself) does not, and the copy a test may change is not the session's."""
    from tests.conftest import tokenizer_state

    built = tokenizer_state(mistral_tokenizer)
    assert own_mistral_tokenizer is not mistral_tokenizer and tokenizer_state(own_mistral_tokenizer) == built
    mistral_tokenizer(["internet privacy", "jazz"], truncation=True, max_length=2, padding=True)
    assert tokenizer_state(mistral_tokenizer) == built
    own_mistral_tokenizer.padding_side = "right"
    changed = tokenizer_state(own_mistral_tokenizer)
    assert changed != built and changed["attributes"]["padding_side"] == "'right'"
    own_mistral_tokenizer.add_tokens(["<query>"])
    assert tokenizer_state(own_mistral_tokenizer)["backend"] != built["backend"]
    assert tokenizer_state(mistral_tokenizer) == built and mistral_tokenizer.padding_side == "left"


def test_labels_mask_the_prompt_and_keep_description_and_eos(mistral_tokenizer):
    example = tokenize_example(mistral_tokenizer, PROMPT_TEMPLATE, QUERY, DESCRIPTION, max_length=256)
    prompt = mistral_tokenizer(format_prompt(PROMPT_TEMPLATE, QUERY))["input_ids"]
    target = [1824, 460, 5645, 5562, 354, 20083, 3270, 12917, 28804]  # "What are ... privacy?"
    assert mistral_tokenizer(DESCRIPTION, add_special_tokens=False)["input_ids"] == target
    assert prompt[0] == 1  # BOS
    assert example["input_ids"] == prompt + target + [2]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + target + [2]
    assert example["attention_mask"] == [1] * (len(prompt) + len(target) + 1)


def test_truncated_target_still_ends_with_eos(mistral_tokenizer):
    prompt_len = len(mistral_tokenizer(format_prompt(PROMPT_TEMPLATE, QUERY))["input_ids"])
    example = tokenize_example(mistral_tokenizer, PROMPT_TEMPLATE, QUERY, DESCRIPTION * 5, max_length=prompt_len + 4)
    assert len(example["input_ids"]) == prompt_len + 4
    assert example["labels"][-1] == 2 and example["labels"][-4:-1] == [1824, 460, 5645]


def test_collator_pads_labels_with_ignore_index(own_mistral_tokenizer):
    short = tokenize_example(own_mistral_tokenizer, PROMPT_TEMPLATE, "jazz", "Jazz history?", 256)
    long = tokenize_example(own_mistral_tokenizer, PROMPT_TEMPLATE, QUERY, DESCRIPTION, 256)
    own_mistral_tokenizer.padding_side = "right"  # as training.py sets it (a copy: see conftest)
    collator = DataCollatorForSeq2Seq(own_mistral_tokenizer, padding=True, pad_to_multiple_of=8)
    batch = collator([short, long])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["input_ids"])
    pad = width - len(short["input_ids"])
    assert batch["input_ids"][0, -pad:].tolist() == [0] * pad  # right padding with <unk>
    assert batch["attention_mask"][0, -pad:].tolist() == [0] * pad
    assert batch["labels"][0].tolist() == short["labels"] + [IGNORE_INDEX] * pad
    # Every EOS a label holds is a real end of a description, never padding.
    assert (batch["labels"] == 2).sum().item() == 2


def test_generation_is_cut_at_the_first_eos(mistral_tokenizer):
    done = _decode_row(mistral_tokenizer, [1824, 460, 2, 0, 0])
    assert (done.text, done.ended_at_eos, done.new_tokens) == ("What are", True, 3)
    cut = _decode_row(mistral_tokenizer, [1824, 460, 5645])
    assert (cut.text, cut.ended_at_eos) == ("What are effective", False)


def test_a_passage_ends_at_the_first_of_its_stop_tokens(mistral_tokenizer):
    # An instruct model ends its turn with a token of its own, not the tokenizer's EOS.
    done = _decode_row(mistral_tokenizer, [1824, 460, 5645, 460, 2], stops=[2, 5645])
    assert (done.text, done.ended_at_eos, done.new_tokens) == ("What are", True, 3)
    assert _decode_row(mistral_tokenizer, [1824, 460, 2], stops=[5645]).ended_at_eos is False


def test_a_base_model_is_asked_for_a_passage_as_the_start_of_an_article(mistral_tokenizer):
    # The Mistral-7B-v0.1 tokenizer has no chat template: the plain article start, after BOS.
    ids = passage_prompt_ids(mistral_tokenizer, QUERY)
    assert ids == mistral_tokenizer(PASSAGE_PROMPT.format(query=QUERY))["input_ids"] and ids[0] == 1
    assert mistral_tokenizer.decode(ids, skip_special_tokens=True) == "Encyclopedia article: internet privacy\n\n"


def test_long_queries_are_truncated_and_non_ascii_kept(mistral_tokenizer):
    query, cut = truncate_query(mistral_tokenizer, "word " * 200, 16)
    assert cut and len(mistral_tokenizer(query, add_special_tokens=False)["input_ids"]) <= 16
    assert truncate_query(mistral_tokenizer, "café Zürich 東京", 64) == ("café Zürich 東京", False)
