"""The GPU benchmark's report: headline keys from the stage results, the ratios, the printed table."""

from __future__ import annotations

GENERATION_KEYS = ("today", "default", "default_again", "default_without_graphs", "nf4_graphed", "original")


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
    generation = stages.get("generate", {})
    for key in GENERATION_KEYS:
        if key in generation:
            report["generate_35_s"][key] = generation[key]["seconds"]
    if "form" in generation:
        report["generation_form"] = generation["form"]
        report["generation_agreement"] = generation.get("agreement")
    scripts = stages.get("scripts", {})
    if scripts.get("training", {}).get("exit") == 0:
        report["training_py_wall_s"] = scripts["training"]["wall_s"]
    if scripts.get("testing", {}).get("exit") == 0:
        report["testing_py_wall_s"] = scripts["testing"]["wall_s"]
    report["ratios"] = ratios(report)


def ratios(report: dict) -> dict:
    out = {}
    rates = report["train_samples_per_s"]
    for peer in ("original", "trl", "unsloth", "default_stock"):
        if rates.get("default") and rates.get(peer):
            out[f"default_over_{peer}_train_samples_per_s"] = round(rates["default"] / rates[peer], 2)
    gen = report["generate_35_s"]
    for slow, fast in (("today", "default"), ("original", "default"), ("default_without_graphs", "default")):
        if gen.get(slow) and gen.get(fast):
            out[f"generate_{slow}_over_{fast}_s"] = round(gen[slow] / gen[fast], 2)
    return out


def print_table(report: dict) -> None:
    """The headline figures on the console (the JSON has everything)."""
    print(f"\nGPU: {report['gpu']}   versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    for key in ("train_samples_per_s", "real_tokens_per_s", "peak_gb", "mfu", "generate_35_s", "ratios"):
        print(f"{key}: " + ", ".join(f"{name} {value}" for name, value in report[key].items()))
    print(f"training.py wall {report.get('training_py_wall_s')} s; testing_finetuned_model.py wall "
          f"{report.get('testing_py_wall_s')} s; default generation form: {report.get('generation_form')}")
    for stage, error in report["errors"].items():
        print(f"ERROR in {stage}: {error.splitlines()[0][:300]}")
    for module, error in report.get("import_failures", {}).items():
        print(f"{module}: {error}")
