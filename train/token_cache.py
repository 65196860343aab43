"""The on-disk token cache: a source encoded once, keyed by its content, written atomically."""
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np

from .sources import Source, split_by_file
from .tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer

_CACHE_VERSION = "1"  # bump when the cache layout or the encoding of a source changes
_SCAN_CHUNK = 1 << 24  # tokens per read when hashing, so a huge .bin never sits in memory whole

# ---------------------------------------------------------------- encoding


def build_tokenizer(spec: str, source: Source) -> Tokenizer:
    """The tokenizer a spec names; 'char' builds its vocabulary from the source's text."""
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


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _encode_files(tok: Tokenizer, files: Sequence[tuple[str, bytes]]) -> np.ndarray:
    dtype = _token_dtype(tok.vocab_size)
    parts = [_encode_one(tok, p, raw) for p, raw in files]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _encode_one(tok: Tokenizer, relpath: str, raw: bytes) -> np.ndarray:
    try:
        return tok.encode_bytes(raw)
    except UnicodeDecodeError as error:
        raise _not_utf8(relpath, error) from error


def encode_splits(source: Source, tok: Tokenizer, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token ids: split by file, or else the tail is validation."""
    if source.by_file:
        contents = dict(source.files)
        train, val = split_by_file([p for p, _ in source.files], val_fraction)
        return (_encode_files(tok, [(p, contents[p]) for p in train]),
                _encode_files(tok, [(p, contents[p]) for p in val]))
    ids = _encode_files(tok, source.files)
    n_val = max(1, round(len(ids) * val_fraction))  # like nanoGPT: the tail is validation
    return ids[:-n_val], ids[-n_val:]


# ---------------------------------------------------------------- cache entries


def cache_folder(cache_dir: str) -> pathlib.Path:
    """data.cache_dir, else $HEADWISE_CACHE, else ~/.cache/headwise."""
    folder = cache_dir or os.environ.get("HEADWISE_CACHE") or "~/.cache/headwise"
    return pathlib.Path(folder).expanduser()


def cache_key(source: Source, spec: str, val_fraction: float) -> str:
    """24 hex digits that change whenever the files, the tokenizer or the split would."""
    digest = hashlib.sha256()
    for part in (_CACHE_VERSION, spec, str(source.by_file), repr(float(val_fraction))):
        digest.update(part.encode() + b"\0")
    for relpath, raw in source.files:
        digest.update(relpath.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()[:24]


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


def scan_tokens(arrays: Sequence[np.ndarray]) -> dict:
    """sha256 of the token bytes (the corpus hash) and the largest id, read a chunk at a time."""
    digest, max_id = hashlib.sha256(), 0
    for tokens in arrays:
        for start in range(0, len(tokens), _SCAN_CHUNK):
            chunk = np.ascontiguousarray(tokens[start:start + _SCAN_CHUNK])
            digest.update(chunk)
            max_id = max(max_id, int(chunk.max()))
    return {"corpus_hash": digest.hexdigest()[:12], "max_id": max_id}


def write_entry(cache: pathlib.Path, key: str, train: np.ndarray, val: np.ndarray, tok: Tokenizer) -> dict:
    """Write both splits, then their metadata, which is returned."""
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache / f"{key}.train.bin", train)
    _write_atomic(cache / f"{key}.val.bin", val)
    meta = {"dtype": train.dtype.name, "train_tokens": len(train), "val_tokens": len(val),
            "tokenizer": tok.to_json(), **scan_tokens([train, val])}
    _write_atomic(cache / f"{key}.json", json.dumps(meta).encode())  # last: its presence marks a whole entry
    return meta


def read_entry(cache: pathlib.Path, key: str) -> dict | None:
    """The metadata of a whole cache entry, or None when there is none."""
    paths = [cache / f"{key}.{name}" for name in ("json", "train.bin", "val.bin")]
    return json.loads(paths[0].read_text()) if all(p.is_file() for p in paths) else None


def open_entry(cache: pathlib.Path, key: str, meta: dict) -> tuple[np.memmap, np.memmap]:
    """(train, val) of a cache entry as read-only memmaps."""
    return tuple(np.memmap(cache / f"{key}.{s}.bin", meta["dtype"], "r", shape=(meta[f"{s}_tokens"],))
                 for s in ("train", "val"))


def bin_stats(arrays: Sequence[np.memmap], bin_dtype: str, cache: pathlib.Path) -> dict:
    """The corpus hash and largest id of .bin files, remembered by their path, size and mtime.

    Scanning gigabytes on every start would cost minutes; the files are rescanned whenever they change.
    """
    digest = hashlib.sha256((_CACHE_VERSION + bin_dtype).encode())
    for tokens in arrays:
        stat = os.stat(tokens.filename)
        digest.update(f"{os.path.realpath(tokens.filename)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    path = cache / f"bin-{digest.hexdigest()[:24]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    stats = scan_tokens(arrays)
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(stats).encode())
    return stats
