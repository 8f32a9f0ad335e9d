"""The prompt template and the tokenisation of training examples.

The prompt and the target are tokenised apart and then joined, so the boundary is exact: every
prompt token gets the label IGNORE_INDEX (no loss), the description tokens and one final EOS keep
their ids as labels. Training on that EOS is what teaches the model to stop.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips

PROMPT_TEMPLATE = (
    "Below is a short search query. Write the longer, more detailed information need that a "
    "person typing it could have, as one or two sentences.\n\n"
    "### Query:\n{query}\n\n### Information need:\n"
)


# Passages about a query, written by the base model (generative relevance feedback): an instruct model is asked
# in its chat template, a base model continues the start of an article.
PASSAGE_REQUEST = "Write a short encyclopedia paragraph about: {query}"
PASSAGE_PROMPT = "Encyclopedia article: {query}\n\n"


def format_prompt(template: str, query: str) -> str:
    return template.format(query=query)


def prompt_ids(tokenizer, template: str, query: str) -> list[int]:
    """Token ids of the prompt, BOS included when the tokenizer adds one."""
    return tokenizer(format_prompt(template, query), add_special_tokens=True)["input_ids"]


def passage_prompt_ids(tokenizer, query: str) -> list[int]:
    """Token ids of the prompt asking for a passage about the query: in the tokenizer's chat template where
    it has one, else a plain article start (BOS included when the tokenizer adds one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PASSAGE_REQUEST.format(query=query)}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(PASSAGE_PROMPT.format(query=query), add_special_tokens=True)["input_ids"]


def truncate_query(tokenizer, query: str, max_query_tokens: int) -> tuple[str, bool]:
    """Cut a query to at most `max_query_tokens` tokens; says whether it was cut."""
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_query_tokens:
        return query, False
    return tokenizer.decode(ids[:max_query_tokens], skip_special_tokens=True).strip(), True


def tokenize_example(tokenizer, template: str, query: str, description: str, max_length: int) -> dict:
    """input_ids, attention_mask and labels for one (query, description) pair."""
    prompt = prompt_ids(tokenizer, template, query)
    target = tokenizer(description, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Truncate the target, never the prompt, but always keep the final EOS.
    room = max(max_length - len(prompt), 1)
    if len(target) > room:
        target = target[: room - 1] + [tokenizer.eos_token_id]
    input_ids = prompt + target
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + target,
    }
