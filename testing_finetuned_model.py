"""Generate descriptions for unseen queries with a trained adapter and score them against the gold ones.

Run (after `python training.py`; uses the newest finished run in checkpoints/):

    python testing_finetuned_model.py

Other uses:

    python testing_finetuned_model.py --run checkpoints/RUN --baseline      # add the zero-shot base model row
    python testing_finetuned_model.py --query "internet privacy" --query "hubble telescope"
    python testing_finetuned_model.py --test-datasets clueweb09/catb/trec-web-2010   # another topic set

Everything about the run (base model, prompt, split) is read from its run directory. Per query it
prints QUERY / GENERATED / FROM DATASET, then a table of SBERT cosine, ROUGE-L and BLEU with 95%
bootstrap intervals for the fine-tuned model and the baselines. Predictions (JSONL) and scores
(JSON and Markdown) are written into the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import time
from pathlib import Path

import numpy as np

from qexpand import data, modeling, rundir
from qexpand.errors import UserError, fail_if_problems, run_cli
from qexpand.generation import generate_descriptions
from qexpand.metrics import Scorer, baseline_candidates, build_report, report_markdown
from qexpand.prompt import truncate_query

MAX_QUERY_TOKENS = 64
OOM_HINT = "Lower --batch-size, or leave out --merge (the 4-bit base needs less memory)."

log = logging.getLogger("testing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Expand test queries with a fine-tuned adapter and score them against the gold descriptions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--run", default=None, help="run directory or its name under --output-dir (default: newest finished)")
    parser.add_argument("--output-dir", default="checkpoints", help="folder holding the run directories")
    group = parser.add_argument_group("what to expand")
    group.add_argument("--query", action="append", default=None, metavar="TEXT",
                       help="expand this ad-hoc query (repeatable); no gold, so no scores")
    group.add_argument("--split-part", choices=("test", "eval"), default="test",
                       help="which part of the run's split to expand; eval is for tuning decoding without "
                            "looking at the test topics")
    group.add_argument("--test-datasets", nargs="+", default=None, metavar="ID",
                       help="score on every topic of these ir_datasets topic sets instead of the run's test split")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="base model (hub id or local folder); default: the one recorded in the run")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    group.add_argument("--device", choices=modeling.DEVICE_CHOICES, default="auto", help="where to generate")
    group.add_argument("--quantization", choices=modeling.QUANTIZATION_CHOICES, default="auto",
                       help="auto = nf4 on CUDA, none on CPU")
    group.add_argument("--precision", choices=modeling.PRECISION_CHOICES, default="auto",
                       help="on the CPU, bf16 generates under bf16 autocast over float32 weights (1.25x faster "
                            "on CPUs with AVX512-BF16 or AMX); auto = the precision the run was trained with. "
                            "On CUDA generation computes in bf16 either way")
    group.add_argument("--merge", action="store_true",
                       help="load the base unquantized (bf16 on CUDA) and merge the adapter: faster generation. "
                            "Done anyway whenever the base is unquantized, as on the CPU")
    group = parser.add_argument_group("generation")
    group.add_argument("--batch-size", type=int, default=64, help="queries per generate() call")
    group.add_argument("--max-new-tokens", type=int, default=96, help="cap on generated tokens (EOS stops earlier)")
    group.add_argument("--num-candidates", type=int, default=1,
                       help="sample N expansions per query (1 = greedy); the one closest to the others is scored")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when N > 1")
    group.add_argument("--select", choices=("mbr", "anchored"), default="mbr",
                       help="with N > 1: mbr keeps the candidate closest on average to the others; anchored "
                            "adds its closeness to the query itself, against drifting off topic")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")
    group = parser.add_argument_group("scores")
    group.add_argument("--baseline", action="store_true",
                       help="also generate with the base model alone (zero-shot, same prompt) and score it")
    group.add_argument("--sbert-model", default=None,
                       help="sentence-transformers model for the cosine score (default: all-MiniLM-L6-v2)")
    return parser


def validate(args: argparse.Namespace) -> None:
    problems = []
    for name in ("batch_size", "max_new_tokens", "num_candidates"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.temperature <= 0:
        problems.append("--temperature must be positive")
    if args.query is not None:
        if any(not q.strip() for q in args.query):
            problems.append("--query got an empty or whitespace-only query; give the words to expand")
        if args.test_datasets:
            problems.append("--query and --test-datasets exclude each other")
    if args.merge and args.quantization == "nf4":
        problems.append("--merge loads the base unquantized, so it cannot go with --quantization nf4")
    if args.model:
        problems += modeling.check_model_source(args.model, args.gguf_file)
    fail_if_problems(problems, "See `python testing_finetuned_model.py --help`.")


def check_base_model(args, config: dict) -> tuple[str, str | None]:
    """The base model to load: the recorded one, or --model if it has the same architecture."""
    if not args.model:
        return config["base_model"], config["gguf_file"]
    if (args.model, args.gguf_file) == (config["base_model"], config["gguf_file"]):
        return args.model, args.gguf_file
    wanted = config.get("base_model_signature", {})
    found = modeling.model_signature(modeling.load_config(args.model, args.gguf_file))
    if wanted and found != wanted:
        differ = ", ".join(f"{k} {wanted[k]} vs {found[k]}" for k in wanted if wanted[k] != found.get(k))
        raise UserError(
            f"the adapter in this run was trained on '{config['base_model']}', and --model "
            f"'{args.model}' is a different model ({differ}). Leave --model out to use the recorded "
            "base, or give a copy of that same model."
        )
    return args.model, args.gguf_file


def test_items(args, run_dir: Path) -> tuple[str, list[dict]]:
    """(name of the evaluation, items with query and, when known, gold description)."""
    if args.query:
        return "adhoc", [{"dataset": None, "query_id": None, "query": q, "description": None} for q in args.query]
    if args.test_datasets:
        topics = unseen_topics(data.load_all_topics(args.test_datasets), run_dir, args.test_datasets)
        name = "testsets-" + "+".join(re.sub(r"[^A-Za-z0-9.-]+", "_", d) for d in args.test_datasets)
    else:
        topics = data.split_from_json(rundir.read_run_file(run_dir, rundir.SPLIT_FILE))[args.split_part]
        name = args.split_part
    return name, [vars(t).copy() for t in topics]


def unseen_topics(topics: list[data.Topic], run_dir: Path, dataset_ids: list[str]) -> list[data.Topic]:
    """Drop topics whose query the adapter saw in training or eval: scores on them would flatter it.

    Topic sets overlap (Robust04 holds TREC 6-8's topics 301-450), so this is checked by query text.
    """
    split = data.split_from_json(rundir.read_run_file(run_dir, rundir.SPLIT_FILE))
    seen = {data.query_key(t.query) for t in split["train"] + split["eval"]}
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


def prepare_queries(items: list[dict], tokenizer) -> list[str]:
    queries = []
    for item in items:
        query, cut = truncate_query(tokenizer, data.normalise_whitespace(item["query"]), MAX_QUERY_TOKENS)
        if cut:
            log.warning("query cut to %d tokens: %r", MAX_QUERY_TOKENS, query)
        queries.append(query)
    return queries


def load_model(base: str, gguf: str | None, run_dir: Path, device: str, quantization: str, merge: bool):
    import torch
    from peft import PeftModel

    model = modeling.load_base_model(base, gguf, quantization, device)
    model = PeftModel.from_pretrained(model, str(run_dir))
    if device == "cuda" and not merge:
        # LoRA weights load in float32; in bf16 they skip two casts per LoRA layer and token, which
        # made generating 35 descriptions with Mistral-7B twice as fast on an H100 (8.9 s -> 4.3 s).
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(torch.bfloat16)
    model.config.use_cache = True
    return model


def pick_candidate(query: str, candidates: list[str], scorer: Scorer | None, select: str) -> int:
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


def generation_precision(args, config: dict, device: str) -> str:
    """bf16 on CUDA; on the CPU --precision, or with auto the precision the run was trained with."""
    if device.startswith("cuda"):
        return "bf16"
    return args.precision if args.precision != "auto" else config["hyperparameters"].get("precision", "fp32")


def cpu_autocast(args, config: dict, device: str):
    """bf16 autocast for generation on the CPU when asked for (or trained so); else nothing.

    The weights stay float32: with bfloat16 weights generation on the CPU was slower (28 s instead
    of 16 s for 96 x 32 tokens of SmolLM2-135M on 2 AVX512-BF16 cores), autocast alone faster (20 s in fp32).
    """
    import torch

    if device == "cpu" and generation_precision(args, config, device) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def expand(model, tokenizer, config, queries, args, scorer) -> tuple[list[str], list[dict], float]:
    started = time.perf_counter()
    with cpu_autocast(args, config, str(next(model.parameters()).device)):
        generations = generate_descriptions(
            model, tokenizer, config["prompt_template"], queries, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, num_candidates=args.num_candidates,
            temperature=args.temperature, seed=args.seed,
        )
    seconds = time.perf_counter() - started
    chosen, details = [], []
    for query, candidates in zip(queries, generations):
        index = pick_candidate(query, [g.text for g in candidates], scorer, args.select)
        chosen.append(candidates[index].text)
        details.append({"generated": candidates[index].text, "ended_at_eos": candidates[index].ended_at_eos,
                        "candidates": [vars(g) for g in candidates] if len(candidates) > 1 else None})
    return chosen, details, seconds


def print_blocks(items: list[dict], queries: list[str], details: list[dict]) -> None:
    for number, (item, query, detail) in enumerate(zip(items, queries, details), start=1):
        source = f"  ({item['dataset']} #{item['query_id']})" if item["dataset"] else ""
        print(f"\n[{number}/{len(items)}]{source}")
        print(f"QUERY:        {query}")
        print(f"GENERATED:    {detail['generated']}" + ("" if detail["ended_at_eos"] else "  [cut: no EOS]"))
        if detail.get("candidates"):
            for k, cand in enumerate(detail["candidates"], start=1):
                print(f"  candidate {k}: {cand['text']}")
        if item["description"] is not None:
            print(f"FROM DATASET: {item['description']}")


def output_paths(run_dir: Path, name: str) -> dict[str, Path]:
    suffix = "" if name == "test" else f"-{name}"  # the run's own test split keeps the plain names
    return {kind: run_dir / f"{stem}{suffix}.{ext}" for kind, stem, ext in (
        ("predictions", "predictions", "jsonl"), ("scores", "scores", "json"), ("table", "scores", "md"))}


def main(args: argparse.Namespace) -> int:
    import json

    validate(args)
    device = modeling.resolve_device(args.device)
    modeling.keep_freed_memory(device)
    run_dir = rundir.resolve_run(Path(args.output_dir), args.run, "python training.py --resume")
    config = rundir.read_run_file(run_dir, rundir.CONFIG_FILE)
    base, gguf = check_base_model(args, config)
    name, items = test_items(args, run_dir)
    tokenizer = modeling.load_tokenizer(str(run_dir))
    queries = prepare_queries(items, tokenizer)
    quantization = "none" if args.merge else modeling.resolve_quantization(args.quantization, device)
    # An unquantized base loses nothing by merging, and the merged model generates faster: the
    # LoRA layers cost a third of each step on the CPU (27.9 s -> 19.1 s for 192 rows x 12 tokens).
    merge = args.merge or quantization == "none"
    model = load_model(base, gguf, run_dir, device, quantization, merge)
    scorer = Scorer(args.sbert_model) if (items[0]["description"] is not None or args.num_candidates > 1) else None

    outputs = {}
    if args.baseline:
        with model.disable_adapter():
            outputs["zero_shot"] = expand(model, tokenizer, config, queries, args, scorer)
    if merge:
        model = model.merge_and_unload()
    outputs["finetuned"] = expand(model, tokenizer, config, queries, args, scorer)
    predictions, details, seconds = outputs["finetuned"]
    print_blocks(items, queries, details)

    paths = output_paths(run_dir, name)
    lines = []
    for i, (item, query) in enumerate(zip(items, queries)):
        record = {**item, "query": query, **details[i]}
        if "zero_shot" in outputs:
            record["zero_shot"] = outputs["zero_shot"][1][i]["generated"]
        lines.append(json.dumps(record, ensure_ascii=False))
    rundir.atomic_write_text(paths["predictions"], "\n".join(lines) + "\n")
    ended = sum(d["ended_at_eos"] for d in details)
    print(f"\n{len(items)} queries expanded in {seconds:.1f} s; {ended}/{len(items)} generations ended at EOS.")
    print(f"predictions: {paths['predictions']}")

    if items[0]["description"] is None:
        return 0
    gold = [item["description"] for item in items]
    rows = {row: output[0] for row, output in outputs.items()}
    rows.update(baseline_candidates(queries))
    order = [r for r in ("finetuned", "zero_shot", "title", "template") if r in rows]
    per_query = {row: scorer.score(rows[row], gold) for row in order}
    report = build_report(per_query)
    report.update(run=str(run_dir), evaluation=name, generation_seconds=round(seconds, 3),
                  ended_at_eos=ended, num_candidates=args.num_candidates, merged=merge,
                  precision=generation_precision(args, config, device),
                  select=args.select if args.num_candidates > 1 else "greedy",
                  per_query={row: {m: v.tolist() for m, v in s.items()} for row, s in per_query.items()})
    table = report_markdown(report)
    rundir.atomic_write_json(paths["scores"], report)
    rundir.atomic_write_text(paths["table"], table)
    print("\n" + table)
    print(f"scores: {paths['scores']} and {paths['table']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli_args = build_parser().parse_args()
    run_cli(lambda: main(cli_args), OOM_HINT)
