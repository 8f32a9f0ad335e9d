"""The two scripts' settings: one dataclass each, parsed once from the command line and validated once.

`TrainConfig` is also what `run_config.json` holds (written out after every choice is settled), so
the test script and `--resume` read a run's settings back into the same dataclass. Options whose
default depends on the recipe or the device are None (or 'auto') until `qexpand.recipes.settle_*`
decides them; None therefore also means "not given" when a resumed run checks for conflicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexpand.errors import fail_if_problems
from qexpand.options import flag_name, option

MODEL, DATA, TRAINING, RUN = "model", "data", "training recipe (defaults from --recipe)", "run directory"
DEVICE_CHOICES = ("auto", "cuda", "cpu")
QUANTIZATION_CHOICES = ("auto", "nf4", "none")
PRECISION_CHOICES = ("auto", "bf16", "fp32")
GENERATION_FORMS = ("auto", "merged", "nf4")
OPTIMIZER_CHOICES = ("adamw", "paged_adamw_8bit")
LORA_TARGET_CHOICES = ("all-linear", "all-linear+lm_head")
SELECT_CHOICES = ("mbr", "anchored", "join")
# Settings of a run that are about where it is written, not what is trained.
INVOCATION_FIELDS = ("output_dir", "run_name", "overwrite", "resume")


@dataclass
class TrainConfig:
    model: str | None = option(None, "base model: hub id, local folder, or a small offline base by name: "
                               "smollm2-135m, gemma3-270m (default: mistralai/Mistral-7B-v0.1)", MODEL)
    gguf_file: str | None = option(None, "GGUF file inside --model to load instead of safetensors", MODEL)
    quantization: str = option("auto", "nf4 = 4-bit NF4 + double quantization + bf16 compute; auto = nf4 on "
                               "CUDA, none on the CPU", MODEL, choices=QUANTIZATION_CHOICES)
    device: str = option("auto", "where to train; auto = CUDA when PyTorch sees a GPU", MODEL,
                         choices=DEVICE_CHOICES)
    precision: str = option("auto", "bf16: base weights in bfloat16 and bf16 autocast (LoRA weights stay "
                            "float32); fp32: float32 throughout (NF4 still computes in bf16); auto = bf16 on "
                            "CUDA, fp32 on the CPU (bf16 pays off on CPUs with AVX512-BF16 or AMX)", MODEL,
                            choices=PRECISION_CHOICES)
    datasets: list[str] | None = option(None, "ir_datasets topic sets with title/query and description fields "
                                        "(default: the three of the README)", DATA, metavar="ID")
    split: list[int] | None = option(None, "number of topics in each split (default: 280 35 35)", DATA,
                                     nargs=3, metavar=("TRAIN", "EVAL", "TEST"))
    split_file: str | None = option(None, "use the train/eval/test topics of this split.json (from a run or a "
                                    "benchmark) instead of loading --datasets and splitting", DATA)
    seed: int | None = option(None, "seed of the split and of training (default: 42)", DATA)
    prompt_template: str | None = option(None, "prompt with a {query} placeholder; the description follows it "
                                         "(default: the one in qexpand/prompt.py)", DATA)
    target: str | None = option(None, "what the model learns to write: the topic's description, or the "
                                "description followed by the narrative's sentences on what a relevant document "
                                "holds (the judges' stock phrasing and what is not wanted left out)", DATA,
                                choices=("description", "description+narrative"))
    max_length: int | None = option(None, "longest prompt + description, in tokens", DATA)
    recipe: str | None = option(None, "named preset for every option below: default (this project's), "
                                "retrieval (the default trained for query expansion in a search engine) or "
                                "original (the original work's hyper-parameters); see the README", TRAINING,
                                choices=("default", "retrieval", "original"))
    epochs: float | None = option(None, "passes over the training topics", TRAINING)
    max_steps: int | None = option(None, "stop after this many optimizer steps (0 = no cap; the original "
                                   "recipe caps at 100)", TRAINING)
    learning_rate: float | None = option(None, "peak AdamW learning rate", TRAINING)
    batch_size: int | None = option(None, "examples per device per step (default recipe: 32 on CUDA, 16 on "
                                    "the CPU)", TRAINING)
    grad_accum: int | None = option(None, "gradient accumulation steps", TRAINING)
    warmup_ratio: float | None = option(None, "share of steps with linear warm-up", TRAINING)
    weight_decay: float | None = option(None, "AdamW weight decay", TRAINING)
    optimizer: str | None = option(None, "adamw (fused on CUDA) or paged_adamw_8bit (bitsandbytes, CUDA only)",
                                   TRAINING, choices=OPTIMIZER_CHOICES)
    lora_r: int | None = option(None, "LoRA rank", TRAINING)
    lora_alpha: int | None = option(None, "LoRA scaling alpha", TRAINING)
    lora_dropout: float | None = option(None, "dropout on the LoRA input", TRAINING)
    lora_targets: str | None = option(None, "layers that get LoRA adapters: every linear layer of the "
                                      "transformer blocks, optionally also the output head", TRAINING,
                                      choices=LORA_TARGET_CHOICES)
    neftune_alpha: float | None = option(None, "NEFTune: scale of the uniform noise added to the input "
                                         "embeddings while training (0 = off)", TRAINING)
    pad_to: int | None = option(None, "pad every example to this many tokens (0 = pad each batch to its own "
                                "longest example)", TRAINING)
    gradient_checkpointing: str = option("auto", "recompute activations to save memory; auto = on with CUDA, "
                                         "off on the CPU", TRAINING, choices=("auto", "on", "off"))
    compile: str = option("auto", "torch.compile each transformer block: fused kernels and far fewer launches "
                          "per step, after a one-time compilation at the start; auto = on with CUDA when each "
                          "process trains on enough examples to repay the compilation and the LoRA layers are "
                          "peft's (see the README)",
                          TRAINING, choices=("auto", "on", "off"))
    lora_kernels: str = option("auto", "how a LoRA layer on a 4-bit base computes while training: peft's "
                               "modules, or fused = one autograd function per layer (one for the layers that read "
                               "the same input, which then share a dropout mask), torch's own RMSNorm and one "
                               "function for the rotary embedding (fewer launches; see the README); auto = fused "
                               "on the 4-bit base in the default recipe, peft with --compile on or --stock "
                               "(which also leaves out the other speed-ups)",
                               TRAINING, choices=("auto", "peft", "fused"))
    stock: bool = option(False, "train on the stock path: peft's LoRA layers, the library's RMSNorm and rotary "
                         "embedding, the stock Trainer with its own loss (logits at every position) and "
                         "batches: none of the speed-ups of qexpand.accel (implies --lora-kernels peft; the "
                         "way back if a speed-up refuses a library version or is in doubt)", TRAINING)
    save_every: int | None = option(None, "save a resumable checkpoint and compute the eval loss every N "
                                    "optimizer steps (0 = once per epoch)", TRAINING)
    logging_steps: int | None = option(None, "log the training loss every N steps", TRAINING)
    output_dir: str = option("checkpoints", "folder holding the run directories", RUN)
    run_name: str | None = option(None, "name of the run directory (default: model + time)", RUN)
    overwrite: bool = option(False, "replace an existing run directory of that name", RUN)
    resume: str | None = option(None, "continue an interrupted run (its name or path; alone: the newest "
                                "unfinished run) with its recorded settings", RUN, nargs="?", const="",
                                metavar="RUN")


POSITIVE_TRAIN = ("epochs", "learning_rate", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length",
                  "logging_steps")
UNIT_INTERVAL_TRAIN = ("lora_dropout", "warmup_ratio")
NON_NEGATIVE_TRAIN = ("max_steps", "pad_to", "save_every", "weight_decay", "neftune_alpha")


def numeric_problems(config, positive=(), unit_interval=(), non_negative=()) -> list[str]:
    """Range problems of the numeric options that were given."""
    problems = []
    for names, ok, rule in ((positive, lambda v: v > 0, "must be positive"),
                            (unit_interval, lambda v: 0 <= v < 1, "must be in [0, 1)"),
                            (non_negative, lambda v: v >= 0, "must be >= 0")):
        for name in names:
            value = getattr(config, name)
            if value is not None and not ok(value):
                problems.append(f"{flag_name(name)} {rule} (got {value})")
    return problems


def validate_training(config: TrainConfig) -> None:
    """Every problem with the options that is visible without loading anything, in one error."""
    from qexpand.modeling import check_model_source

    problems = numeric_problems(config, POSITIVE_TRAIN, UNIT_INTERVAL_TRAIN, NON_NEGATIVE_TRAIN)
    if config.split is not None and min(config.split) <= 0:
        problems.append(f"--split {' '.join(map(str, config.split))}: each count must be at least 1")
    if config.prompt_template is not None and "{query}" not in config.prompt_template:
        problems.append("--prompt-template must contain the placeholder {query}")
    if config.split_file and (config.datasets or config.split):
        problems.append("--split-file brings its own topics, so it cannot go with --datasets or --split")
    if config.resume is not None and config.overwrite:
        problems.append("--resume and --overwrite exclude each other")
    if config.resume is not None and config.run_name:
        problems.append("--resume names the run itself, so it cannot go with --run-name")
    if config.model is not None:
        problems += check_model_source(config.model, config.gguf_file)
    elif config.gguf_file:
        problems.append("--gguf-file names a file inside --model, so it needs --model")
    fail_if_problems(problems, "See `python training.py --help`.")


EXPAND, GENERATION, SCORES = "what to expand", "generation", "scores"
RETRIEVAL = "expand a topic file for retrieval toolkits (no scores)"
STDIO = "-"  # --topics and --out: standard input and output
# What weighs a feedback term besides how many samples hold it: its SBERT cosine with the query, or nothing.
TERM_RELATEDNESS = ("sbert", "none")
OUTPUT_FORMATS = ("tsv", "trec", "jsonl")  # what --topics writes
# "expansion": the expansion alone; "query+expansion": the query repeated k times, then the expansion (query2doc);
# "feedback": the query and a feedback model over the sampled candidates, as a weighted bag of words (qexpand.feedback).
QUERY_FORMS = ("expansion", "query+expansion", "feedback")
TOPIC_OUTPUT_FIELDS = ("out", "format", "query_form", "repeat_query", "query_weight", "feedback_terms",
                       "term_relatedness", "rm3_split")
# Titles of at most this many distinct content words gain from RM3 over their expansion, longer ones lose:
# the split of --rm3-split that the retrieval bench's selective row uses (bench/RESULTS.md).
RM3_TITLE_WORDS = 4


@dataclass
class TestConfig:
    run: str | None = option(None, "run directory or its name under --output-dir (default: the newest "
                             "finished run)", RUN)
    output_dir: str = option("checkpoints", "folder holding the run directories", RUN)
    query: list[str] | None = option(None, "expand this ad-hoc query (repeatable); no gold, so no scores",
                                     EXPAND, action="append", nargs=None, metavar="TEXT")
    split_part: str | None = option(None, "which part of the run's split to expand (default: test); eval is "
                                    "for tuning decoding without looking at the test topics", EXPAND,
                                    choices=("test", "eval"))
    test_datasets: list[str] | None = option(None, "score on every topic of these ir_datasets topic sets "
                                             "instead of the run's test split", EXPAND, metavar="ID")
    topics: str | None = option(None, "expand every topic of this TSV (qid<TAB>query), TREC topic file, "
                                "ir_datasets topic-set id, or - (a TSV on standard input), and write them with "
                                "--out; a killed run continues where it stopped", RETRIEVAL, metavar="SOURCE")
    out: str | None = option(None, "output file of --topics (- = standard output)", RETRIEVAL, metavar="PATH")
    format: str | None = option(None, "tsv (qid<TAB>expanded query: pyserini, PyTerrier), trec (<top> topics "
                                "with the expansion as description) or jsonl (every candidate) (default: tsv)",
                                RETRIEVAL, choices=OUTPUT_FORMATS)
    query_form: str | None = option(None, "the expanded query: the expansion alone; the query (repeated "
                                    "--repeat-query times) followed by it; or feedback, the query and the "
                                    "strongest terms of the sampled candidates as a weighted bag of words "
                                    "(default: query+expansion; with --topics, as the run's recipe says: "
                                    "feedback for --recipe retrieval)", RETRIEVAL,
                                    choices=QUERY_FORMS)
    repeat_query: int | None = option(None, "how often the query precedes the expansion (default: 1; query2doc "
                                      "used 5)", RETRIEVAL)
    query_weight: float | None = option(None, "the query's share of the expanded query: with query+expansion the "
                                        "query is repeated until its words make up about this share of the "
                                        "words (instead of a fixed --repeat-query; 0 = off); with feedback, the "
                                        "query's share of the term weights (default: as the run's recipe says; "
                                        "feedback on a run whose recipe pastes: 0.65)", RETRIEVAL)
    feedback_terms: int | None = option(None, "with --query-form feedback: how many of the candidates' strongest "
                                        "terms join the query (default: as the run's recipe says; 20 on a run "
                                        "whose recipe pastes)", RETRIEVAL,
                                        metavar="N")
    term_relatedness: str | None = option(None, "with --query-form feedback: sbert multiplies each candidate "
                                          "term's weight by its cosine with the query under the SBERT model "
                                          "(--sbert-model), so the samples' topical terms outweigh their stock "
                                          "words; none weighs by the samples alone (default: sbert)", RETRIEVAL,
                                          choices=TERM_RELATEDNESS)
    rm3_split: int | None = option(None, "also write the topics in two parts named after --out (expanded.rm3.tsv, "
                                   "expanded.plain.tsv): those whose query has at most N distinct content words, to "
                                   "search with RM3 over the expansion, and the rest, to search with the expansion "
                                   f"alone (the bench's selective row: N = {RM3_TITLE_WORDS})", RETRIEVAL, metavar="N")
    model: str | None = option(None, "a local copy of the run's base model (hub id or folder); default: the "
                               "one recorded in the run", MODEL)
    gguf_file: str | None = option(None, "GGUF file inside --model", MODEL)
    device: str = option("auto", "where to generate; auto = CUDA when PyTorch sees a GPU", MODEL,
                         choices=DEVICE_CHOICES)
    generation_form: str = option("auto", "how the model is held while it generates: merged (the base unquantized "
                                  "with the adapter merged into it: faster; kept beside it with --zero-shot or "
                                  "--passages, which switch it off) or nf4 (the 4-bit base with the adapter "
                                  "beside it: less memory); auto = merged into bf16 on CUDA where the GPU has the "
                                  "memory, else as the run was trained", MODEL, choices=GENERATION_FORMS)
    precision: str = option("auto", "bf16 or fp32 for an unquantized base (on the CPU bf16 means bf16 "
                            "autocast over float32 weights); auto = as the run was trained", MODEL,
                            choices=PRECISION_CHOICES)
    queries_per_batch: int = option(64, "queries generated together (each with its candidates)", GENERATION)
    max_new_tokens: int | None = option(None, "cap on generated tokens (EOS stops earlier) (default: 96; with "
                                        "--topics, as the run's recipe says)", GENERATION)
    num_candidates: int | None = option(None, "sample N expansions per query (1 = greedy) and keep one or join "
                                        "them (--select) (default: 1; with --topics, as the run's recipe says: "
                                        "4 joined for --recipe retrieval)", GENERATION)
    temperature: float | None = option(None, "sampling temperature when N > 1 (default: 0.7)", GENERATION)
    no_repeat_ngram: int | None = option(None, "no n-gram of N tokens twice in one generation, so it cannot loop "
                                         "(0 = off) (default: 0; with --topics, as the run's recipe says)",
                                         GENERATION)
    passages: int | None = option(None, "with --topics and --query-form feedback: also sample N short passages per "
                                  "query from the base model (the adapter switched off, an encyclopedia paragraph "
                                  "about the query) and weigh their terms with the candidates', as generative "
                                  "relevance feedback does (0 = none) (default: as the run's recipe says)",
                                  GENERATION, metavar="N")
    select: str | None = option(None, "with N > 1: mbr keeps the candidate closest on average to the others; "
                                "anchored adds its closeness to the query; join keeps them all, one after the "
                                "other (a pseudo-document for retrieval) (default: mbr)", GENERATION,
                                choices=SELECT_CHOICES)
    sampling_seed: int | None = option(None, "seed of the sampled candidates, with --num-candidates 2 or more "
                                       "(greedy decoding draws nothing) (default: 0)", GENERATION)
    stock: bool = option(False, "generate on the stock path: the library's generate for greedy decoding too, "
                         "instead of the CUDA-graph decoder of qexpand.accel (the way back if it refuses a "
                         "library version or is in doubt)", GENERATION)
    baseline: bool = option(False, "also generate with the base model alone (zero-shot, same prompt) and "
                            "score it", SCORES)
    zero_shot: bool = option(False, "with --topics: expand with the base model alone (the adapter switched off, "
                             "same prompt and decoding), the baseline a fine-tuned expansion must beat", RETRIEVAL)
    sbert_model: str | None = option(None, "sentence-transformers model for the cosine score, the choice among "
                                     "candidates and --term-relatedness sbert (default: all-MiniLM-L6-v2)", SCORES)


# Options of the test script that once had the name of a training.py option with another meaning: the old
# name is refused with the new one, never read as something else.
RENAMED_TEST_OPTIONS = {
    "--seed": ("--sampling-seed", "it seeds the sampled candidates only; training.py's --seed seeds the split "
                                  "and training"),
    "--batch-size": ("--queries-per-batch", "it counts queries generated together; training.py's --batch-size "
                                            "counts training examples"),
    "--quantization": ("--generation-form", "merged or nf4 says how the model is held while it generates; "
                                            "training.py's --quantization says how the base is loaded"),
    "--merge": ("--generation-form merged", "one option now says how the model is held while it generates"),
}


def sampling_only_problems(config: TestConfig, sampling: bool) -> list[str]:
    """The options that only sampling reads, given to a greedy expansion."""
    if sampling or (config.temperature is None and not config.select and config.sampling_seed is None):
        return []
    return ["--temperature, --select and --sampling-seed only apply when sampling, i.e. with --num-candidates 2 "
            "or more"]


SBERT_UNUSED = ("those expansions have no gold description to score, and the model only picks among sampled "
                "candidates with --num-candidates 2 or more (and --select mbr or anchored)")


def sbert_picks(config: TestConfig) -> bool:
    """Whether the SBERT model picks one of several sampled candidates. Without --num-candidates and
    --select, every recipe's expansion is greedy or joins its candidates."""
    return config.select in ("mbr", "anchored") or ((config.num_candidates or 1) > 1 and config.select != "join")


def validate_testing(config: TestConfig) -> None:
    from qexpand.modeling import check_model_source

    # The query-shaping options are checked with the run's recipe (recipes.expansion_form_problems).
    problems = numeric_problems(config, ("queries_per_batch", "max_new_tokens", "num_candidates", "temperature",
                                         "rm3_split"), non_negative=("no_repeat_ngram", "passages"))
    if config.topics is not None:
        if config.out is None:
            problems.append("--topics needs --out, the file to write (- for standard output)")
        elif config.out == STDIO and config.rm3_split is not None:
            problems.append("--rm3-split writes two files named after --out, so --out cannot be - (standard output)")
        others = [flag_name(n) for n in ("query", "test_datasets", "split_part", "baseline") if getattr(config, n)]
        if others:
            problems.append(f"--topics expands a topic file, so it cannot go with {', '.join(others)}")
    elif config.passages is not None:
        problems.append("--passages adds passages to the expansions of --topics; give --topics too")
    elif any(getattr(config, n) is not None for n in TOPIC_OUTPUT_FIELDS) or config.zero_shot:
        problems.append("--out, --format, --query-form, --repeat-query, --query-weight, --feedback-terms, "
                        "--term-relatedness, --rm3-split and --zero-shot describe the output of --topics; give --topics "
                        "too")
    if config.query is not None:
        if any(not q.strip() for q in config.query):
            problems.append("--query got an empty or whitespace-only query; give the words to expand")
        if config.test_datasets:
            problems.append("--query and --test-datasets exclude each other")
    if config.split_part and (config.query is not None or config.test_datasets):
        problems.append("--split-part picks a part of the run's split, so it cannot go with --query or "
                        "--test-datasets")
    # Greedy by the options themselves; settle_testing asks again once the run's recipe has said.
    problems += sampling_only_problems(config, sampling=config.num_candidates != 1)
    # The SBERT model scores expansions against gold descriptions and picks one of several sampled
    # candidates; ad-hoc queries have no gold, so unless it picks, it would load for nothing. (With --topics
    # it may also weigh feedback terms: settle_testing asks once the run's recipe has said.)
    if config.sbert_model is not None and config.query is not None and not sbert_picks(config):
        problems.append(f"--sbert-model is unused with --query: {SBERT_UNUSED}")
    if config.model:
        problems += check_model_source(config.model, config.gguf_file)
    elif config.gguf_file:
        problems.append("--gguf-file names a file inside --model, so it needs --model")
    fail_if_problems(problems, "See `python testing_finetuned_model.py --help`.")
