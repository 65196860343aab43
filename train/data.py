"""Token data: sources, tokenizers, an on-disk token cache, and batches as pure functions of (seed, step)."""
import dataclasses
import hashlib
import json
import os
import pathlib
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

BIN_DTYPES = ("uint16", "uint32")
EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages"})
_CACHE_VERSION = "1"  # bump when the cache layout or the encoding of a source changes
_SCAN_CHUNK = 1 << 24  # tokens per read when hashing, so a huge .bin never sits in memory whole


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tokens come from and how text becomes tokens."""

    path: str = ""  # "" = the Python standard library's own sources
    tokenizer: str = "byte"  # "byte" | "char" | a path to a Hugging Face tokenizer.json
    bin_dtype: str = "uint16"  # of a folder holding nanoGPT-style train.bin and val.bin
    val_fraction: float = 0.1
    cache_dir: str = ""  # "" = $HEADWISE_CACHE, else ~/.cache/headwise

    def __post_init__(self):
        for name in ("path", "tokenizer", "cache_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        if self.tokenizer not in ("byte", "char") and not self.tokenizer.endswith(".json"):
            raise ValueError(f"data.tokenizer must be 'byte', 'char' or a path to a tokenizer.json, "
                             f"got {self.tokenizer!r}")
        if self.bin_dtype not in BIN_DTYPES:
            raise ValueError(f"data.bin_dtype must be one of {BIN_DTYPES}, got {self.bin_dtype!r}")
        value = self.val_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"data.val_fraction must be a number between 0 and 1 (exclusive), got {value!r}")


# ---------------------------------------------------------------- tokenizers


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


def _tokenizers_library():
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
        object.__setattr__(self, "_tokenizer", _tokenizers_library().Tokenizer.from_str(self.spec))

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


# ---------------------------------------------------------------- sources


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path) -> list[str]:
    """The `.py` files under root as sorted posix paths relative to it; no test folders, no site-packages."""
    found = []
    for folder, subfolders, names in os.walk(root):
        # pruning here also drops any venv or site-packages that happens to live under the stdlib
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]
        found += [pathlib.Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    return sorted(found)


def split_by_file(relpaths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) paths. A file's side depends on its own path only, so adding files never moves others.

    crc32, not hash(): Python salts str hashes per process and the split must never move.
    Both sides get at least one file, so needs two or more.
    """
    score = {p: zlib.crc32(p.encode()) / 2**32 for p in relpaths}
    n_val = min(max(sum(s < val_fraction for s in score.values()), 1), len(relpaths) - 1)
    val = set(sorted(relpaths, key=lambda p: (score[p], p))[:n_val])
    return [p for p in relpaths if p not in val], [p for p in relpaths if p in val]


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str  # for the description
    files: tuple[tuple[str, bytes], ...]  # (relative path, contents), sorted, none empty
    by_file: bool  # split train/val by file; else by position (the tail is validation)


def _read_source(cfg: DataConfig) -> _Source:
    if not cfg.path:
        root = stdlib_root()
        files = [(p, (root / p).read_bytes()) for p in stdlib_files(root)]
        return _nonempty(cfg, _Source(f"the Python standard library ({root})", tuple(files), True))
    path = pathlib.Path(cfg.path).expanduser()
    if path.is_file():
        return _nonempty(cfg, _Source(str(path), ((path.name, path.read_bytes()),), False))
    if not path.is_dir():
        raise FileNotFoundError(f"data.path={cfg.path!r} does not exist; point it at a text file, a "
                                f"folder of text files, or a folder with train.bin and val.bin "
                                f"('' = Python's standard library)")
    files = [(p.relative_to(path).as_posix(), p.read_bytes()) for p in _folder_files(path)]
    source = _nonempty(cfg, _Source(str(path), tuple(files), True))
    return dataclasses.replace(source, by_file=len(source.files) > 1)


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    # hidden names (.git, .DS_Store) are tooling, not text
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _nonempty(cfg: DataConfig, source: _Source) -> _Source:
    # empty files add nothing, and could leave a split empty
    files = tuple((p, raw) for p, raw in source.files if raw)
    if not files:
        raise ValueError(f"data.path={cfg.path!r}: no text found ({source.name} is empty); "
                         f"point data.path at some text")
    return dataclasses.replace(source, files=files)


# ---------------------------------------------------------------- encoding and the cache


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _tokenizer_spec(cfg: DataConfig) -> str:
    """'byte', 'char', or the tokenizer.json contents: what the cache key must depend on."""
    if cfg.tokenizer in ("byte", "char"):
        return cfg.tokenizer
    path = pathlib.Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer!r} does not exist; "
                                f"point it at a Hugging Face tokenizer.json, or use 'byte' or 'char'")
    return path.read_text(encoding="utf-8")


def _build_tokenizer(spec: str, source: _Source) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        return CharTokenizer.from_texts([_utf8(p, raw) for p, raw in source.files])
    return HFTokenizer(spec)


def _utf8(relpath: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(relpath, error) from error


def _not_utf8(relpath: str, error: UnicodeDecodeError) -> ValueError:
    return ValueError(f"data.path: {relpath} is not UTF-8 text ({error.reason} at byte {error.start}); "
                      f"use data.tokenizer='byte', which reads any bytes")


def _encode_files(tok: Tokenizer, files: Sequence[tuple[str, bytes]]) -> np.ndarray:
    dtype = _token_dtype(tok.vocab_size)
    parts = [_encode_one(tok, p, raw) for p, raw in files]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _encode_one(tok: Tokenizer, relpath: str, raw: bytes) -> np.ndarray:
    try:
        return tok.encode_bytes(raw)
    except UnicodeDecodeError as error:
        raise _not_utf8(relpath, error) from error


def _encode_splits(cfg: DataConfig, source: _Source, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if source.by_file:
        contents = dict(source.files)
        train, val = split_by_file([p for p, _ in source.files], cfg.val_fraction)
        return (_encode_files(tok, [(p, contents[p]) for p in train]),
                _encode_files(tok, [(p, contents[p]) for p in val]))
    ids = _encode_files(tok, source.files)
    n_val = max(1, round(len(ids) * cfg.val_fraction))  # like nanoGPT: the tail is validation
    return ids[:-n_val], ids[-n_val:]


def _cache_key(cfg: DataConfig, source: _Source, spec: str) -> str:
    digest = hashlib.sha256()
    for part in (_CACHE_VERSION, spec, str(source.by_file), repr(float(cfg.val_fraction))):
        digest.update(part.encode() + b"\0")
    for relpath, raw in source.files:
        digest.update(relpath.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()[:24]


def _cache_dir(cfg: DataConfig) -> pathlib.Path:
    folder = cfg.cache_dir or os.environ.get("HEADWISE_CACHE") or "~/.cache/headwise"
    return pathlib.Path(folder).expanduser()


def _write_atomic(path: pathlib.Path, data: bytes | np.ndarray) -> None:
    # write-then-rename: a crash or a second process never sees half a file under the final name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            data.tofile(file) if isinstance(data, np.ndarray) else file.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _scan(arrays: Sequence[np.ndarray]) -> dict:
    """sha256 of the token bytes (the corpus hash) and the largest id, read a chunk at a time."""
    digest, max_id = hashlib.sha256(), 0
    for tokens in arrays:
        for start in range(0, len(tokens), _SCAN_CHUNK):
            chunk = np.ascontiguousarray(tokens[start:start + _SCAN_CHUNK])
            digest.update(chunk)
            max_id = max(max_id, int(chunk.max()))
    return {"corpus_hash": digest.hexdigest()[:12], "max_id": max_id}


def _encode_to_cache(cfg: DataConfig, source: _Source, spec: str, cache: pathlib.Path, key: str) -> dict:
    tok = _build_tokenizer(spec, source)
    train, val = _encode_splits(cfg, source, tok)
    for split, tokens in (("train", train), ("validation", val)):
        if not len(tokens):
            raise ValueError(f"data.path={cfg.path!r}: the {split} split is empty; add text, "
                             f"or change data.val_fraction")
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache / f"{key}.train.bin", train)
    _write_atomic(cache / f"{key}.val.bin", val)
    meta = {"dtype": train.dtype.name, "train_tokens": len(train), "val_tokens": len(val),
            "tokenizer": tok.to_json(), **_scan([train, val])}
    _write_atomic(cache / f"{key}.json", json.dumps(meta).encode())  # last: its presence marks a whole entry
    return meta


def _cached(cache: pathlib.Path, key: str) -> dict | None:
    paths = [cache / f"{key}.{name}" for name in ("json", "train.bin", "val.bin")]
    return json.loads(paths[0].read_text()) if all(p.is_file() for p in paths) else None


# ---------------------------------------------------------------- datasets


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
    source, spec = _read_source(cfg), _tokenizer_spec(cfg)
    cache, key = _cache_dir(cfg), _cache_key(cfg, source, spec)
    meta = _cached(cache, key) or _encode_to_cache(cfg, source, spec, cache, key)
    tok = tokenizer_from_json(meta["tokenizer"])
    train, val = (np.memmap(cache / f"{key}.{s}.bin", meta["dtype"], "r", shape=(meta[f"{s}_tokens"],))
                  for s in ("train", "val"))
    vocab = vocab_size or tok.vocab_size
    _check_max_id(meta["max_id"], vocab, "data.tokenizer")
    kind = cfg.tokenizer if cfg.tokenizer in ("byte", "char") else pathlib.Path(cfg.tokenizer).name
    line = _describe(source.name, f"{len(source.files)} files", train, val, f"{kind} vocab {tok.vocab_size}")
    return Dataset(train=train, val=val, tokenizer=tok, vocab_size=vocab,
                   corpus_hash=meta["corpus_hash"], description=line)


def _load_bin(cfg: DataConfig, folder: pathlib.Path, vocab_size: int | None) -> Dataset:
    if cfg.tokenizer == "char":
        raise ValueError("data.tokenizer='char' builds its vocabulary from text, and train.bin/val.bin hold "
                         "none; use the tokenizer.json the .bin files were made with, or 'byte' for ids only")
    tok = HFTokenizer(_tokenizer_spec(cfg)) if cfg.tokenizer.endswith(".json") else None
    vocab = vocab_size or (tok.vocab_size if tok else None)
    if vocab is None:
        raise ValueError(f"data.path={cfg.path!r} holds pre-tokenized .bin files, which carry no vocabulary "
                         f"size; pass the model's vocab_size, or set data.tokenizer to their tokenizer.json")
    train, val = (_bin_memmap(cfg, folder / f"{s}.bin") for s in ("train", "val"))
    stats = _bin_stats(cfg, [train, val])
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


def _bin_stats(cfg: DataConfig, arrays: Sequence[np.memmap]) -> dict:
    """The corpus hash and largest id of .bin files, remembered by their path, size and mtime.

    Scanning gigabytes on every start would cost minutes; the files are rescanned whenever they change.
    """
    digest = hashlib.sha256((_CACHE_VERSION + cfg.bin_dtype).encode())
    for tokens in arrays:
        stat = os.stat(tokens.filename)
        digest.update(f"{os.path.realpath(tokens.filename)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    cache = _cache_dir(cfg)
    path = cache / f"bin-{digest.hexdigest()[:24]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    stats = _scan(arrays)
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(stats).encode())
    return stats


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


# ---------------------------------------------------------------- batches


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, context_length: int,
              process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32 for this process: its contiguous rows of the global batch for `step`.

    A pure function of its arguments, so resuming at a step is exact and every host can compute
    its own rows. `batch_size` is global; targets are the inputs shifted left by one token.
    """
    _check_batch_args(len(tokens), batch_size, context_length, process_index, process_count)
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    # every process draws the whole global batch, so their rows agree without talking to each other
    starts_B = np.random.default_rng([seed, step]).integers(0, len(tokens) - context_length, size=batch_size)
    rows = batch_size // process_count
    starts_b = starts_B[process_index * rows:(process_index + 1) * rows]
    window_BT = np.asarray(tokens[starts_b[:, None] + np.arange(context_length + 1)], np.int32)
    return window_BT[:, :-1], window_BT[:, 1:]


def _check_batch_args(n_tokens: int, batch_size: int, context_length: int,
                      process_index: int, process_count: int) -> None:
    for name, value in (("batch_size", batch_size), ("context_length", context_length),
                        ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the process count {process_count}, "
                         f"so each process loads the same number of rows")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if n_tokens < context_length + 1:
        raise ValueError(f"{n_tokens:,} tokens cannot fill one window of context_length + 1 = "
                         f"{context_length + 1:,}; use more data or a shorter context")


def eval_batches(tokens: np.ndarray, *, seed: int, num_batches: int, batch_size: int, context_length: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same `num_batches` batches on every call, so successive evaluation losses are comparable."""
    for step in range(num_batches):
        yield get_batch(tokens, seed=seed, step=step, batch_size=batch_size, context_length=context_length,
                        process_index=process_index, process_count=process_count)
