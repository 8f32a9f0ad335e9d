"""Stage "generate" of the GPU benchmark: the 35 test descriptions the way testing_finetuned_model.py
generates them today (NF4 base + LoRA in bf16, the library's generate) and the way it does by
default now (qexpand.generation.choose_generation_form: the adapter merged into a bf16 base where
the GPU has the memory, greedy steps replayed as CUDA graphs), plus the forms in between.

Random weights rarely emit EOS, so nearly every row runs to --gen-new-tokens: the worst case.
"""

from __future__ import annotations

from bench.gpu_build import test_topics
from bench.gpu_common import Paths, free_memory, gpu_gb, reset_peak, timed
from qexpand.recipes import resolve_device


def make_adapter(paths: Paths, device: str) -> None:
    """A LoRA adapter like a trained one: B is random (a fresh adapter's zero B would make merging
    a no-op, and every form would run the bare base)."""
    import torch
    from peft import get_peft_model

    from qexpand import modeling

    if (paths.adapter / "adapter_config.json").is_file():
        return
    model = modeling.load_base_model(str(paths.model), None, "nf4", device, "bf16")
    model = get_peft_model(model, modeling.lora_config(model, 8, 16, 0.05, "all-linear"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(str(paths.adapter))
    modeling.load_tokenizer(str(paths.model)).save_pretrained(str(paths.adapter))
    del model
    free_memory(device)


def test_queries(paths: Paths, tokenizer, count: int) -> list[str]:
    from qexpand import data
    from qexpand.prompt import truncate_query

    return [truncate_query(tokenizer, data.normalise_whitespace(t.query), 64)[0] for t in test_topics(paths, count)]


def generate(model, tokenizer, queries: list[str], new_tokens: int, device: str, graphed: bool | None) -> dict:
    """generate_descriptions as the test script calls it (one batch of up to 64 queries, greedy); graphed:
    through the CUDA-graph decoder of qexpand.accel, None: on CUDA, as the test script does."""
    import contextlib

    from qexpand.accel.graphed_decoding import graphed_greedy_decoding
    from qexpand.generation import generate_descriptions
    from qexpand.prompt import PROMPT_TEMPLATE

    graphed = device == "cuda" if graphed is None else graphed
    with graphed_greedy_decoding() if graphed else contextlib.nullcontext(None) as decoder:
        generations, seconds = timed(lambda: generate_descriptions(
            model, tokenizer, PROMPT_TEMPLATE, queries, batch_size=64, max_new_tokens=new_tokens, progress=False,
            greedy_decoder=decoder), device)
    tokens = sum(g[0].new_tokens for g in generations)
    return {"seconds": round(seconds, 3), "prompts": len(queries), "new_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "ended_at_eos": sum(g[0].ended_at_eos for g in generations),
            "texts": [g[0].text for g in generations]}


def generate_one_by_one(model, tokenizer, queries: list[str], count: int, new_tokens: int, device: str) -> dict:
    """The original way: one prompt per generate() call; `count` timed, scaled to all queries."""
    import torch

    from qexpand.prompt import PROMPT_TEMPLATE, format_prompt

    def run():
        for query in queries[:count]:
            inputs = tokenizer(format_prompt(PROMPT_TEMPLATE, query), return_tensors="pt").to(device)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)

    _, seconds = timed(run, device)
    measured = min(count, len(queries))
    return {"measured_prompts": measured, "measured_seconds": round(seconds, 3),
            "seconds": round(seconds * len(queries) / measured, 3), "prompts": len(queries)}


def agreement(a: dict, b: dict) -> dict:
    """Rows with the same text, and the mean share of each text before the first difference (random
    weights make near-ties common, so two numerically different forms part ways early)."""
    import os.path

    pairs = list(zip(a["texts"], b["texts"]))
    shared = [len(os.path.commonprefix([x, y])) / max(len(x), len(y), 1) for x, y in pairs]
    return {"identical_rows": sum(x == y for x, y in pairs), "rows": len(pairs),
            "mean_shared_prefix": round(sum(shared) / len(shared), 3)}


def stage_generate(opts, paths: Paths) -> dict:
    from qexpand import generation, modeling

    device = resolve_device(opts.device)
    make_adapter(paths, device)
    tokenizer = modeling.load_tokenizer(str(paths.adapter))
    queries = test_queries(paths, tokenizer, opts.test_queries)
    new = opts.gen_new_tokens
    result = {"new_tokens_cap": new, "prompts": len(queries)}

    # Today: NF4 base, LoRA layers cast to bf16, the library's generate.
    model, load_s = timed(lambda: generation.load_with_adapter(
        str(paths.model), None, paths.adapter, device, "nf4", "bf16"), device)
    generate(model, tokenizer, queries[:2], 4, device, graphed=False)  # warm-up: CUDA kernels, bnb state
    result["today"] = {"load_s": round(load_s, 2), **generate(model, tokenizer, queries, new, device, False)}
    result["nf4_graphed"] = generate(model, tokenizer, queries, new, device, graphed=True)
    result["original"] = generate_one_by_one(model, tokenizer, queries, opts.original_gen_prompts, new, device)
    del model
    free_memory(device)
    reset_peak(device)

    # The new default: whatever choose_generation_form picks for this GPU.
    form = generation.choose_generation_form(device, "auto", "nf4", str(paths.model), None)
    model, load_s = timed(lambda: generation.load_with_adapter(
        str(paths.model), None, paths.adapter, device, form.quantization, "bf16"), device)
    if form.merged:
        model, merge_s = timed(model.merge_and_unload, device)
        result["merge_s"] = round(merge_s, 3)
    generate(model, tokenizer, queries[:2], 4, device, graphed=False)
    result["form"] = {"quantization": form.quantization, "merged": form.merged, "reason": form.reason}
    result["default"] = {"load_s": round(load_s, 2), **generate(model, tokenizer, queries, new, device, None)}
    result["default_again"] = generate(model, tokenizer, queries, new, device, None)
    result["default_without_graphs"] = generate(model, tokenizer, queries, new, device, graphed=False)
    result["peak_gb"] = gpu_gb(device, peak=True)
    result["agreement"] = {
        "default_vs_today": agreement(result["default"], result["today"]),
        "default_vs_default_without_graphs": agreement(result["default"], result["default_without_graphs"]),
        "nf4_graphed_vs_today": agreement(result["nf4_graphed"], result["today"]),
    }
    return result
