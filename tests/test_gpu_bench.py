"""The GPU benchmark's build and generation stages on the CPU (2-layer Mistral): the code path the
GPU run takes, minus the CUDA-only calls; and the arithmetic of the N-vs-3N training rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


TIMED_FORMS = ("today", "nf4_graphed", "default", "default_again", "default_without_graphs")


def test_tiny_generation_stage_times_every_form(tmp_path, topics_home):
    from bench.gpu_generate import agreement

    out = tmp_path / "gpu.json"
    prompts, cap = 6, 4
    command = [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--tiny", "--stages", "generate",
               "--topics-home", str(topics_home), "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--test-queries", str(prompts), "--gen-new-tokens", str(cap)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    on_gpu = report["stages"]["build"]["device"] == "cuda"
    generate = report["stages"]["generate"]
    assert (generate["prompts"], generate["new_tokens_cap"]) == (prompts, cap)
    assert set(report["generate_35_s"]) == {*TIMED_FORMS, "original"}
    for form in TIMED_FORMS:
        timing = generate[form]
        seconds, tokens = timing["seconds"], timing["new_tokens"]
        assert isinstance(seconds, float) and seconds > 0, form
        assert report["generate_35_s"][form] == seconds  # the headline is the stage's figure
        assert timing["prompts"] == prompts and 0 <= timing["ended_at_eos"] <= prompts, form
        # Every row makes at least one token and at most the cap (random weights rarely stop early).
        assert prompts <= tokens <= prompts * cap, form
        assert len(timing["texts"]) == prompts and all(isinstance(t, str) for t in timing["texts"]), form
        # tokens_per_s is tokens over the unrounded seconds (rounded to 0.1); seconds is rounded to 1 ms.
        assert tokens / (seconds + 5e-4) - 0.05 <= timing["tokens_per_s"] <= tokens / max(seconds - 5e-4, 1e-9) + 0.05
    for form in ("today", "default"):
        assert isinstance(generate[form]["load_s"], float) and generate[form]["load_s"] >= 0
    original = generate["original"]
    measured = original["measured_prompts"]
    assert measured == min(report["options"]["original_gen_prompts"], prompts) and original["prompts"] == prompts
    # Scaled from the measured prompts to all of them (each figure rounded to 1 ms).
    assert original["seconds"] == pytest.approx(original["measured_seconds"] * prompts / measured,
                                                abs=1e-3 * (1 + prompts / measured))
    assert report["generate_35_s"]["original"] == original["seconds"]
    gen = report["generate_35_s"]
    assert report["ratios"] == {f"generate_{slow}_over_default_s": round(gen[slow] / gen["default"], 2)
                                for slow in ("today", "original", "default_without_graphs")}
    # The form the test script would pick: as trained (4-bit) on the CPU; merged in bf16 where a GPU has room.
    form = generate["form"]
    assert report["generation_form"] == form and isinstance(form["reason"], str) and form["reason"]
    assert ("merge_s" in generate) == form["merged"]
    if on_gpu:
        assert form["quantization"] in ("nf4", "none") and form["merged"] == (form["quantization"] == "none")
        assert isinstance(generate["peak_gb"], float) and generate["peak_gb"] > 0
    else:
        assert (form["quantization"], form["merged"]) == ("nf4", False) and generate["peak_gb"] is None
    # Agreement figures are those of the texts reported, and in range.
    pairs = {"default_vs_today": ("default", "today"), "nf4_graphed_vs_today": ("nf4_graphed", "today"),
             "default_vs_default_without_graphs": ("default", "default_without_graphs")}
    assert report["generation_agreement"] == generate["agreement"] and set(generate["agreement"]) == set(pairs)
    for name, (a, b) in pairs.items():
        figures = generate["agreement"][name]
        assert figures == agreement(generate[a], generate[b]), name
        assert figures["rows"] == prompts and 0 <= figures["identical_rows"] <= prompts, name
        assert 0 <= figures["mean_shared_prefix"] <= 1, name
        assert (figures["identical_rows"] == prompts) <= (figures["mean_shared_prefix"] == 1.0), name
    # One model, the same greedy decoding twice: the same texts.
    assert generate["default_again"]["texts"] == generate["default"]["texts"]
    if not on_gpu:  # no CUDA graphs on the CPU: "default" decodes as "default_without_graphs" does
        assert generate["agreement"]["default_vs_default_without_graphs"]["identical_rows"] == prompts
    # Token identity of the graphed decoder is tested in float32 in test_graphed_generation.py; the NF4
    # path computes in bf16, where a random model's near-tied logits can flip, so it is compared row by row.


def fake_training_runs(monkeypatch, seconds: dict) -> list:
    """training.py runs replaced by their finished.json: `seconds` maps examples to train_seconds."""
    from bench.recipes import project

    calls = []

    def timed_run(opts, paths, name, count, flags, left_s, epochs=1):
        calls.append((name, count, flags, epochs))
        finished = {"train_seconds": seconds[count], "peak_gpu_memory_gb": 6.5, "best_eval_loss": 1.0}
        return {"examples": count, "tokens": 70 * count, "wall_s": seconds[count] + 20, "finished": finished,
                "logged": {"samples_per_s": 40.0}, "config": SimpleNamespace(gradient_checkpointing="on", batch_size=32, grad_accum=1, optimizer="adamw")}

    monkeypatch.setattr(project, "timed_run", timed_run)
    return calls


def test_training_rate_counts_every_epoch_after_one_warm_up(tmp_path, monkeypatch):
    from bench.recipes import project

    calls = fake_training_runs(monkeypatch, {32: 5.0, 93: 7.5, 279: 22.5})
    opts, paths = SimpleNamespace(train_examples=280), SimpleNamespace(work=tmp_path)
    first = project.throughput(opts, paths, "default", [], 93, lambda: 100.0, epochs=3)
    again = project.throughput(opts, paths, "default", [], 93, lambda: 100.0, epochs=3)
    # 3 epochs x 186 more examples in 15 more seconds
    assert first["samples_per_s"] == again["samples_per_s"] == 37.2
    assert first["real_tokens_per_s"] == 2604.0
    assert first["warm_up"] == {"train_seconds": 5.0, "wall_s": 25.0} and again["warm_up"] is None
    assert [c[:2] for c in calls] == [("warm-up", 32), ("default", 93), ("default", 279), ("default", 93),
                                      ("default", 279)]


def test_the_stock_variant_trains_training_py_with_stock_and_is_reported_as_a_ratio(tmp_path, monkeypatch):
    from bench import gpu_report
    from bench.recipes import project

    calls = fake_training_runs(monkeypatch, {32: 5.0, 93: 15.0, 279: 45.0})
    opts, paths = SimpleNamespace(train_examples=280), SimpleNamespace(work=tmp_path)
    stock = project.run_default(opts, paths, lambda: 100.0, "default-stock")
    assert [c[2] for c in calls if c[0] == "default-stock"] == [["--stock"], ["--stock"]]
    assert stock["samples_per_s"] == 18.6
    report = {"train_samples_per_s": {"default": 93.0, "default_stock": stock["samples_per_s"]},
              "generate_35_s": {}}
    assert gpu_report.ratios(report) == {"default_over_default_stock_train_samples_per_s": 5.0}


def test_abba_order_pools_both_pairs_and_reads_rates_off_the_step_times(tmp_path, monkeypatch):
    from bench import multi_gpu

    # Logged step times: 1 GPU 0.6 s a step (32 samples), 2 GPUs 0.7 s (64 samples); the host is 10%
    # faster for the second pair. Each run also spends 5 s outside its steady steps.
    order = []

    def train(paths, opts, processes, copies, epochs, suffix=""):
        order.append((processes, copies, suffix))
        examples = 280 * copies * epochs
        steps = examples // (32 * processes)
        step_s = (0.6 if processes == 1 else 0.7) / (1.1 if suffix in ("-b2", "-a2") else 1.0)
        return {"examples": examples, "global_steps": steps, "train_seconds": 5 + steps * step_s,
                "logged": {"mean_step_s": step_s, "samples_per_s": 32 * processes / step_s}}

    monkeypatch.setattr(multi_gpu, "train", train)
    monkeypatch.setattr(multi_gpu, "warm_up_once", lambda *args: None)
    args = SimpleNamespace(gpus=2, repeat=8, abba=4, epochs=3, out=str(tmp_path / "r.json"))
    result = multi_gpu.abba_scaling(args, SimpleNamespace(), SimpleNamespace())
    assert order == [(1, 8, "-a1"), (2, 8, "-b1"), (2, 4, "-b2"), (1, 4, "-a2")]
    ideal = round(2 * 0.6 / 0.7, 3)  # twice the samples per step, each step 0.7 / 0.6 as long
    assert result["speedup_per_step"] == {"first_pair": ideal, "second_pair": ideal, "pooled": ideal}
    assert result["drift"] == {"one_gpu": 1.1, "several_gpus": 1.1}
    a1 = result["runs"]["a1"]
    assert a1["fixed_share"] == round(5 / a1["train_seconds"], 3)
    end_to_end = result["speedup_end_to_end"]
    assert end_to_end["first_pair"] < ideal  # the fixed 5 s weigh more on the shorter 2-GPU run
    # They weigh more still on the shorter second pair; pooled, the two pairs' time counts together.
    assert end_to_end["second_pair"] < end_to_end["pooled"] < end_to_end["first_pair"]
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["a2"]["global_steps"] == 105


def test_step_times_are_read_off_the_loss_log(tmp_path):
    from bench.gpu_common import logged_rate, logged_step_seconds

    # Step 1 carries the start-up; an eval pass (and checkpoint save) follows step 3.
    log = [{"loss": 2.0, "step": 1, "elapsed_s": 40.0}, {"loss": 2.0, "step": 2, "elapsed_s": 40.5},
           {"loss": 2.0, "step": 3, "elapsed_s": 41.0}, {"eval_loss": 2.0, "step": 3, "elapsed_s": 42.0},
           {"loss": 2.0, "step": 4, "elapsed_s": 43.0}, {"loss": 2.0, "step": 5, "elapsed_s": 43.5},
           {"loss": 2.0, "step": 6, "elapsed_s": 44.25}, {"train_loss": 2.0, "step": 6, "elapsed_s": 44.3}]
    (tmp_path / "loss_log.json").write_text(json.dumps(log))
    assert logged_step_seconds(tmp_path) == [0.5, 0.75]  # steps 5 and 6 only
    assert logged_rate(tmp_path, 192, 6) == {"steps_read": 2, "mean_step_s": 0.625, "samples_per_s": 51.2}
    (tmp_path / "loss_log.json").write_text(json.dumps(log[:1]))
    assert logged_rate(tmp_path, 32, 1) is None  # a one-step warm-up has no steady steps


def test_a_host_that_slows_during_a_run_shows_in_its_thirds():
    from bench.multi_gpu import by_third

    # Seven steady steps: the middle part takes what the two equal outer thirds leave.
    assert by_third([0.3, 0.3, 0.4, 0.4, 0.4, 0.5, 0.5]) == [0.3, 0.4, 0.5]
    assert by_third([0.3, 0.3]) == []  # too few steps for three parts


def test_dealt_batches_make_the_slowest_of_two_cost_more_on_few_topics_and_balanced_ones_do_not():
    import random

    from bench.multi_gpu import slowest_batch_tokens

    for balanced in (False, True):  # equal lengths: nothing to wait for
        assert slowest_batch_tokens([40] * 256, 32, 2, 1, 0, balanced) == 32 * 40
    lengths = [random.Random(i).randint(52, 118) for i in range(280)]
    one, dealt, balanced = (slowest_batch_tokens(lengths, 32, n, 3, 0, cut) for n, cut in
                            ((1, False), (2, False), (2, True)))
    # Dealt out, two processes take two neighbouring batches of the sorted order per step and wait
    # for the longer one; one process averages both. Cut by padded tokens, neither waits long.
    assert dealt > 1.1 * one and balanced < 1.02 * one
    many = lengths * 10  # bigger sorted windows: neighbouring batches differ less
    assert slowest_batch_tokens(many, 32, 2, 3, 0, False) / slowest_batch_tokens(many, 32, 1, 3, 0, False) < dealt / one


def test_stages_run_most_needed_first_unless_asked_to_keep_the_given_order():
    from bench.gpu_bench import build_parser, planned_stages, resolve_options

    def planned(*flags):
        return planned_stages(resolve_options(build_parser().parse_args(["--stages", "train", *flags])))

    abba = "default-peft,default,default-again,default-peft-again"
    assert planned("--recipes", abba) == ["train-default", "train-default-peft", "train-default-again",
                                          "train-default-peft-again"]
    assert planned("--recipes", abba, "--in-order") == [f"train-{r}" for r in abba.split(",")]
