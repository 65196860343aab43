"""Tokenizers, text to ids and back: UTF-8 bytes, characters, or a Hugging Face tokenizer.json."""
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {vocab_size}")
    return ids


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are the tokens: a vocabulary of 256 and nothing to learn."""

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        # a sample can stop mid-character; show that as U+FFFD rather than fail
        return bytes(_check_ids(ids, 256)).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": "byte"})


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One token per character of a vocabulary built from the text, sorted by code point."""

    chars: tuple[str, ...]

    def __post_init__(self):
        chars = self.chars
        if not chars or list(chars) != sorted(set(chars)) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer.chars must be distinct single characters in sorted order")

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "CharTokenizer":
        codes = np.unique(np.concatenate([_code_points(t) for t in texts]))
        return cls(tuple(chr(c) for c in codes))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self._encode_text(text).tolist()

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        return self._encode_text(raw.decode("utf-8"))

    def _encode_text(self, text: str) -> np.ndarray:
        # chars are sorted by code point, so a binary search finds every id at numpy speed
        table = np.array([ord(c) for c in self.chars], np.uint32)
        codes = _code_points(text)
        ids = np.minimum(np.searchsorted(table, codes), len(table) - 1)
        unknown = table[ids] != codes
        if unknown.any():
            raise ValueError(f"character {chr(codes[unknown][0])!r} is not in the char vocabulary "
                             f"built from data.path")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, len(self.chars)))

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": "".join(self.chars)})


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def import_tokenizers_library():
    """The optional `tokenizers` library, or a ValueError that says how to install it."""
    try:
        import tokenizers
    except ImportError as error:
        raise ValueError("data.tokenizer: reading a tokenizer.json needs the `tokenizers` library; "
                         "pip install tokenizers (or pip install -e '.[dev]')") from error
    return tokenizers


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer.json, kept whole so a run directory can decode without the original file."""

    spec: str  # the tokenizer.json contents
    # parsed once from `spec` and never changed: a derived value, not state
    _tokenizer: object = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_tokenizer", import_tokenizers_library().Tokenizer.from_str(self.spec))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # no special tokens: the model is trained on plain streams of text
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        return np.asarray(self.encode(raw.decode("utf-8")), np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": "hf", "spec": self.spec})


Tokenizer = ByteTokenizer | CharTokenizer | HFTokenizer


def tokenizer_from_json(text: str) -> Tokenizer:
    """The inverse of `tokenizer.to_json()`: how a run directory's tokenizer comes back, without pickle."""
    saved = json.loads(text)
    kind = saved.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(tuple(saved["chars"]))
    if kind == "hf":
        return HFTokenizer(saved["spec"])
    raise ValueError(f"unknown saved tokenizer kind {kind!r}; expected 'byte', 'char' or 'hf'")


def read_tokenizer_spec(tokenizer: str) -> str:
    """'byte', 'char', or the tokenizer.json contents: what data.tokenizer means to the cache key."""
    if tokenizer in ("byte", "char"):
        return tokenizer
    path = pathlib.Path(tokenizer).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer={tokenizer!r} does not exist; "
                                f"point it at a Hugging Face tokenizer.json, or use 'byte' or 'char'")
    return path.read_text(encoding="utf-8")
