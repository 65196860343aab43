"""`headwise translate` (numbers to words) and `headwise attention --input` (cross-attention drawn)."""
import pathlib

from . import numbers

BATCH = 256  # numbers per compiled batch; a file of more runs in several


def add_translate(commands) -> None:
    translate = commands.add_parser("translate", help="write numbers as words with a run "
                                    "trained by --config numbers_to_words")
    translate.add_argument("--run-dir", required=True)
    source = translate.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="one number, e.g. 4021")
    source.add_argument("--input-file", help="a file of numbers, one per line")
    translate.set_defaults(run=translate_command)


def load_translator(run_dir):
    """(params, cfg) of a run whose model has an encoder (no array is computed yet)."""
    from .checkpoint import load_model
    params, cfg = load_model(run_dir)
    if not cfg.n_encoder_layers:
        raise ValueError(f"the run in {run_dir} is a decoder-only model (model.n_encoder_layers"
                         f" = 0): translate a run trained with --config numbers_to_words")
    numbers.check_model(cfg)
    return params, cfg


def parse_number(text: str, cfg, where: str = "--input") -> int:
    """A whole number in 0..999,999 written in ASCII digits, or a one-line ValueError."""
    digits = text.strip()
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{where}: {text.strip()!r} is not a number; give digits only, "
                         f"from 0 to {numbers.LARGEST:,} (e.g. 4021)")
    digits = digits.lstrip("0") or "0"
    if len(digits) > cfg.source_context:
        raise ValueError(f"{where}: {digits} has {len(digits)} digits, longer than the model's "
                         f"source context of {cfg.source_context}; give at most "
                         f"{cfg.source_context} digits")
    if int(digits) > numbers.LARGEST:
        raise ValueError(f"{where}: {digits} is out of range; give a number from 0 to "
                         f"{numbers.LARGEST:,}")
    return int(digits)


def read_inputs(args, cfg) -> list[int]:
    if args.input is not None:
        return [parse_number(args.input, cfg)]
    path = pathlib.Path(args.input_file)
    if not path.is_file():
        raise FileNotFoundError(f"--input-file {path} does not exist")
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"--input-file {path} is empty: give one number per line")
    return [parse_number(line, cfg, f"{path} line {i}") for i, line in enumerate(lines, 1)]


def translate_all(params, cfg, values: list[int]) -> list[str]:
    """In batches of BATCH, the last padded to a power of two (few shapes, few compiles)."""
    out = []
    for start in range(0, len(values), BATCH):
        chunk = values[start:start + BATCH]
        size = 1 << (len(chunk) - 1).bit_length()
        out += numbers.translate(params, cfg, chunk + [0] * (size - len(chunk)))[:len(chunk)]
    return out


def translate_command(args) -> None:
    params, cfg = load_translator(args.run_dir)
    for words in translate_all(params, cfg, read_inputs(args, cfg)):
        print(words)


def cross_attention_command(args, out: pathlib.Path | None) -> None:
    """The number translated, then every decoder layer's cross-attention: rows the tokens
    written, columns the digits read; PNGs and attention.html in `out`, or text (--ascii)."""
    import jax
    import numpy as np
    from headwise.explain import run_with_cache
    params, cfg = load_translator(args.run_dir)
    for flag, value, count in (("--layer", args.layer, cfg.n_layers),
                               ("--head", args.head, cfg.n_heads)):
        if value is not None and not 0 <= value < count:
            raise ValueError(f"{flag} {value} is out of range: the decoder has {count} "
                             f"{flag[2:]}s (0..{count - 1})")
    value = parse_number(args.input, cfg)
    written = numbers.translate_ids(params, cfg, [value])[0]
    written = written[:written.index(numbers.EOS) + 1] if numbers.EOS in written else written
    pairs = numbers.encode_pairs([value])
    inputs = np.asarray([[numbers.BOS, *written[:-1]]], np.int32)
    _, cache = jax.jit(run_with_cache, static_argnums=1)(
        params, cfg, inputs, pairs["source"], pairs["source_mask"])
    n = len(str(value))
    patterns_LNTS = np.asarray(cache["cross_patterns"][0])[..., :n]
    rows = [numbers.VOCAB[i] for i in written]
    columns = list(str(value))
    print(f"{value} -> {numbers.words_text(written)}")
    _show(patterns_LNTS, rows, columns, out, args)


def _show(patterns_LNTS, rows, columns, out, args) -> None:
    from headwise.explain.ascii import ascii_heatmap
    from headwise.explain.page import attention_html
    from headwise.explain.pictures import save_attention_pngs
    title = ("cross-attention: row = the word being written (its query), column = the digit "
             "read (key)")
    if out is not None:
        for path in save_attention_pngs(patterns_LNTS, rows, out, args.layer, args.head,
                                        key_labels=columns, title=title):
            print(f"wrote {path}")
        print(f"wrote {attention_html(patterns_LNTS, rows, out / 'attention.html', key_labels=columns)}")
    if args.ascii:
        L, N = patterns_LNTS.shape[:2]
        for l in range(L) if args.layer is None else [args.layer]:
            for n in range(N) if args.head is None else [args.head]:
                print(ascii_heatmap(patterns_LNTS[l, n], columns, f"layer {l}, head {n}",
                                    row_labels=rows) + "\n")
