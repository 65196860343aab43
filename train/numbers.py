"""The numbers-to-words task: 4021 -> "four thousand twenty-one", batches as pure functions of
(seed, step), a fixed held-out set, and exact-match accuracy by greedy decoding."""
import dataclasses
import hashlib

import jax
import numpy as np

from headwise.model import ModelConfig, greedy_decode

TASK = "numbers_to_words"
LARGEST = 999_999
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
# One vocabulary for source and target: padding, start and stop, the ten digits, the words.
PAD, BOS, EOS = 0, 1, 2
VOCAB = ("<pad>", "<bos>", "<eos>", *"0123456789", *ONES, *TENS, "hundred", "thousand", "-")
IDS = {token: i for i, token in enumerate(VOCAB)}
FIRST_WORD = IDS["zero"]
SOURCE_LENGTH = len(str(LARGEST))  # 6 digits
TARGET_LENGTH = 12  # the longest (777,777) is 11 word tokens, plus a start or stop token


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10 - 2] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(ONES[n])
    return words


def number_words(n: int) -> str:
    """US English, lowercase, no "and", tens and units hyphenated: 4021 -> "four thousand
    twenty-one", 0 -> "zero"."""
    if not 0 <= n <= LARGEST:
        raise ValueError(f"{n} is outside 0..{LARGEST:,}")
    thousands, rest = divmod(n, 1000)
    words = (_below_thousand(thousands) + ["thousand"]) if thousands else []
    if rest or not thousands:
        words += _below_thousand(rest)
    return " ".join(words)


def word_tokens(text: str) -> list[int]:
    """Words and hyphens as token ids: "twenty-one" is twenty, -, one."""
    return [IDS[piece] for word in text.split() for piece in word.replace("-", " - ").split()]


def words_text(ids) -> str:
    """Token ids back to text, up to the first stop token; ids that are not words are skipped."""
    pieces = []
    for i in map(int, ids):
        if i == EOS:
            break
        if FIRST_WORD <= i < len(VOCAB):
            pieces.append(VOCAB[i])
    return " ".join(pieces).replace(" - ", "-")


def digit_tokens(n: int) -> list[int]:
    return [IDS[d] for d in str(n)]


def is_held_out(n_B: np.ndarray) -> np.ndarray:
    """The fixed rule: a number of 4 or more digits whose splitmix64 hash is 0 mod 50 (about
    2% of them, 20,045 numbers) never appears in training; every number below 1000 does."""
    z = np.asarray(n_B, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (np.asarray(n_B) >= 1000) & (z % np.uint64(50) == 0)


def draw_numbers(rng: np.random.Generator, count: int, held_out: bool) -> np.ndarray:
    """`count` numbers, each with 1..6 digits equally often (so short numbers are common), from
    the held-out set or from the rest."""
    out = np.empty(0, np.int64)
    while len(out) < count:
        digits = rng.integers(1 if not held_out else 4, SOURCE_LENGTH + 1, 2 * count)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))
        n = rng.integers(low, 10 ** digits)
        out = np.concatenate([out, n[is_held_out(n) == held_out]])
    return out[:count]


def encode_pairs(numbers) -> dict:
    """{"source", "source_mask", "inputs", "targets", "target_mask"}: int32/bool [B, 6 or 12];
    sources are digits right-padded; inputs start with BOS, targets end with EOS."""
    B = len(numbers)
    batch = {"source": np.full((B, SOURCE_LENGTH), PAD, np.int32),
             "inputs": np.full((B, TARGET_LENGTH), PAD, np.int32),
             "targets": np.full((B, TARGET_LENGTH), PAD, np.int32)}
    for b, n in enumerate(numbers):
        digits, words = digit_tokens(int(n)), word_tokens(number_words(int(n)))
        batch["source"][b, :len(digits)] = digits
        batch["inputs"][b, :len(words) + 1] = [BOS, *words]
        batch["targets"][b, :len(words) + 1] = [*words, EOS]
    batch["source_mask"] = batch["source"] != PAD
    batch["target_mask"] = batch["targets"] != PAD
    return batch


def get_pairs(*, seed: int, step: int, batch_size: int, held_out: bool = False,
              process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of the global batch for `step`: a pure function of its arguments,
    as the text batches are, so a resumed run sees the same pairs."""
    numbers = draw_numbers(np.random.default_rng([seed, step, int(held_out)]), batch_size,
                           held_out)
    rows = batch_size // process_count
    return encode_pairs(numbers[process_index * rows:(process_index + 1) * rows])


def evaluation_numbers(count: int = 500) -> np.ndarray:
    """The held-out numbers accuracy is measured on: `count` distinct ones, drawn uniformly
    from the held-out set (so, like 0..999,999, mostly six digits), the same every time."""
    held_out = np.flatnonzero(is_held_out(np.arange(LARGEST + 1)))
    return np.random.default_rng(20_240_412).choice(held_out, count, replace=False)


def check_model(cfg: ModelConfig) -> None:
    """The model must read 6 digits and write 12 tokens over this vocabulary."""
    for ok, field, fix in ((cfg.n_encoder_layers > 0, "n_encoder_layers", "set it to 1 or more"),
                           (cfg.vocab_size >= len(VOCAB), "vocab_size", f"make it >= {len(VOCAB)}"),
                           (cfg.source_context >= SOURCE_LENGTH, "source_length",
                            f"make it >= {SOURCE_LENGTH}"),
                           (cfg.context_length >= TARGET_LENGTH, "context_length",
                            f"make it >= {TARGET_LENGTH}")):
        if not ok:
            raise ValueError(f"data.task={TASK!r} needs model.{field}: {fix} (it is "
                             f"{getattr(cfg, field)})")


_greedy = jax.jit(greedy_decode, static_argnames=("cfg", "start_token", "max_len"))


def translate_ids(params, cfg: ModelConfig, numbers) -> list[list[int]]:
    """Greedy translations of `numbers` as token ids (each cut after its stop token)."""
    pairs = encode_pairs(numbers)
    tokens, _ = _greedy(params, pairs["source"], cfg, start_token=BOS, max_len=TARGET_LENGTH,
                        source_mask_BS=pairs["source_mask"])
    return [list(row) for row in np.asarray(tokens)]


def translate(params, cfg: ModelConfig, numbers) -> list[str]:
    """The model's words for each number."""
    return [words_text(ids) for ids in translate_ids(params, cfg, numbers)]


def exact_match(params, cfg: ModelConfig, numbers) -> float:
    """The fraction of `numbers` translated exactly (every word and the stop token)."""
    want = [word_tokens(number_words(int(n))) + [EOS] for n in numbers]
    got = translate_ids(params, cfg, numbers)
    return float(np.mean([g[:len(w)] == w for g, w in zip(got, want)]))


@dataclasses.dataclass(frozen=True, eq=False)
class NumbersData:
    """What a run needs of its data, for this task: batches by (split, seed, step), a line for
    the log, and the held-out accuracy. `train` and `val` name the splits."""

    train: str = "train"
    val: str = "held-out"
    tokenizer: None = None  # no text tokenizer: `headwise translate` speaks digits and words
    vocab_size: int = len(VOCAB)
    corpus_hash: str = hashlib.sha256(" ".join(VOCAB).encode()).hexdigest()[:12]
    description: str = (f"{TASK}: 0..{LARGEST:,} in US English words, 1 to 6 digits equally "
                        f"often; held out: 2% of the numbers >= 1000 (never trained on)")
    eval_count: int = 500

    def batch(self, split: str, **kwargs) -> dict:
        return get_pairs(held_out=split == self.val, **kwargs)

    def accuracy(self, params, cfg: ModelConfig) -> float:
        return exact_match(params, cfg, evaluation_numbers(self.eval_count))

    def baseline(self) -> float:
        """The unigram loss of the target tokens (what a model ignoring the source gets)."""
        batch = get_pairs(seed=0, step=0, batch_size=4096)
        counts = np.bincount(batch["targets"][batch["target_mask"]], minlength=len(VOCAB))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
