"""The data layer: sources, tokenizers, the token cache, and batches as pure functions of (seed, step)."""
import dataclasses
import hashlib
import os
import sys

import numpy as np
import pytest

from headwise.train import data, token_cache
from headwise.train.batches import eval_batches, get_batch
from headwise.train.data import DataConfig, check_fits, load_dataset
from headwise.train.sources import EXCLUDED_DIRS, split_by_file, stdlib_files, stdlib_root
from headwise.train.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, tokenizer_from_json

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. ✓ é\n" * 20


def config(tmp_path, **fields) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **fields)


def write(path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def write_bins(folder, train, val, dtype) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype).tofile(folder / "train.bin")
    np.asarray(val, dtype).tofile(folder / "val.bin")
    return str(folder)


# ---------------------------------------------------------------- batches


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    batch = dict(batch_size=8, context_length=16)
    first = get_batch(tokens, seed=3, step=7, **batch)
    again = get_batch(tokens, seed=3, step=7, **batch)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], get_batch(tokens, seed=3, step=8, **batch)[0])
    assert not np.array_equal(first[0], get_batch(tokens, seed=4, step=7, **batch)[0])


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(3000, dtype=np.uint16)  # each window is a run of consecutive ids
    inputs_BT, targets_BT = get_batch(tokens, seed=0, step=0, batch_size=6, context_length=10)
    assert inputs_BT.shape == targets_BT.shape == (6, 10)
    assert inputs_BT.dtype == targets_BT.dtype == np.int32
    np.testing.assert_array_equal(targets_BT, inputs_BT + 1)
    np.testing.assert_array_equal(inputs_BT, inputs_BT[:, :1] + np.arange(10))


def test_windows_reach_both_ends_and_never_past_them():
    tokens = np.arange(12, dtype=np.uint16)
    starts = np.concatenate([get_batch(tokens, seed=1, step=s, batch_size=4, context_length=4)[0][:, 0]
                             for s in range(100)])
    assert starts.min() == 0 and starts.max() == 12 - 4 - 1  # the last window ends on the last token


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    tokens = np.arange(4000, dtype=np.uint16)
    batch = dict(seed=5, step=11, batch_size=8, context_length=12)
    inputs_BT, targets_BT = get_batch(tokens, **batch)
    parts = [get_batch(tokens, **batch, process_index=i, process_count=process_count)
             for i in range(process_count)]
    assert all(p[0].shape == (8 // process_count, 12) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), inputs_BT)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), targets_BT)


@pytest.mark.parametrize("arguments, message", [
    (dict(batch_size=6, process_count=4), "divisible"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(context_length=100), "context_length"),
    (dict(seed=-1), "seed"),
    (dict(step=-1), "step"),
    (dict(batch_size=0), "batch_size"),
])
def test_get_batch_rejects_bad_arguments(arguments, message):
    batch = dict(seed=0, step=0, batch_size=4, context_length=8) | arguments
    with pytest.raises(ValueError, match=message):
        get_batch(np.arange(100, dtype=np.uint16), **batch)


def test_eval_batches_are_the_same_on_every_call():
    tokens = np.arange(2000, dtype=np.uint16)
    batch = dict(seed=0, num_batches=3, batch_size=4, context_length=8)
    first, again = list(eval_batches(tokens, **batch)), list(eval_batches(tokens, **batch))
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(first[0][0], first[1][0])


# ---------------------------------------------------------------- the standard library corpus


def test_stdlib_files_leave_out_tests_and_installed_packages(tmp_path):
    for name in ("a.py", "pkg/b.py", "pkg/notes.txt", "test/c.py", "pkg/tests/d.py", "site-packages/e.py",
                 "venv/lib/python3.11/site-packages/f.py", "pkg/testing.py", "pkg/deep/test/g.py"):
        write(tmp_path / name, "x = 1\n")
    assert stdlib_files(tmp_path) == ["a.py", "pkg/b.py", "pkg/testing.py"]


def test_stdlib_split_is_by_file_disjoint_and_stable():
    files = stdlib_files(stdlib_root())
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    assert not any(part in EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    train, val = split_by_file(files, 0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.03 < len(val) / len(files) < 0.15
    # a file's side depends on its own path only: half the files split the same way
    half_train, half_val = split_by_file(files[::2], 0.1)
    assert set(half_val) == set(val) & set(files[::2])


def test_stdlib_corpus_is_the_default_and_loads_from_the_cache_the_second_time(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    assert cfg.path == "" and cfg.tokenizer == "byte"
    first = load_dataset(cfg)
    monkeypatch.setattr(data, "_encode_to_cache", pytest.fail)  # a second encode would fail the test
    again = load_dataset(cfg)
    assert first.corpus_hash == again.corpus_hash and len(first.corpus_hash) == 12
    assert first.vocab_size == 256 and isinstance(first.tokenizer, ByteTokenizer)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    assert "standard library" in first.description and "files" in first.description
    assert 0.03 < len(first.val) / (len(first.train) + len(first.val)) < 0.15
    # the train split starts with the first non-empty training file, byte for byte
    root = stdlib_root()
    train_files, _ = split_by_file(stdlib_files(root), 0.1)
    head = next(raw for raw in ((root / f).read_bytes() for f in train_files) if raw)[:200]
    assert bytes(first.train[:len(head)].astype(np.uint8)) == head


# ---------------------------------------------------------------- text files and folders


def test_single_file_splits_by_position(tmp_path):
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT)))
    raw = TEXT.encode()
    assert len(ds.val) == round(0.1 * len(raw))
    assert bytes(np.concatenate([ds.train, ds.val]).astype(np.uint8)) == raw
    assert ds.tokenizer.decode(list(ds.train) + list(ds.val)) == TEXT


def test_folder_splits_by_file_and_keeps_both_splits(tmp_path):
    texts = {"a.txt": "alpha " * 50, "sub/b.txt": "beta " * 50, "c.txt": "gamma " * 50}
    for name, text in texts.items():
        write(tmp_path / "corpus" / name, text)
    write(tmp_path / "corpus" / ".hidden", "never read")
    write(tmp_path / "corpus" / "empty.txt", "")
    ds = load_dataset(config(tmp_path, path=str(tmp_path / "corpus")))
    train, val = split_by_file(sorted(texts), 0.1)
    assert train and val  # three files and 10%: one file is moved to validation anyway
    assert ds.tokenizer.decode(list(ds.train)) == "".join(texts[f] for f in train)
    assert ds.tokenizer.decode(list(ds.val)) == "".join(texts[f] for f in val)
    assert "3 files" in ds.description


def test_char_tokenizer_round_trip():
    tok = CharTokenizer.from_texts(["hello", "wörld ✓"])
    assert tok.chars == tuple(sorted(set("hello" + "wörld ✓")))
    assert tok.decode(tok.encode("hello wörld ✓")) == "hello wörld ✓"
    assert tokenizer_from_json(tok.to_json()) == tok
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        tok.encode("hex")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_char_dataset_builds_its_vocabulary_from_the_text(tmp_path):
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT), tokenizer="char"))
    assert ds.vocab_size == ds.tokenizer.vocab_size == len(set(TEXT))
    assert ds.tokenizer.decode(list(ds.train) + list(ds.val)) == TEXT
    restored = tokenizer_from_json(ds.tokenizer.to_json())
    assert restored.decode(list(ds.val)) == ds.tokenizer.decode(list(ds.val))


def test_byte_tokenizer_round_trip_and_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    assert tok.decode(tok.encode("✓")[:2]) == "\ufffd"  # a sample cut mid-character still decodes
    assert tokenizer_from_json(tok.to_json()) == tok


def test_the_callers_vocab_size_is_kept_and_checked(tmp_path):
    path = write(tmp_path / "input.txt", TEXT)
    assert load_dataset(config(tmp_path, path=path), vocab_size=512).vocab_size == 512
    with pytest.raises(ValueError, match="model.vocab_size") as error:
        load_dataset(config(tmp_path, path=path), vocab_size=100)  # 'r' is byte 114
    assert "data.path" not in str(error.value)
    # A config made for a text (shakespeare_char: 65 ids) run without its data.path reads the
    # standard library's sources: the message says so, not only that the vocabulary is short.
    with pytest.raises(ValueError, match=r"at least \d+, or check data.tokenizer, or set "
                                         r"data.path: unset, it is the Python standard"):
        load_dataset(config(tmp_path), vocab_size=65)


# ---------------------------------------------------------------- the token cache


def test_cache_is_written_once_atomically_and_keyed_by_content(tmp_path, monkeypatch):
    path = write(tmp_path / "input.txt", TEXT)
    first = load_dataset(config(tmp_path, path=path))
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    assert len(cache_files) == 3 and not any(f.endswith(".tmp") for f in cache_files)
    monkeypatch.setattr(data, "_encode_to_cache", pytest.fail)
    again = load_dataset(config(tmp_path, path=path))
    np.testing.assert_array_equal(first.train, again.train)
    assert first.corpus_hash == again.corpus_hash
    monkeypatch.undo()
    write(tmp_path / "input.txt", TEXT + "more")
    changed = load_dataset(config(tmp_path, path=path))
    assert changed.corpus_hash != first.corpus_hash and len(os.listdir(tmp_path / "cache")) == 6


def test_cache_dir_defaults_to_headwise_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "from_env"))
    load_dataset(DataConfig(path=write(tmp_path / "input.txt", TEXT)))
    assert len(os.listdir(tmp_path / "from_env")) == 3


def test_corpus_hash_is_the_sha256_of_the_token_bytes(tmp_path):
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT)))
    expected = hashlib.sha256(np.asarray(ds.train).tobytes() + np.asarray(ds.val).tobytes()).hexdigest()
    assert ds.corpus_hash == expected[:12]


# ---------------------------------------------------------------- nanoGPT .bin folders


@pytest.mark.parametrize("dtype, vocab_size", [("uint16", 50257), ("uint32", 100_000)])
def test_bin_folder_loads_with_either_dtype(tmp_path, dtype, vocab_size):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, vocab_size, 1000), rng.integers(0, vocab_size, 100)
    folder = write_bins(tmp_path / "bins", train, val, dtype)
    ds = load_dataset(config(tmp_path, path=folder, bin_dtype=dtype), vocab_size=vocab_size)
    assert ds.train.dtype == np.dtype(dtype) and isinstance(ds.val, np.memmap)
    np.testing.assert_array_equal(ds.train, train)
    np.testing.assert_array_equal(ds.val, val)
    assert ds.tokenizer is None and ds.vocab_size == vocab_size
    expected = hashlib.sha256(np.asarray(train, dtype).tobytes() + np.asarray(val, dtype).tobytes())
    assert ds.corpus_hash == expected.hexdigest()[:12]
    x, y = get_batch(ds.train, seed=0, step=0, batch_size=2, context_length=8)
    assert x.dtype == np.int32 and x.max() < vocab_size


def test_bin_stats_are_remembered_until_the_files_change(tmp_path, monkeypatch):
    folder = write_bins(tmp_path / "bins", np.arange(100), np.arange(10), "uint16")
    cfg = config(tmp_path, path=folder)
    first = load_dataset(cfg, vocab_size=128)
    monkeypatch.setattr(token_cache, "scan_tokens", pytest.fail)
    assert load_dataset(cfg, vocab_size=128).corpus_hash == first.corpus_hash
    monkeypatch.undo()
    np.arange(1, 11, dtype=np.uint16).tofile(tmp_path / "bins" / "val.bin")
    os.utime(tmp_path / "bins" / "val.bin", ns=(1, 1))  # a different mtime even on a coarse clock
    assert load_dataset(cfg, vocab_size=128).corpus_hash != first.corpus_hash


def test_bin_folder_errors_name_the_field(tmp_path):
    folder = write_bins(tmp_path / "bins", np.arange(100), np.arange(10), "uint16")
    with pytest.raises(ValueError, match="vocab_size"):
        load_dataset(config(tmp_path, path=folder))
    with pytest.raises(ValueError, match="model.vocab_size to at least 100"):
        load_dataset(config(tmp_path, path=folder), vocab_size=64)
    with pytest.raises(ValueError, match="data.tokenizer='char'"):
        load_dataset(config(tmp_path, path=folder, tokenizer="char"), vocab_size=128)
    (tmp_path / "bins" / "train.bin").write_bytes(b"\0" * 6)
    with pytest.raises(ValueError, match="data.bin_dtype"):
        load_dataset(config(tmp_path, path=folder, bin_dtype="uint32"), vocab_size=128)
    os.remove(tmp_path / "bins" / "val.bin")
    with pytest.raises(FileNotFoundError, match="data.path.*val.bin"):
        load_dataset(config(tmp_path, path=folder), vocab_size=128)


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def bpe_tokenizer_json(tmp_path) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_tokenizer_json_dataset_round_trips(tmp_path):
    tokenizer_path = bpe_tokenizer_json(tmp_path)
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT), tokenizer=tokenizer_path))
    assert isinstance(ds.tokenizer, HFTokenizer) and ds.vocab_size == ds.tokenizer.vocab_size
    assert ds.train.dtype == np.uint16 and len(ds.train) + len(ds.val) < len(TEXT.encode())  # merges happened
    assert ds.tokenizer.decode(list(ds.train) + list(ds.val)) == TEXT
    restored = tokenizer_from_json(ds.tokenizer.to_json())
    assert restored.encode("Speak, speak.") == ds.tokenizer.encode("Speak, speak.")
    os.remove(tokenizer_path)  # the saved form carries the whole tokenizer, not its path
    assert restored.decode(restored.encode(TEXT[:50])) == TEXT[:50]


def test_tokenizer_json_with_a_large_vocabulary_caches_uint32(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, 70_000)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(f"w{i}" for i in range(65_530, 65_600))
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", text),
                             tokenizer=str(tmp_path / "tokenizer.json")))
    assert ds.train.dtype == np.uint32 and int(ds.train.max()) > 65_535


def test_tokenizer_json_checks_bin_ids_against_its_vocabulary(tmp_path):
    tokenizer_path = bpe_tokenizer_json(tmp_path)
    folder = write_bins(tmp_path / "bins", np.arange(400), np.arange(10), "uint16")
    with pytest.raises(ValueError, match="model.vocab_size"):
        load_dataset(config(tmp_path, path=folder, tokenizer=tokenizer_path))


def test_missing_tokenizers_library_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    cfg = config(tmp_path, path=write(tmp_path / "input.txt", TEXT),
                 tokenizer=write(tmp_path / "tokenizer.json", "{}"))
    with pytest.raises(ValueError, match="pip install tokenizers"):
        load_dataset(cfg)


# ---------------------------------------------------------------- errors a user can cause


@pytest.mark.parametrize("field, value", [
    ("path", 3), ("tokenizer", "bpe"), ("bin_dtype", "int8"), ("val_fraction", 0), ("val_fraction", 1.0),
    ("val_fraction", True), ("val_fraction", "0.1"), ("cache_dir", None),
])
def test_data_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_data_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        DataConfig("input.txt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataConfig().path = "x"


def test_missing_files_raise_file_not_found_naming_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_dataset(config(tmp_path, path=str(tmp_path / "nowhere.txt")))
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT),
                            tokenizer=str(tmp_path / "nowhere.json")))


def test_empty_or_tiny_corpora_raise_naming_data_path(tmp_path):
    with pytest.raises(ValueError, match="data.path.*no text"):
        load_dataset(config(tmp_path, path=write(tmp_path / "empty.txt", "")))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="data.path.*no text"):
        load_dataset(config(tmp_path, path=str(tmp_path / "empty_folder")))
    with pytest.raises(ValueError, match="data.path.*split is empty"):
        load_dataset(config(tmp_path, path=write(tmp_path / "one.txt", "x")))


def test_non_utf8_text_with_char_tokenizer_names_the_file_and_the_fix(tmp_path):
    path = write(tmp_path / "latin1.txt", "café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8.*data.tokenizer='byte'"):
        load_dataset(config(tmp_path, path=path, tokenizer="char"))
    assert load_dataset(config(tmp_path, path=path)).vocab_size == 256  # bytes read anything


def test_check_fits_wants_one_window_in_each_split(tmp_path):
    ds = load_dataset(config(tmp_path, path=write(tmp_path / "input.txt", TEXT)))
    check_fits(ds, len(ds.val) - 1)
    with pytest.raises(ValueError, match="data.path.*validation split"):
        check_fits(ds, len(ds.val))
