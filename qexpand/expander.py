"""Expand queries with a finished run from Python: the generation path of `testing_finetuned_model.py`.

    from qexpand import Expander

    expander = Expander.from_run("checkpoints/RUN", num_candidates=4)
    expander.expand(["internet privacy"])     # the expanded queries, as `--topics ... --out x.tsv` writes them
    expander.generate(["internet privacy"])   # the generated candidates of each query

The run is loaded once, the way the test script loads it for `--topics`: its directory checked file by
file, the tokenizer checked against the ids training used, the run's recipe deciding the expansion
settings, the adapter merged into a bf16 base on CUDA where it fits, greedy steps as a CUDA graph.
The script and `Expander` share the loading and generation code below, so they expand alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qexpand import data, generation, modeling, options, rundir, runcheck
from qexpand.config import TestConfig, validate_testing
from qexpand.errors import UserError, fail_if_problems
from qexpand.expandtopics import Shard
from qexpand.generation import GenerationForm, generate_descriptions, generate_passages
from qexpand.metrics import Scorer
from qexpand.prompt import truncate_query
from qexpand.recipes import settle_testing
from qexpand.topicfiles import STDIO, QueryShape, candidate_texts

MAX_QUERY_TOKENS = 64
# The test script's logger, so that its warnings read as they did before this code moved here.
log = logging.getLogger("testing")

# The TestConfig fields Expander.from_run takes: decoding, query shaping and how the model is held. The
# others say what the script expands, where it writes and what it scores.
OPTIONS = ("num_candidates", "temperature", "select", "max_new_tokens", "no_repeat_ngram", "sampling_seed",
           "query_form", "repeat_query", "query_weight", "feedback_terms", "term_relatedness", "sbert_model", "device",
           "generation_form", "precision", "queries_per_batch", "stock", "zero_shot", "passages")
OPTIONS_HINT = "See `python testing_finetuned_model.py --help` (each option there is a keyword here)."


def choose_base_model(config: TestConfig, record: runcheck.RunRecord) -> tuple[str, str | None]:
    """The base model to load: the recorded one, or --model if it has the same architecture."""
    trained = record.config
    if not config.model:
        return trained.model, trained.gguf_file
    model, gguf_file = modeling.resolve_named_base(config.model, config.gguf_file)
    if (model, gguf_file) == (trained.model, trained.gguf_file):
        return trained.model, trained.gguf_file
    wanted = record.base_model_signature
    found = modeling.model_signature(modeling.load_config(model, gguf_file))
    if wanted and found != wanted:
        differ = ", ".join(f"{k} {wanted[k]} vs {found[k]}" for k in wanted if wanted[k] != found.get(k))
        raise UserError(
            f"the adapter in this run was trained on '{trained.model}', and --model "
            f"'{config.model}' is a different model ({differ}). Leave --model out to use the recorded "
            "base, or give a copy of that same model."
        )
    return model, gguf_file


@dataclass(frozen=True)
class OpenedRun:
    """A finished run checked and its test settings settled: all that is known before a model loads."""

    run_dir: Path
    record: runcheck.RunRecord
    split: dict
    base: str
    gguf: str | None
    config: TestConfig  # settled: nothing left on "auto" or None that decides generation
    form: GenerationForm

    @property
    def template(self) -> str:
        return self.record.config.prompt_template


def open_run(config: TestConfig) -> OpenedRun:
    """Validate the options, find the run and check every file of it, choose the base and settle the
    settings: every refusal comes here, before anything heavy loads."""
    validate_testing(config)
    run_dir = rundir.resolve_run(Path(config.output_dir), config.run, "python training.py --resume")
    record, split = runcheck.check_finished_run(run_dir)  # every file, before any model is loaded
    base, gguf = choose_base_model(config, record)
    config, form = settle_testing(config, record.config, base, gguf)
    return OpenedRun(run_dir, record, split, base, gguf, config, form)


def prepare_queries(items: list[dict], tokenizer) -> list[str]:
    queries = []
    for item in items:
        query, cut = truncate_query(tokenizer, data.normalise_whitespace(item["query"]), MAX_QUERY_TOKENS)
        if cut:
            log.warning("query cut to %d tokens: %r", MAX_QUERY_TOKENS, query)
        queries.append(query)
    return queries


def cpu_autocast(config: TestConfig) -> bool:
    """bf16 on the CPU means bf16 autocast over float32 weights: bfloat16 weights generated more
    slowly there than float32 ones (bench/RESULTS.md)."""
    return config.device == "cpu" and config.precision == "bf16"


def load_model(base: str, gguf: str | None, run_dir: Path, config: TestConfig):
    """The base model with the run's adapter attached; `finetuned_model` merges it where the form says so."""
    precision = "fp32" if cpu_autocast(config) else config.precision
    return generation.load_with_adapter(base, gguf, run_dir, config.device,
                                     generation.LOADED_AS[config.generation_form], precision)


def pick_candidate(query: str, candidates: list[str], scorer: Scorer | None, select: str | None) -> int:
    """Index of the candidate to keep among several sampled ones.

    mbr (minimum Bayes risk): the one most similar on average to the other candidates, i.e. the
    consensus. anchored: the same plus its similarity to the query, so a fluent candidate that
    drifted away from the query's topic loses to one that stays on it.
    """
    if len(candidates) == 1 or scorer is None:
        return 0
    emb = scorer.embed(candidates)
    similarity = emb @ emb.T
    consensus = (similarity.sum(axis=1) - np.diag(similarity)) / (len(candidates) - 1)
    if select == "anchored":
        consensus = consensus + emb @ scorer.embed([query])[0]
    return int(np.argmax(consensus))


def greedy_decoding(config: TestConfig):
    """A context manager that gives the greedy decoder to generate with: on CUDA the CUDA-graph one of
    qexpand.accel, else (and with --stock) None, the library's generate."""
    if config.stock or config.device != "cuda":
        return contextlib.nullcontext(None)
    from qexpand.accel.graphed_decoding import graphed_greedy_decoding

    return graphed_greedy_decoding()


def expand(model, tokenizer, template: str, queries: list[str], config: TestConfig, scorer, decoder,
           progress: bool = True) -> tuple[list[dict], float]:
    """One detail record per query (chosen text, EOS, candidates) and the generation time."""
    import torch

    started = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_autocast(config) else contextlib.nullcontext()
    with autocast:
        generations = generate_descriptions(
            model, tokenizer, template, queries, batch_size=config.queries_per_batch,
            max_new_tokens=config.max_new_tokens, num_candidates=config.num_candidates,
            temperature=config.temperature, seed=config.sampling_seed, progress=progress, greedy_decoder=decoder,
            no_repeat_ngram=config.no_repeat_ngram,
        )
    seconds = time.perf_counter() - started
    details = []
    for query, candidates in zip(queries, generations):
        if config.select == "join":
            generated = " ".join(g.text for g in candidates)
            ended = all(g.ended_at_eos for g in candidates)
        else:
            chosen = candidates[pick_candidate(query, [g.text for g in candidates], scorer, config.select)]
            generated, ended = chosen.text, chosen.ended_at_eos
        details.append({"generated": generated, "ended_at_eos": ended,
                        "candidates": [vars(g) for g in candidates] if len(candidates) > 1 else None})
    return details, seconds


def finetuned_model(model, form: GenerationForm):
    """The model to generate with: the adapter merged into the base where the form says so (an unquantized
    base: nothing is lost and the merged model generates faster; bench/RESULTS.md), else beside it."""
    return model.merge_and_unload() if form.merged else model


def zero_shot_switch(model, config: TestConfig):
    """With --zero-shot, the adapter switched off for the whole expansion (the settled form keeps it beside the
    base for this); else nothing."""
    return model.disable_adapter() if config.zero_shot else contextlib.nullcontext()


def load_for_generation(config: TestConfig, record: runcheck.RunRecord, run_dir: Path, base: str, gguf: str | None,
                        needs_scorer: bool):
    """The run's tokenizer (checked against the ids training used), the model with its adapter, and
    the SBERT scorer when scores or candidate selection need it."""
    tokenizer = modeling.load_tokenizer(str(run_dir))
    runcheck.verify_tokenizer(tokenizer, record.tokenizer_check, f"saved in {run_dir}")
    modeling.keep_freed_memory(config.device)
    model = load_model(base, gguf, run_dir, config)
    picks = config.num_candidates > 1 and config.select != "join"
    scorer = Scorer(config.sbert_model) if needs_scorer or picks else None
    return model, tokenizer, scorer


def topic_expansions(model, tokenizer, template: str, queries: list[str], config: TestConfig, scorer,
                     decoder) -> list[tuple[str, list]]:
    """(chosen expansion, candidates) for each query, as --topics records them: the candidates as dicts
    (text, EOS, tokens) when several were sampled, else the chosen text alone."""
    prepared = prepare_queries([{"query": q} for q in queries], tokenizer)
    details, _ = expand(model, tokenizer, template, prepared, config, scorer, decoder, progress=False)
    expansions = [(d["generated"], d["candidates"] or [d["generated"]]) for d in details]
    if not config.passages:
        return expansions
    # The base model writes the passages: the adapter is switched off here unless the whole expansion
    # already runs without it (--zero-shot), since leaving a nested switch would switch it back on.
    adapter_off = contextlib.nullcontext() if config.zero_shot else model.disable_adapter()
    with adapter_off:
        passages = generate_passages(model, tokenizer, prepared, config.passages, config.queries_per_batch,
                                     temperature=config.temperature or 0.7, seed=config.sampling_seed,
                                     progress=False)
    return [(chosen, candidates + [{**vars(p), "passage": True} for p in written])
            for (chosen, candidates), written in zip(expansions, passages)]


def topic_query(query: str, expansion: str, candidates: list, config: TestConfig) -> str:
    """The expanded query of one topic as --topics writes it in a TSV, in the settled query form."""
    return data.normalise_whitespace(QueryShape.of(config).query(query, expansion,
                                                                 candidate_texts({"candidates": candidates})))


def option_problems(given: dict) -> list[str]:
    """Keywords that are no option of Expander.from_run, or whose value has the wrong type or is no choice.
    The command line's parser checks types and choices; validate_testing assumes they were checked."""
    unknown = [name for name in given if name not in OPTIONS]
    if unknown:
        return [f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options are "
                f"{', '.join(OPTIONS)}"]
    hints = typing.get_type_hints(TestConfig)
    fields = {f.name: f for f in dataclasses.fields(TestConfig)}
    problems = []
    for name, value in given.items():
        choices = fields[name].metadata["argparse"].get("choices")
        if not options._type_ok(value, hints[name]):
            problems.append(f"{name} should be {hints[name]}, got {value!r}")
        elif choices and value is not None and value not in choices:
            problems.append(f"{name} {value!r} is none of {', '.join(choices)}")
    return problems


def api_config(run_dir: str | Path | None, output_dir: str | Path, given: dict) -> TestConfig:
    """The TestConfig of `testing_finetuned_model.py --run RUN --topics ...` with the given options.
    topics and out are placeholders: they make the run's recipe decide the expansion (settle_testing)
    and allow the query-shaping options (validate_testing), as on the command line with --topics."""
    fail_if_problems(option_problems(given), OPTIONS_HINT)
    return TestConfig(run=None if run_dir is None else str(run_dir), output_dir=str(output_dir), topics=STDIO,
                      out=STDIO, **given)


# How long a process that finished its share of --topics waits for the others: after a resume one process
# may have hours of topics left while another has none (a collective operation's timeout).
SHARD_WAIT = datetime.timedelta(days=7)


class ReportedByMainProcess(Exception):
    """A secondary process stops on a problem that the main process reports, once, for all of them."""


class Processes:
    """The processes of one `--topics` run under `accelerate launch` or torchrun, one per GPU (CPU
    processes talking through gloo where there is none): this process's share, and the few points where
    they meet. `Processes.start` gives None for one process, which never starts the distributed state."""

    def __init__(self, state):
        self.state = state
        self.shard = Shard(state.process_index, state.num_processes)
        self.is_main = state.is_main_process

    @staticmethod
    def launched() -> bool:
        """Whether a launcher started this process as one of several (WORLD_SIZE above 1)."""
        return int(os.environ.get("WORLD_SIZE") or 1) > 1

    @classmethod
    def start(cls, device: str) -> Processes | None:
        """The distributed state where a launcher started several processes, else None. On CUDA it makes
        this process's GPU the current one, before anything looks at its memory."""
        if not cls.launched():
            return None
        import torch
        from accelerate import PartialState

        return cls(PartialState(cpu=device == "cpu" or not torch.cuda.is_available(), timeout=SHARD_WAIT))

    def gather(self, value) -> list:
        """`value` of every process, in process order; every process waits here for all the others."""
        from accelerate.utils import gather_object

        return gather_object([value])

    def together(self, step: typing.Callable):
        """step() in every process, which then meet: if it raised a UserError in any of them, all stop, the
        main process raising the problem (each distinct one once), the others ReportedByMainProcess."""
        try:
            result, problem = step(), None
        except UserError as error:
            result, problem = None, str(error)
        where: dict[str, list[str]] = {}
        for index, text in enumerate(self.gather(problem), start=1):
            if text:
                where.setdefault(text, []).append(str(index))
        if not where:
            return result
        if not self.is_main:
            raise ReportedByMainProcess(problem or "")
        if len(where) == 1:
            raise UserError(next(iter(where)))
        raise UserError(" ".join(f"In process {', '.join(ranks)} of {self.shard.count}: {text}"
                                 for text, ranks in where.items()))

    def check_placement(self, model) -> None:
        """On CUDA each process generates on its own GPU, the current one since `start`."""
        import torch

        device = next(model.parameters()).device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            raise RuntimeError(f"{self.shard} loaded its model on {device}, not on its own GPU "
                               f"cuda:{torch.cuda.current_device()}")

    def close(self) -> None:
        """On the way out, after the processes last meet or a refusal: leave the process group (NCCL warns at
        exit otherwise)."""
        self.state.destroy_process_group()

    @staticmethod
    @contextlib.contextmanager
    def exiting_without_teardown():
        """Around a launched process's whole run: its exit code is handed to os._exit, skipping the teardown
        of the interpreter and of the libraries' C++ objects. A process of a finished sharded expansion, its
        journal written and its process group left, now and then aborted in that teardown (SIGABRT,
        "terminate called without an active exception", twice in about ten test-suite runs on a loaded
        2-core machine), and the launcher then reported a finished run as failed. By then every file the
        process wrote is closed; only the standard streams and logging are flushed here."""
        try:
            yield
        except SystemExit as leaving:
            code = leaving.code
            if code is not None and not isinstance(code, int):  # sys.exit("message") prints it and exits 1
                print(code, file=sys.stderr)
                code = 1
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)

    def quiet_secondary(self) -> None:
        """Outside the main process, nothing but the progress bar: no warnings or log messages."""
        if not self.is_main:
            logging.disable(logging.WARNING)
            warnings.simplefilter("ignore")


def checked_queries(queries) -> list[str]:
    """The queries as a list; a UserError unless each is a string with a word in it."""
    queries = None if isinstance(queries, str) else list(queries)  # a string would go letter by letter
    if queries is None or not all(isinstance(q, str) for q in queries):
        raise UserError("give the queries as a list of strings, e.g. expand(['internet privacy']).")
    empty = [number for number, query in enumerate(queries, start=1) if not query.strip()]
    if empty:
        raise UserError(f"the queries at positions {', '.join(map(str, empty))} (of {len(queries)}) are empty or "
                        "whitespace only; give the words to expand.")
    return queries


class Expander:
    """A finished run loaded once, expanding queries as `testing_finetuned_model.py --topics` does.

    run_dir: the run; config: the settled settings (query form, candidates, decoding, device); form: how
    the model is held (merged or 4-bit, and why)."""

    def __init__(self, run: OpenedRun, model, tokenizer, scorer):
        self.run_dir, self.config, self.form, self.template = run.run_dir, run.config, run.form, run.template
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer

    @classmethod
    def from_run(cls, run_dir: str | Path | None = None, output_dir: str | Path = "checkpoints",
                 **options) -> Expander:
        """Load a run (a path, or a name under `output_dir`; None: the newest finished run) with the test
        script's options for decoding and query shaping (num_candidates=4, query_weight=0.6, ...); a bad
        option raises the script's UserError."""
        run = open_run(api_config(run_dir, output_dir, options))
        with greedy_decoding(run.config):
            pass  # a decoder that refuses this library version says so before the model loads, as in the script
        model, tokenizer, scorer = load_for_generation(run.config, run.record, run.run_dir, run.base, run.gguf,
                                                       needs_scorer=False)
        return cls(run, finetuned_model(model, run.form), tokenizer, scorer)

    def generate(self, queries: list[str]) -> list[list[str]]:
        """The generated candidates of each query (one for greedy decoding), then the base model's passages
        where the settings ask for them (`passages`)."""
        expansions = self._expansions(checked_queries(queries))
        return [candidate_texts({"candidates": candidates}) for _, candidates in expansions]

    def expand(self, queries: list[str]) -> list[str]:
        """The expanded queries, exactly as `--topics ... --out FILE.tsv` writes them."""
        queries = checked_queries(queries)
        return [topic_query(query, expansion, candidates, self.config)
                for query, (expansion, candidates) in zip(queries, self._expansions(queries))]

    def _expansions(self, queries: list[str]) -> list[tuple[str, list]]:
        size = self.config.queries_per_batch
        # In batches of batch_size, as --topics hands them to generation: sampling is seeded once per
        # batch, so the same topics in the same order get the same candidates here and there.
        batches = [queries[start:start + size] for start in range(0, len(queries), size)]
        return [pair for batch in batches for pair in self._expand_batch(batch)]

    def _expand_batch(self, queries: list[str]) -> list[tuple[str, list]]:
        with greedy_decoding(self.config) as decoder, zero_shot_switch(self.model, self.config):
            return topic_expansions(self.model, self.tokenizer, self.template, queries, self.config, self.scorer,
                                    decoder)
