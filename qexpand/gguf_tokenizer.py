"""Gemma's tokenizer rebuilt from the SentencePiece vocabulary that its GGUF file carries.

transformers converts a Gemma GGUF's tokenizer wrongly (it makes a Unigram model of a BPE
vocabulary), so the model sees token ids it was never trained on. The GGUF's metadata holds the
whole SentencePiece vocabulary (`tokenizer.ggml.tokens`, `.scores`, `.token_type`) and the special
token ids; this module turns them back into the SentencePiece model Gemma was trained with and
loads that as a transformers tokenizer.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

from qexpand.errors import UserError

GGUF_MAGIC = b"GGUF"
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# GGUF metadata value types (the GGUF specification's gguf_metadata_value_type) with the struct
# format of each fixed-size one; all little-endian.
GGUF_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING = 8
GGUF_ARRAY = 9

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type) are SentencePiece's piece types:
# 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. 0 ("undefined") counts as normal.
NORMAL, UNKNOWN, USER_DEFINED, BYTE = 1, 2, 4, 6
KNOWN_TOKEN_TYPES = {1, 2, 3, 4, 5, 6}

TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
)


class GGUFMetadataReader:
    """Reads the key/value metadata at the start of a GGUF file, without touching the tensors.

    Layout (GGUF versions 2 and 3): magic "GGUF", uint32 version, uint64 tensor count, uint64
    key/value count, then the pairs: key as a string (uint64 byte length + UTF-8), uint32 value type,
    value. An array is uint32 element type, uint64 length, elements. Values not asked for are
    skipped, so finding `general.architecture` (written first) costs microseconds, and reading the
    262,144-piece vocabulary a fraction of a second (gguf.GGUFReader takes ~10 s, as it parses
    every tensor's description as well).
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            try:
                self.buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                self.buffer = b""
        self.offset = 0

    def close(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()

    def _unpack(self, fmt: str) -> tuple:
        """Values of the little-endian struct format `fmt` at the offset, which moves past them."""
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.buffer):
            raise struct.error("a string runs past the end of the file")
        return bytes(self.buffer[start:self.offset]).decode("utf-8")

    def _value(self, value_type: int, keep: bool):
        """The next value, or None when it is only stepped over (`keep` false)."""
        if value_type == GGUF_STRING:
            text = self._string()
            return text if keep else None
        if value_type == GGUF_ARRAY:
            element_type, count = self._unpack("IQ")
            if element_type in GGUF_SCALAR_FORMATS:
                fmt = f"{count}{GGUF_SCALAR_FORMATS[element_type]}"
                if keep:
                    return list(self._unpack(fmt))
                self.offset += struct.calcsize("<" + fmt)
                if self.offset > len(self.buffer):
                    raise struct.error("an array runs past the end of the file")
                return None
            values = [self._value(element_type, keep) for _ in range(count)]
            return values if keep else None
        if value_type not in GGUF_SCALAR_FORMATS:
            raise struct.error(f"unknown metadata value type {value_type}")
        (value,) = self._unpack(GGUF_SCALAR_FORMATS[value_type])
        return value if keep else None

    def read(self, wanted: set[str], stop_when_found: bool = False) -> dict:
        """The values of the `wanted` keys that the file has (all pairs are walked unless told to
        stop as soon as every wanted key was found)."""
        found: dict = {}
        try:
            if bytes(self.buffer[:4]) != GGUF_MAGIC:
                raise _not_gguf(self.path, "it does not start with the GGUF magic bytes")
            self.offset = 4
            version, _tensor_count, pair_count = self._unpack("IQQ")
            if version not in (2, 3):
                raise _not_gguf(self.path, f"GGUF version {version} is not supported (only 2 and 3)")
            for _ in range(pair_count):
                key = self._string()
                (value_type,) = self._unpack("I")
                value = self._value(value_type, keep=key in wanted)
                if key in wanted:
                    found[key] = value
                    if stop_when_found and len(found) == len(wanted):
                        break
        except (struct.error, UnicodeDecodeError, OverflowError) as error:
            raise _not_gguf(self.path, f"its metadata could not be read ({error})") from None
        return found


def _not_gguf(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is not a GGUF model file that can be read: {reason}. Pass a complete GGUF "
                     "file with --gguf-file (re-download or re-assemble it if it was cut short).")


def read_gguf_metadata(gguf_path: str | Path, keys, stop_when_found: bool = False) -> dict:
    reader = GGUFMetadataReader(Path(gguf_path))
    try:
        return reader.read(set(keys), stop_when_found=stop_when_found)
    finally:
        reader.close()


def gguf_path_of(model_folder: str, gguf_file: str) -> Path:
    """Where --gguf-file points: an absolute path, or a file inside the --model folder."""
    return Path(gguf_file) if os.path.isabs(gguf_file) else Path(model_folder) / gguf_file


def is_gemma_gguf(model_folder: str, gguf_file: str) -> bool:
    """Whether the GGUF file holds a Gemma model, from `general.architecture` (read from the header
    only). False for files that are not there or not GGUF: loading them reports that later."""
    path = gguf_path_of(model_folder, gguf_file)
    if not path.is_file():
        return False
    try:
        metadata = read_gguf_metadata(path, ["general.architecture"], stop_when_found=True)
    except (UserError, OSError):
        return False
    return metadata.get("general.architecture") in GEMMA_ARCHITECTURES


def sentencepiece_model_from_gguf(gguf_path: str | Path) -> bytes:
    """The serialized SentencePiece ModelProto rebuilt from a Gemma GGUF's tokenizer metadata."""
    path = Path(gguf_path)
    return _sentencepiece_model(_tokenizer_metadata(path)).SerializeToString()


def _tokenizer_metadata(path: Path) -> dict:
    """The GGUF's tokenizer keys, checked to describe a SentencePiece vocabulary."""
    metadata = read_gguf_metadata(path, TOKENIZER_KEYS)
    pieces = metadata.get("tokenizer.ggml.tokens") or []
    if metadata.get("tokenizer.ggml.model") != "llama" or not pieces:
        raise UserError(
            f"{path} holds no SentencePiece vocabulary (its tokenizer.ggml.model is "
            f"'{metadata.get('tokenizer.ggml.model')}', not 'llama'), so its tokenizer cannot be rebuilt from it. "
            "Pass a Gemma GGUF file converted by llama.cpp, or a model folder with its own tokenizer files."
        )
    scores = metadata.get("tokenizer.ggml.scores") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    if len(scores) != len(pieces) or len(types) != len(pieces):
        raise _not_gguf(path, f"its vocabulary has {len(pieces)} tokens but {len(scores)} scores and "
                              f"{len(types)} token types")
    if len(set(pieces)) != len(pieces):
        raise _not_gguf(path, "its vocabulary holds the same token twice")
    unknown_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unknown_id is None or not 0 <= unknown_id < len(pieces):
        raise _not_gguf(path, "its tokenizer names no unknown token (tokenizer.ggml.unknown_token_id)")
    return metadata


def _special_token_ids(metadata: dict) -> dict[str, int]:
    """bos/eos/unk/pad -> token id, for those the GGUF names and its vocabulary has."""
    size = len(metadata["tokenizer.ggml.tokens"])
    ids = {role: metadata.get(f"tokenizer.ggml.{key}_token_id")
           for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    return {role: token_id for role, token_id in ids.items() if token_id is not None and 0 <= token_id < size}


def _sentencepiece_model(metadata: dict):
    from sentencepiece import sentencepiece_model_pb2 as spm_proto

    pieces = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    special_ids = _special_token_ids(metadata)
    model = spm_proto.ModelProto()
    for token_id, (piece, score, token_type) in enumerate(zip(pieces, metadata["tokenizer.ggml.scores"], types)):
        if token_type not in KNOWN_TOKEN_TYPES:
            token_type = NORMAL
        if token_type == USER_DEFINED:
            # llama.cpp's converter writes the spaces of Gemma's whitespace-run pieces ("▁▁") as real
            # spaces; SentencePiece matches pieces against text whose spaces are already escaped as ▁.
            piece = piece.replace(" ", "▁")
        if token_id == special_ids["unk"]:
            # SentencePiece needs exactly one piece of type UNKNOWN; llama.cpp marks <unk> as control.
            token_type = UNKNOWN
        model.pieces.add(piece=piece, score=score, type=token_type)

    trainer = model.trainer_spec
    # llama.cpp's "llama" (SentencePiece) tokenizer merges like SentencePiece BPE: again and again the
    # adjacent pair whose joined piece scores highest. Gemma's own tokenizer is such a BPE model.
    trainer.model_type = spm_proto.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = BYTE in types  # characters without a piece become <0x..> byte pieces
    # SentencePiece finds its special tokens by these piece names; -1 where the GGUF names none.
    for role in ("bos", "eos", "unk", "pad"):
        setattr(trainer, f"{role}_id", special_ids.get(role, -1))
        if role in special_ids:
            setattr(trainer, f"{role}_piece", model.pieces[special_ids[role]].piece)

    normalizer = model.normalizer_spec
    normalizer.name = "identity"  # no NFKC: Gemma's tokenizer keeps every character as it is
    # Gemma's tokenizers add no space before the text (their GGUFs say add_space_prefix = false).
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False  # runs of spaces, tabs and newlines are tokens of their own
    normalizer.escape_whitespaces = True  # spaces become ▁ before matching pieces, as in the vocabulary
    return model


def gemma_tokenizer_from_gguf(model_folder: str, gguf_file: str):
    """A transformers GemmaTokenizer (fast) equal to the SentencePiece tokenizer in a Gemma GGUF.

    It adds BOS (and EOS only where the GGUF says so), and its bos/eos/unk/pad ids are the GGUF's.
    Built afresh each time, in about 3-5 s, nothing cached: loading a saved tokenizer.json of it takes
    as long, as the time goes to transformers setting up the 262,144 pieces and their merges.
    """
    from transformers import GemmaTokenizer

    path = gguf_path_of(model_folder, gguf_file)
    if not path.is_file():
        raise UserError(f"the GGUF file {path} does not exist. Check --model (the folder) and --gguf-file "
                        "(the file's name inside it, or its absolute path).")
    metadata = _tokenizer_metadata(path)
    # transformers ranks the BPE merges by vocabulary order (see below), SentencePiece by score: the
    # two agree only where the normal pieces come in falling score order, as in Gemma's vocabularies.
    normal_scores = [score for score, token_type in zip(metadata["tokenizer.ggml.scores"],
                                                        metadata["tokenizer.ggml.token_type"]) if token_type == NORMAL]
    if any(later > earlier for earlier, later in zip(normal_scores, normal_scores[1:])):
        raise UserError(
            f"the vocabulary in {path} is not ordered by score, so transformers cannot reproduce its "
            "SentencePiece tokenizer from it. Use a model folder with the model's own tokenizer files "
            "(tokenizer.json or tokenizer.model) instead of the GGUF's."
        )
    model = _sentencepiece_model(metadata)
    special_ids = _special_token_ids(metadata)
    pieces = [piece.piece for piece in model.pieces]
    special_tokens = {f"{role}_token": pieces[token_id] for role, token_id in special_ids.items()}
    # GemmaTokenizer adds "<mask>" to the vocabulary unless told there is none; Gemma's vocabularies have it.
    special_tokens["mask_token"] = "<mask>" if "<mask>" in pieces else None

    with tempfile.TemporaryDirectory(prefix="qexpand-gemma-tokenizer-") as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model.SerializeToString())
        # transformers turns the SentencePiece model into a tokenizers BPE with merges generated from
        # the vocabulary; it gives SentencePiece's own ids (tests/test_gemma_tokenizer.py checks this).
        tokenizer = GemmaTokenizer.from_pretrained(
            folder, **special_tokens,
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            clean_up_tokenization_spaces=False,  # decoding must give back the text exactly
        )
    # The temporary tokenizer.model is gone: save_pretrained must not record its path.
    tokenizer.init_kwargs.pop("vocab_file", None)

    found = {role: getattr(tokenizer, f"{role}_token_id") for role in special_ids}
    if found != special_ids or len(tokenizer) != len(pieces):
        raise UserError(
            f"the tokenizer rebuilt from {path} does not match its metadata (special token ids {found} instead "
            f"of {special_ids}, {len(tokenizer)} tokens instead of {len(pieces)}). Use a model folder with "
            "Gemma's own tokenizer files (tokenizer.json or tokenizer.model) instead of the GGUF's."
        )
    return tokenizer
