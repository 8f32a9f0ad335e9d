"""Offline test material: synthetic TREC topic files in ir_datasets' cache layout, and a tiny
random Mistral model that uses the real Mistral-7B tokenizer shipped in the mistral-common package."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

SUBJECTS = [
    "solar panels", "internet privacy", "coral reefs", "jazz history", "tax returns", "bird migration",
    "electric cars", "sleep apnea", "volcano eruptions", "chess openings", "organic farming",
    "bridge design", "wine regions", "space debris", "honey bees", "ancient rome", "glacier melt",
    "credit scores", "tea ceremony", "wind turbines", "vaccine safety", "river floods", "opera houses",
    "rail freight", "desert plants", "ocean tides", "video codecs", "public libraries", "sea turtles",
    "mountain rescue", "paper recycling", "noise pollution", "tidal energy", "city parks", "lighthouses",
    "fungi species", "water filters", "drone law", "salt mines", "comet tails",
]


def description_for(subject: str) -> str:
    return f"What are the main facts about {subject}\n   and where can one learn more?"


def _web2009_xml(subjects: list[str]) -> str:
    topics = "".join(
        f'<topic number="{i}" type="faceted">\n  <query>{s}</query>\n  <description>{description_for(s)}\n'
        f'  </description>\n  <subtopic number="1" type="inf">Anything on {s}.</subtopic>\n</topic>\n'
        for i, s in enumerate(subjects, start=1)
    )
    return f"<webtrack2009>\n{topics}</webtrack2009>\n"


def _sgml_topics(subjects: list[str], first_number: int) -> str:
    return "".join(
        f"<top>\n<num> Number: {n}\n<title> {s}\n\n<desc> Description:\n{description_for(s)}\n\n"
        f"<narr> Narrative:\nDocuments about {s} are relevant.\n</top>\n\n"
        for n, s in enumerate(subjects, start=first_number)
    )


def write_topic_files(home: Path, with_gov: bool = True) -> dict[str, int]:
    """Write the three default topic sets under `home` (an IR_DATASETS_HOME); returns the counts.

    The Robust04 stand-in repeats one query (as the real set does with "airport security").
    """
    home = Path(home)
    web = SUBJECTS[:12]
    robust = SUBJECTS[12:30] + [SUBJECTS[12]]  # one duplicated query text
    gov = SUBJECTS[30:40]
    (home / "clueweb09" / "trec-web-2009").mkdir(parents=True, exist_ok=True)
    (home / "clueweb09" / "trec-web-2009" / "queries.xml").write_text(_web2009_xml(web))
    (home / "disks45").mkdir(parents=True, exist_ok=True)
    with gzip.open(home / "disks45" / "04.testset.gz", "wt") as handle:
        handle.write(_sgml_topics(robust, 301))
    counts = {"clueweb09/catb/trec-web-2009": len(web), "disks45/nocr/trec-robust-2004": len(robust)}
    if with_gov:
        (home / "gov" / "trec-web-2002").mkdir(parents=True, exist_ok=True)
        with gzip.open(home / "gov" / "trec-web-2002" / "queries.txt.gz", "wt") as handle:
            handle.write(_sgml_topics(gov, 551))
        counts["gov/trec-web-2002"] = len(gov)
    return counts


def mistral_tokenizer_folder(folder: Path) -> Path:
    """A transformers tokenizer folder holding the real Mistral-7B-v0.1 SentencePiece model."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(source, folder / "tokenizer.model")
    # Mistral-7B-v0.1 puts BOS before every sequence, as its hub tokenizer_config says.
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_mistral_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer MistralForCausalLM with the real 32000-token vocabulary, saved with its tokenizer."""
    from bench.random_mistral import save_random_mistral

    mistral_tokenizer_folder(folder)
    save_random_mistral(Path(folder), tiny=True, seed=seed)
    return Path(folder)


def finished_run(run_dir: Path, model_folder: Path, split_json: dict) -> Path:
    """A finished run directory made the way training.py makes one, with an untrained LoRA adapter
    (its B matrices are zero), for tests of the test script's checks that need no training."""
    import json
    from dataclasses import asdict

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qexpand import modeling, runcheck
    from qexpand.config import TrainConfig
    from qexpand.recipes import settle_training

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    config = settle_training(TrainConfig(model=str(model_folder), device="cpu", run_name=run_dir.name,
                                         output_dir=str(run_dir.parent)))
    tokenizer = modeling.load_tokenizer(str(model_folder))
    tokenizer.save_pretrained(str(run_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_folder))
    lora = modeling.lora_config(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    get_peft_model(model, lora).save_pretrained(str(run_dir))
    texts = [config.prompt_template.format(query="internet privacy"), "What is online privacy?"]
    record = runcheck.RunRecord(config, modeling.model_signature(model.config),
                                runcheck.tokenizer_check(tokenizer, texts), 1, {}, "2026-01-01T00:00:00+00:00")
    (run_dir / "run_config.json").write_text(json.dumps(asdict(record)))
    (run_dir / "split.json").write_text(json.dumps(split_json))
    (run_dir / "finished.json").write_text(json.dumps({"finished_at": "2026-01-01T00:00:00+00:00"}))
    return run_dir


def trainable_lora(model):
    """A peft model in training mode with non-zero LoRA B matrices (peft starts them at zero, which would
    leave every path through them untested), drawn from a generator seeded per name."""
    import torch

    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    return model
