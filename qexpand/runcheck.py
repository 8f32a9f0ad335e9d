"""Reading a run directory back, checked: every file the test script (or --resume) relies on is
validated before any model is loaded, and a damaged one is named in a one-paragraph error.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from qexpand import data, options, runfiles
from qexpand.config import TrainConfig
from qexpand.errors import UserError

ADAPTER_WEIGHTS_FILE = runfiles.ADAPTER_WEIGHTS_FILE
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class RunRecord:
    """What run_config.json holds: the settled TrainConfig and what was measured when the run began."""

    config: TrainConfig
    base_model_signature: dict
    tokenizer_check: dict  # {"texts": [...], "ids": [[...], ...]}: the ids training used for those texts
    processes: int
    versions: dict
    created_at: str


def damaged(run_dir: Path, name: str, problem: str) -> UserError:
    return UserError(f"the run directory {run_dir} is damaged: {name} {problem}. Train the run again, or "
                     "restore the file from a copy.")


# Training settings added after run directories had been written without them, with the value that
# says how such a run trained (no compiled blocks, peft's LoRA layers, no --stock, and it learnt the description).
ADDED_SETTINGS = {"compile": "off", "lora_kernels": "peft", "stock": False, "target": "description"}


def read_record(run_dir: Path) -> RunRecord:
    raw = runfiles.read_run_file(run_dir, runfiles.CONFIG_FILE)
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        raw = {**raw, "config": {**ADDED_SETTINGS, **raw["config"]}}
    try:
        record = options.from_json(RunRecord, raw)
    except (ValueError, TypeError) as error:
        raise damaged(run_dir, runfiles.CONFIG_FILE, f"does not hold a run's settings ({error})") from None
    return record


def write_record(run_dir: Path, record: RunRecord) -> None:
    runfiles.atomic_write_json(Path(run_dir) / runfiles.CONFIG_FILE, asdict(record))


def read_split(run_dir: Path) -> dict[str, list[data.Topic]]:
    raw = runfiles.read_run_file(run_dir, runfiles.SPLIT_FILE)
    try:
        return data.split_from_json(raw)
    except (KeyError, TypeError, AttributeError) as error:
        raise damaged(run_dir, runfiles.SPLIT_FILE, f"is not a train/eval/test split ({error!r})") from None


def split_part_topics(run_dir: Path, split: dict[str, list[data.Topic]], part: str) -> list[data.Topic]:
    """The topics of one part of a run's split, refused when there are none: a run trained with a
    --split-file whose test list was empty has nothing to expand or score there."""
    if not split[part]:
        raise UserError(
            f"the run {run_dir} has no {part} topics ({runfiles.SPLIT_FILE} lists none), so there is nothing of "
            f"its own to expand and score. Give the queries to expand with --query, --topics or "
            f"--test-datasets, or train a run whose split has {part} topics (e.g. --split 30 5 5)."
        )
    return split[part]


def non_finite_summary(weights_file: Path) -> str | None:
    """'K of N tensors (the first: NAME)' where a safetensors file holds NaN or infinite weights, else None."""
    import torch
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as weights:
        names = list(weights.keys())
        broken = [n for n in names if not torch.isfinite(weights.get_tensor(n)).all()]
    return f"{len(broken)} of {len(names)} tensors (the first: {broken[0]})" if broken else None


def refuse_diverged_adapter(weights_file: Path, run_dir: Path) -> None:
    """Stop a run whose trained adapter holds NaN or infinity before it is marked finished: every
    generation with such an adapter is empty."""
    summary = non_finite_summary(weights_file)
    if summary:
        raise UserError(
            f"training diverged: the trained adapter holds NaN or infinite weights in {summary}, and every "
            f"generation with it would be empty. The run directory {run_dir} is left unfinished, so the test "
            "script will not use it. Train a new run with a lower --learning-rate."
        )


def check_adapter(run_dir: Path, record: RunRecord) -> None:
    """The adapter config's keys and types, the weights file's header and tensor shapes against it, and
    that every weight is finite."""
    from safetensors import SafetensorError, safe_open

    config = runfiles.read_run_file(run_dir, runfiles.ADAPTER_CONFIG_FILE)
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or config.get("peft_type") != "LORA":
        raise damaged(run_dir, runfiles.ADAPTER_CONFIG_FILE, "is not a LoRA adapter config (no integer 'r' or "
                      "peft_type LORA)")
    path = Path(run_dir) / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as weights:
            shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    except (OSError, SafetensorError) as error:
        raise damaged(run_dir, ADAPTER_WEIGHTS_FILE, f"cannot be read ({error})") from None
    rank = config["r"]
    wrong = [n for n, s in shapes.items() if len(s) != 2 or ("lora_A" in n and s[0] != rank)
             or ("lora_B" in n and s[1] != rank)]
    if not shapes or wrong:
        raise damaged(run_dir, ADAPTER_WEIGHTS_FILE, f"does not match adapter_config.json (rank {rank}): "
                      + (f"{wrong[0]} has shape {shapes[wrong[0]]}" if wrong else "it holds no tensors"))
    layers = {int(m.group(1)) for n in shapes if (m := LAYER_INDEX.search(n))}
    expected = record.base_model_signature.get("num_hidden_layers")
    if expected and layers and max(layers) + 1 != expected:
        raise damaged(run_dir, ADAPTER_WEIGHTS_FILE, f"has LoRA weights for {max(layers) + 1} layers, but the "
                      f"base model has {expected}")
    summary = non_finite_summary(path)
    if summary:
        raise UserError(
            f"the adapter {path} holds NaN or infinite weights in {summary}: the training that wrote it "
            "diverged, and every generation with it would be empty. Train a new run with a lower "
            f"--learning-rate than this run's {record.config.learning_rate:g}."
        )


def check_tokenizer_files(run_dir: Path) -> None:
    names = {p.name for p in Path(run_dir).iterdir()}
    if TOKENIZER_CONFIG_FILE not in names or not names & set(TOKENIZER_VOCAB_FILES):
        raise damaged(run_dir, "the tokenizer", f"is missing ({TOKENIZER_CONFIG_FILE} and one of "
                      f"{' / '.join(TOKENIZER_VOCAB_FILES)} are needed)")


def check_finished_run(run_dir: Path) -> tuple[RunRecord, dict[str, list[data.Topic]]]:
    """Validate every file a finished run must have; its record and its split (read once, here)."""
    record = read_record(run_dir)
    finished = runfiles.read_run_file(run_dir, runfiles.FINISHED_FILE)
    if not isinstance(finished, dict) or not isinstance(finished.get("finished_at"), str):
        raise damaged(run_dir, runfiles.FINISHED_FILE, "has no 'finished_at' time")
    split = read_split(run_dir)
    check_tokenizer_files(run_dir)
    check_adapter(run_dir, record)
    return record, split


def tokenizer_check(tokenizer, texts: list[str]) -> dict:
    return {"texts": list(texts), "ids": [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]}


def verify_tokenizer(tokenizer, check: dict, where: str) -> None:
    """Refuse a tokenizer that does not give exactly the ids that training used for the check texts."""
    for text, wanted in zip(check["texts"], check["ids"]):
        found = tokenizer(text, add_special_tokens=True)["input_ids"]
        if found != wanted:
            first = next((i for i, (a, b) in enumerate(zip(found, wanted)) if a != b), min(len(found), len(wanted)))
            raise UserError(
                f"the tokenizer {where} does not give the token ids that training used: for {text[:60]!r} it "
                f"gives {len(found)} tokens where training had {len(wanted)} (first difference at token "
                f"{first}: {found[first:first + 3]} vs {wanted[first:first + 3]}). The model would see other "
                "inputs than it was trained on. If the base model came from a GGUF file, its tokenizer may "
                "not convert faithfully: use the model's own tokenizer files (a safetensors folder)."
            )
