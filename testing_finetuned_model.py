"""Generate descriptions for unseen queries with a trained adapter and score them against the gold ones.

Run (after `python training.py`; uses the newest finished run in checkpoints/):

    python testing_finetuned_model.py

Other uses:

    python testing_finetuned_model.py --run checkpoints/RUN --baseline      # add the zero-shot base model row
    python testing_finetuned_model.py --query "internet privacy" --query "hubble telescope"
    python testing_finetuned_model.py --test-datasets clueweb09/catb/trec-web-2010   # another topic set
    python testing_finetuned_model.py --topics topics.tsv --out expanded.tsv        # for pyserini / PyTerrier
    python testing_finetuned_model.py --topics topics.tsv --out expanded.tsv --rm3-split 4   # + short / long parts
    accelerate launch --num_processes 4 testing_finetuned_model.py --topics big.tsv --out expanded.tsv  # 4 GPUs

Everything about the run (base model, prompt, split, quantization, precision) is read from its run
directory, which is checked file by file before any model is loaded. Per query it prints QUERY /
GENERATED / FROM DATASET, then a table of scores with 95% bootstrap intervals for the fine-tuned
model and the baselines. Predictions (JSONL) and scores (JSON and Markdown) are written into the run
directory. From Python: `main(parse_config([...]))` returns the report; to expand queries in memory
(as --topics does), `qexpand.Expander.from_run(RUN).expand([...])`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path

from qexpand import data, modeling, options, quiet, rundir, runcheck
from qexpand.config import RENAMED_TEST_OPTIONS, TestConfig
from qexpand.errors import EXIT_USER_ERROR, UserError, fail_if_problems, run_cli
# The loading and generation this script shares with qexpand.Expander (the Python API) live there.
from qexpand.expander import (Processes, ReportedByMainProcess, expand, finetuned_model, greedy_decoding,
                              load_for_generation, open_run, prepare_queries, topic_expansions, zero_shot_switch)
from qexpand.expandtopics import expand_shard, expand_topics, merge_shards, open_shard, sharding_problems
from qexpand.generation import GenerationForm
from qexpand.metrics import Scorer, report_markdown, score_rows
from qexpand.topicfiles import QueryShape, QueryTopic, read_topics

DESCRIPTION = "Expand test queries with a fine-tuned adapter and score them against the gold descriptions."
OOM_HINT = "Lower --queries-per-batch, or add --generation-form nf4 (the 4-bit base needs less memory)."
log = logging.getLogger("testing")


def parse_config(argv: list[str] | None = None) -> TestConfig:
    return options.parse_config(TestConfig, argv, DESCRIPTION, renamed=RENAMED_TEST_OPTIONS)


def topics_to_expand(config: TestConfig, split: dict, run_dir: Path) -> tuple[str, list[dict]]:
    """(name of the evaluation, items with query and, when known, gold description)."""
    if config.query:
        return "adhoc", [{"dataset": None, "query_id": None, "query": q, "description": None, "narrative": None}
                         for q in config.query]
    if config.test_datasets:
        topics = unseen_topics(data.load_all_topics(config.test_datasets), split, config.test_datasets)
        name = "testsets-" + "+".join(re.sub(r"[^A-Za-z0-9.-]+", "_", d) for d in config.test_datasets)
    else:
        topics = runcheck.split_part_topics(run_dir, split, config.split_part)
        name = config.split_part
    return name, [vars(t).copy() for t in topics]


def seen_queries(split: dict) -> set[str]:
    """The query keys the run trained or was tuned on (its train and eval topics)."""
    return {data.query_key(t.query) for t in split["train"] + split["eval"]}


def unseen_topics(topics: list[data.Topic], split: dict, dataset_ids: list[str]) -> list[data.Topic]:
    """Drop topics whose query the adapter saw in training or eval: scores on them would flatter it.

    Topic sets overlap (Robust04 holds TREC 6-8's topics 301-450), so this is checked by query text.
    """
    seen = seen_queries(split)
    kept = [t for t in topics if data.query_key(t.query) not in seen]
    if not kept:
        raise UserError(
            f"every topic of {' '.join(dataset_ids)} has a query this run was trained or tuned on, so "
            "scores on them would say nothing about unseen queries. Give topic sets the run did not "
            "train on, or test the run's own test split (no --test-datasets)."
        )
    if len(kept) < len(topics):
        print(f"left out {len(topics) - len(kept)} of {len(topics)} topics whose query is in this run's "
              "train or eval split", flush=True)
    return kept


def print_blocks(items: list[dict], queries: list[str], details: list[dict]) -> None:
    for number, (item, query, detail) in enumerate(zip(items, queries, details), start=1):
        source = f"  ({item['dataset']} #{item['query_id']})" if item["dataset"] else ""
        print(f"\n[{number}/{len(items)}]{source}")
        print(f"QUERY:        {query}")
        print(f"GENERATED:    {detail['generated']}" + ("" if detail["ended_at_eos"] else "  [cut: no EOS]"))
        for k, candidate in enumerate(detail["candidates"] or [], start=1):
            print(f"  candidate {k}: {candidate['text']}")
        if item["description"] is not None:
            print(f"FROM DATASET: {item['description']}")


def write_predictions(path: Path, items: list[dict], queries: list[str], outputs: dict) -> None:
    lines = []
    for i, (item, query) in enumerate(zip(items, queries)):
        record = {**item, "query": query, **outputs["finetuned"][0][i]}
        if "zero_shot" in outputs:
            record["zero_shot"] = outputs["zero_shot"][0][i]["generated"]
        lines.append(json.dumps(record, ensure_ascii=False))
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def score(items: list[dict], queries: list[str], outputs: dict, scorer: Scorer, train_topics: list) -> dict:
    """Every row (model rows and baselines, nearest neighbour from the run's training topics) scored."""
    scored_items = [{**item, "query": query} for item, query in zip(items, queries)]
    predictions = {row: [d["generated"] for d in details] for row, (details, _) in outputs.items()}
    return score_rows(scorer, predictions, scored_items, train_topics)


def warn_if_seen(topics: list[QueryTopic], split: dict) -> None:
    seen = seen_queries(split)
    count = sum(data.query_key(t.query) in seen for t in topics)
    if count:
        log.warning("%d of %d topics have a query this run was trained or tuned on; their expansions echo "
                    "training descriptions, which flatters any retrieval figure made with them", count, len(topics))


def expand_topic_file(config: TestConfig, topics: list[QueryTopic], model, tokenizer, template: str, scorer,
                      decoder, run_dir: Path) -> dict:
    """--topics: expand every topic, resumably, and write the file a retrieval toolkit reads."""

    def expand_batch(queries: list[str]) -> list[tuple[str, list]]:
        return topic_expansions(model, tokenizer, template, queries, config, scorer, decoder)

    records = expand_topics(topics, expand_batch, config.out, config.format, QueryShape.of(config),
                            batch_size=config.queries_per_batch, settings=topic_settings(config, run_dir),
                            rm3_split=config.rm3_split)
    return {"run": str(run_dir), "evaluation": "topics", "out": config.out, "expansions": records}


def topic_settings(config: TestConfig, run_dir: Path) -> dict:
    """What made a topic file's expansions, recorded in its journal: a journal of other settings is refused."""
    return {"run": str(run_dir.resolve()), "zero_shot": config.zero_shot, "num_candidates": config.num_candidates,
            "seed": config.sampling_seed, "temperature": config.temperature, "select": config.select,
            "max_new_tokens": config.max_new_tokens, "no_repeat_ngram": config.no_repeat_ngram,
            # Only when there are passages: a journal written before they existed stays readable.
            **({"passages": config.passages} if config.passages else {})}


def expand_topic_file_sharded(config: TestConfig, processes: Processes) -> dict:
    """--topics under `accelerate launch` / torchrun: each process expands its share of the batches into its
    own journal; once all are done, the main process writes the output (qexpand.expandtopics). Every check
    runs in every process before a model loads, and a problem is reported once, by the main process.
    Returns the expansions in the main process, None in the others."""
    processes.quiet_secondary()
    with contextlib.ExitStack() as stack:
        # The process group is left on every way out, a refusal included: a process that exits inside it
        # can abort at interpreter exit (SIGABRT), which the launcher then reports instead of the error.
        stack.callback(processes.close)

        def start():
            run = open_run(config)
            c = run.config
            fail_if_problems(sharding_problems(c.topics, c.out))  # before standard input is read
            topics = read_topics(c.topics)
            decoder = stack.enter_context(greedy_decoding(c))
            job = open_shard(topics, c.out, processes.shard, c.queries_per_batch, topic_settings(c, run.run_dir),
                             c.format, QueryShape.of(c), c.rm3_split)
            return run, topics, decoder, job

        run, topics, decoder, job = processes.together(start)
        forms = processes.gather(run.form.quantization)
        processes.together(lambda: one_generation_form(forms))
        c = run.config
        if processes.is_main:
            warn_if_seen(topics, run.split)
        model, tokenizer, scorer = load_for_generation(c, run.record, run.run_dir, run.base, run.gguf,
                                                       needs_scorer=False)
        processes.check_placement(model)
        model = finetuned_model(model, run.form)
        stack.enter_context(zero_shot_switch(model, c))
        expanded = expand_shard(job, lambda queries: topic_expansions(model, tokenizer, run.template, queries, c,
                                                                      scorer, decoder))
        expanded_now = sum(processes.gather(expanded))  # every process waits here until all shares are done
    records = None
    if processes.is_main:
        records = merge_shards(topics, c.out, processes.shard.count, c.queries_per_batch, expanded_now, c.format,
                               QueryShape.of(c), job.settings, c.rm3_split)
    return {"run": str(run.run_dir), "evaluation": "topics", "out": c.out, "expansions": records}


def one_generation_form(forms: list[str]) -> None:
    """Processes that hold the model differently would expand their shares differently."""
    if len(set(forms)) > 1:
        held = ", ".join(f"process {i} {'merged bf16' if f == 'none' else f}" for i, f in enumerate(forms, start=1))
        raise UserError(f"the processes would hold the model differently ({held}): the merged bf16 model fits "
                        "the free memory of some GPUs but not of others, and their expansions would differ. "
                        "Free GPU memory, or choose one form for all with --generation-form nf4 or merged.")


def evaluate(config: TestConfig, run_dir: Path, split: dict, template: str, evaluation: str, items: list[dict],
             model, tokenizer, scorer, decoder, form: GenerationForm) -> dict:
    """Expand the items (fine-tuned, and zero-shot with --baseline), print and write them, score them."""
    queries = prepare_queries(items, tokenizer)
    loaded = modeling.describe_loaded(model)
    outputs = {}
    if config.baseline:
        with model.disable_adapter():
            outputs["zero_shot"] = expand(model, tokenizer, template, queries, config, scorer, decoder)
    outputs["finetuned"] = expand(finetuned_model(model, form), tokenizer, template, queries, config, scorer, decoder)
    details, seconds = outputs["finetuned"]
    print_blocks(items, queries, details)
    paths = rundir.output_paths(run_dir, evaluation)
    write_predictions(paths["predictions"], items, queries, outputs)
    ended = sum(d["ended_at_eos"] for d in details)
    print(f"\n{len(items)} queries expanded in {seconds:.1f} s; {ended}/{len(items)} generations ended at EOS.")
    print(f"predictions: {paths['predictions']}")
    if items[0]["description"] is None:
        return {"run": str(run_dir), "evaluation": evaluation, "predictions": [d["generated"] for d in details]}

    report = score(items, queries, outputs, scorer, split["train"])
    report.update(run=str(run_dir), evaluation=evaluation, generation_seconds=round(seconds, 3), ended_at_eos=ended,
                  num_candidates=config.num_candidates, select=config.select or "greedy", merged=form.merged,
                  precision=config.precision, loaded=loaded, generation_form=vars(form))
    table = report_markdown(report)
    rundir.atomic_write_json(paths["scores"], report)
    rundir.atomic_write_text(paths["table"], table)
    print("\n" + table)
    print(f"scores: {paths['scores']} and {paths['table']}")
    return report


@quiet.libraries_silenced()
def main(config: TestConfig) -> dict:
    """Expand and score (returns the report written to scores*.json; ad-hoc queries: the predictions),
    or with --topics expand a topic file (returns the expansions)."""
    # Under a launcher with several processes (one a GPU), they share --topics; one process never starts
    # the distributed state.
    processes = Processes.start(config.device) if config.topics else None
    if processes is not None:
        return expand_topic_file_sharded(config, processes)
    run = open_run(config)  # options validated and every file of the run checked, before any model is loaded
    config, form, run_dir, record, split = run.config, run.form, run.run_dir, run.record, run.split
    base, gguf, template = run.base, run.gguf, run.template
    if config.topics:
        topics = read_topics(config.topics)
        warn_if_seen(topics, split)
        with greedy_decoding(config) as decoder:  # entered first: a refusal comes before the model loads
            model, tokenizer, scorer = load_for_generation(config, record, run_dir, base, gguf, needs_scorer=False)
            model = finetuned_model(model, form)
            with zero_shot_switch(model, config):
                return expand_topic_file(config, topics, model, tokenizer, template, scorer, decoder, run_dir)
    evaluation, items = topics_to_expand(config, split, run_dir)
    with greedy_decoding(config) as decoder:
        model, tokenizer, scorer = load_for_generation(config, record, run_dir, base, gguf,
                                                       needs_scorer=items[0]["description"] is not None)
        return evaluate(config, run_dir, split, template, evaluation, items, model, tokenizer, scorer, decoder, form)


def cli() -> int:
    # Under a launcher every process parses the options; a mistake is said once, by the first.
    secondary = int(os.environ.get("RANK") or 0) > 0
    with contextlib.redirect_stderr(io.StringIO()) if secondary else contextlib.nullcontext():
        config = parse_config()
    try:
        main(config)
    except ReportedByMainProcess:  # the main process says what went wrong
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    quiet.setup_logging()
    with Processes.exiting_without_teardown() if Processes.launched() else contextlib.nullcontext():
        run_cli(cli, OOM_HINT)
