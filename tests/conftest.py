"""Shared fixtures: offline topic files, a tiny Mistral model, and a helper to run the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import mistral_tokenizer_folder, tiny_mistral_folder, write_topic_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_mistral_folder(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from qexpand.modeling import choose_pad_token

    tokenizer = AutoTokenizer.from_pretrained(str(mistral_tokenizer_folder(tmp_path_factory.mktemp("tok"))))
    choose_pad_token(tokenizer)
    return tokenizer


@pytest.fixture()
def topics_home(tmp_path, monkeypatch) -> Path:
    """A fresh IR_DATASETS_HOME with the three default topic sets (synthetic, 41 topics)."""
    home = tmp_path / "irds"
    write_topic_files(home)
    monkeypatch.setenv("IR_DATASETS_HOME", str(home))
    return home


def run_script(script: str, *args, home: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the two entry-point scripts as a user would, offline."""
    env = {**os.environ, "IR_DATASETS_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time, to prove nothing changed."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}
