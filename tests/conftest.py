"""Shared fixtures: offline topic files, a tiny Mistral model, and a helper to run the scripts."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import mistral_tokenizer_folder, tiny_mistral_folder, write_topic_files

REPO = Path(__file__).resolve().parent.parent
ROBUST04 = "disks45/nocr/trec-robust-2004"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_mistral_folder(tmp_path_factory.mktemp("tiny-mistral"))


# The session's Mistral tokenizer, its state as built and a copy as built (mistral_tokenizer), for the
# check after each test.
BUILT_TOKENIZER: dict = {}


def tokenizer_state(tokenizer) -> dict:
    """What a test could change on a tokenizer: its Python attributes (padding and truncation side, special
    tokens, maximum length, vocabulary, ...) and its backend (vocabulary, added tokens, normalizer,
    pre-tokenizer, post-processor, decoder). Left out: the backend's truncation and padding, which every
    call sets anew, and the library's own bookkeeping of warnings given and of an open context manager."""
    transient = ("_tokenizer", "deprecation_warnings", "_in_target_context_manager")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for per_call in ("truncation", "padding"):
        backend.pop(per_call, None)
    return {"attributes": {k: repr(v) for k, v in vars(tokenizer).items() if k not in transient},
            "backend": backend}


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """The real Mistral-7B tokenizer with the pad token training uses, shared by the whole session: a test
    must leave it as built (checked after each test that uses it, `mistral_tokenizer_left_as_built`); a
    test that changes it (say, its padding side) takes `own_mistral_tokenizer`."""
    from transformers import AutoTokenizer

    from qexpand.modeling import choose_pad_token

    tokenizer = AutoTokenizer.from_pretrained(str(mistral_tokenizer_folder(tmp_path_factory.mktemp("tok"))))
    choose_pad_token(tokenizer)
    BUILT_TOKENIZER.update(tokenizer=tokenizer, state=tokenizer_state(tokenizer), copy=copy.deepcopy(tokenizer))
    return tokenizer


@pytest.fixture()
def own_mistral_tokenizer(mistral_tokenizer):
    """A copy of the session's tokenizer for this test alone, to change at will."""
    return copy.deepcopy(mistral_tokenizer)


@pytest.fixture(autouse=True)
def mistral_tokenizer_left_as_built(request):
    """After each test that had the session's tokenizer (directly or through another fixture): it is as
    built, or the test fails here, naming what changed (other tests would see the change, depending on
    the order they run in); the tokenizer is then put back as built, so that only that test fails."""
    yield
    if "mistral_tokenizer" not in request.fixturenames or "tokenizer" not in BUILT_TOKENIZER:
        return
    tokenizer = BUILT_TOKENIZER["tokenizer"]
    built, now = BUILT_TOKENIZER["state"], tokenizer_state(tokenizer)
    if now != built:
        vars(tokenizer).clear()
        vars(tokenizer).update(vars(copy.deepcopy(BUILT_TOKENIZER["copy"])))
        assert tokenizer_state(tokenizer) == built
        changed = sorted(k for k in {*built["attributes"], *now["attributes"]}
                         if built["attributes"].get(k) != now["attributes"].get(k))
        if now["backend"] != built["backend"]:
            changed.append("the backend tokenizer")
        pytest.fail(f"{request.node.nodeid} changed the session's mistral_tokenizer ({', '.join(changed)}); "
                    "a test that changes it takes own_mistral_tokenizer, a copy of its own", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def ir_datasets_home(tmp_path_factory) -> Iterator[Path]:
    """The one folder ir_datasets reads topic files from in this test process.

    ir_datasets fixes every data set's file paths from IR_DATASETS_HOME when it is first imported and
    never looks at the variable again, so a test that set it after an earlier test had imported
    ir_datasets read another folder. It is imported here, before any test, under a folder of the test
    session (never the user's own cache); tests put their topic files there through topics_home.
    """
    home = tmp_path_factory.mktemp("ir_datasets_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IR_DATASETS_HOME", str(home))
        import ir_datasets

        from qexpand import data

        reads = Path(data._wanted_files(ir_datasets.load(ROBUST04).queries_handler())[0][0])
        if not reads.is_relative_to(home):
            pytest.exit(f"ir_datasets was imported before the tests began and reads {reads}; the tests "
                        "need it to read a folder of their own", returncode=3)
        yield home


@pytest.fixture()
def topics_home(ir_datasets_home) -> Path:
    """IR_DATASETS_HOME holding only the three default topic sets (synthetic, 41 topics).

    Always the session's folder that ir_datasets reads (see ir_datasets_home), emptied first, so each
    test starts from the same files whatever ran before it.
    """
    shutil.rmtree(ir_datasets_home)
    ir_datasets_home.mkdir()
    write_topic_files(ir_datasets_home)
    return ir_datasets_home


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
