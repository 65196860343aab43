"""The data a run trains on: DataConfig, load_dataset, and the data names the rest of the code imports."""
import dataclasses
import pathlib

import numpy as np

from .batches import eval_batches, get_batch
from .sources import EXCLUDED_DIRS, Source, read_source, split_by_file, stdlib_files, stdlib_root
from .token_cache import (bin_stats, build_tokenizer, cache_folder, cache_key, encode_splits, open_entry,
                          read_entry, write_entry)
from .tokenizers import (ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, read_tokenizer_spec,
                         tokenizer_from_json)

BIN_DTYPES = ("uint16", "uint32")
TASKS = ("", "numbers_to_words")  # "": the text's next tokens; else a generated task


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tokens come from and how text becomes tokens."""

    path: str = ""  # "" = the Python standard library's own sources
    tokenizer: str = "byte"  # "byte" | "char" | a path to a Hugging Face tokenizer.json
    bin_dtype: str = "uint16"  # of a folder holding nanoGPT-style train.bin and val.bin
    val_fraction: float = 0.1
    cache_dir: str = ""  # "" = $HEADWISE_CACHE, else ~/.cache/headwise
    task: str = ""  # "" = next-token prediction on the text; "numbers_to_words": translation

    def __post_init__(self):
        for name in ("path", "tokenizer", "cache_dir", "task"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        if self.tokenizer not in ("byte", "char") and not self.tokenizer.endswith(".json"):
            raise ValueError(f"data.tokenizer must be 'byte', 'char' or a path to a tokenizer.json, "
                             f"got {self.tokenizer!r}")
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        if self.bin_dtype not in BIN_DTYPES:
            raise ValueError(f"data.bin_dtype must be one of {BIN_DTYPES}, got {self.bin_dtype!r}")
        value = self.val_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"data.val_fraction must be a number between 0 and 1 (exclusive), got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Token ids on disk (read-only memmaps), and what is needed to turn them back into text."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer | None  # None for .bin data given without a tokenizer.json
    vocab_size: int  # the caller's vocab_size when given, else the tokenizer's; every id is below it
    corpus_hash: str  # sha256 of the train then val token bytes, 12 hex digits
    description: str  # one line for the log


def load_dataset(cfg: DataConfig, *, vocab_size: int | None = None) -> Dataset:
    """Tokens for training and validation, encoded once into the cache and memory-mapped from there.

    `vocab_size` (the model's) is required for a train.bin/val.bin folder without a tokenizer.json,
    and every token id is checked against it here, before anything trains.
    """
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    folder = pathlib.Path(cfg.path).expanduser()
    if cfg.path and folder.is_dir() and any((folder / f"{s}.bin").exists() for s in ("train", "val")):
        return _load_bin(cfg, folder, vocab_size)
    return _load_text(cfg, vocab_size)


def _load_text(cfg: DataConfig, vocab_size: int | None) -> Dataset:
    source, spec = read_source(cfg.path), read_tokenizer_spec(cfg.tokenizer)
    cache, key = cache_folder(cfg.cache_dir), cache_key(source, spec, cfg.val_fraction)
    meta = read_entry(cache, key) or _encode_to_cache(cfg, source, spec, cache, key)
    tok = tokenizer_from_json(meta["tokenizer"])
    train, val = open_entry(cache, key, meta)
    vocab = vocab_size or tok.vocab_size
    _check_max_id(meta["max_id"], vocab, "data.tokenizer" if cfg.path else
                  "data.tokenizer, or set data.path: unset, it is the Python standard library's "
                  "sources")
    kind = cfg.tokenizer if cfg.tokenizer in ("byte", "char") else pathlib.Path(cfg.tokenizer).name
    line = _describe(source.name, f"{len(source.files)} files", train, val, f"{kind} vocab {tok.vocab_size}")
    return Dataset(train=train, val=val, tokenizer=tok, vocab_size=vocab,
                   corpus_hash=meta["corpus_hash"], description=line)


def _encode_to_cache(cfg: DataConfig, source: Source, spec: str, cache: pathlib.Path, key: str) -> dict:
    tok = build_tokenizer(spec, source)
    train, val = encode_splits(source, tok, cfg.val_fraction)
    for split, tokens in (("train", train), ("validation", val)):
        if not len(tokens):
            raise ValueError(f"data.path={cfg.path!r}: the {split} split is empty; add text, "
                             f"or change data.val_fraction")
    return write_entry(cache, key, train, val, tok)


def _load_bin(cfg: DataConfig, folder: pathlib.Path, vocab_size: int | None) -> Dataset:
    if cfg.tokenizer == "char":
        raise ValueError("data.tokenizer='char' builds its vocabulary from text, and train.bin/val.bin hold "
                         "none; use the tokenizer.json the .bin files were made with, or 'byte' for ids only")
    tok = HFTokenizer(read_tokenizer_spec(cfg.tokenizer)) if cfg.tokenizer.endswith(".json") else None
    vocab = vocab_size or (tok.vocab_size if tok else None)
    if vocab is None:
        raise ValueError(f"data.path={cfg.path!r} holds pre-tokenized .bin files, which carry no vocabulary "
                         f"size; pass the model's vocab_size, or set data.tokenizer to their tokenizer.json")
    train, val = (_bin_memmap(cfg, folder / f"{s}.bin") for s in ("train", "val"))
    stats = bin_stats([train, val], cfg.bin_dtype, cache_folder(cfg.cache_dir))
    _check_max_id(stats["max_id"], vocab, "data.bin_dtype")
    kind = f"{pathlib.Path(cfg.tokenizer).name} vocab" if tok else "no tokenizer, vocab"
    line = _describe(str(folder), f"train.bin/val.bin as {cfg.bin_dtype}", train, val, f"{kind} {vocab}")
    return Dataset(train=train, val=val, tokenizer=tok, vocab_size=vocab,
                   corpus_hash=stats["corpus_hash"], description=line)


def _bin_memmap(cfg: DataConfig, path: pathlib.Path) -> np.memmap:
    if not path.is_file():
        raise FileNotFoundError(f"data.path={cfg.path!r} has no {path.name}; a pre-tokenized folder needs "
                                f"both train.bin and val.bin")
    size, itemsize = path.stat().st_size, np.dtype(cfg.bin_dtype).itemsize
    if size == 0:
        raise ValueError(f"data.path={cfg.path!r}: {path.name} is empty; regenerate it")
    if size % itemsize:
        raise ValueError(f"data.path={cfg.path!r}: {path.name} is {size} bytes, not a whole number of "
                         f"{cfg.bin_dtype}; check data.bin_dtype")
    return np.memmap(path, cfg.bin_dtype, "r", shape=(size // itemsize,))


def _check_max_id(max_id: int, vocab_size: int, field: str) -> None:
    if max_id >= vocab_size:
        raise ValueError(f"the data holds token id {max_id}, but the vocabulary has {vocab_size} ids; "
                         f"raise model.vocab_size to at least {max_id + 1}, or check {field}")


def _describe(name: str, count: str, train: np.ndarray, val: np.ndarray, vocab: str) -> str:
    return f"{name}: {count}, {len(train):,} train / {len(val):,} val tokens, {vocab}"


def check_fits(dataset: Dataset, context_length: int) -> None:
    """Raise unless both splits hold at least one window of context_length + 1 tokens."""
    for split, tokens in (("train", dataset.train), ("validation", dataset.val)):
        if len(tokens) < context_length + 1:
            raise ValueError(f"data.path: the {split} split has {len(tokens):,} tokens, fewer than "
                             f"context_length + 1 = {context_length + 1:,}; use more data, a shorter "
                             f"model.context_length, or a different data.val_fraction")


__all__ = ["BIN_DTYPES", "DataConfig", "Dataset", "load_dataset", "check_fits",
           # re-exported, so `from headwise.train.data import ...` keeps working
           "get_batch", "eval_batches", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer",
           "tokenizer_from_json", "EXCLUDED_DIRS", "stdlib_root", "stdlib_files", "split_by_file"]
