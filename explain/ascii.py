"""Attention patterns as text: token labels anyone can read, and a heat map for a terminal."""
import numpy as np

from headwise.model import causal_mask

# Allowed cells, by weight in equal fifths of 0..1; a masked (future) cell is left blank, so the
# causal triangle shows even where an allowed weight rounds down to the lightest shade.
SHADES = "·░▒▓█"
MASKED = " "
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "\\r"}


def token_label(piece: str | bytes) -> str:
    """What a token shows as: its text with space, newline and tab drawn (␣ ⏎ ⇥), other
    invisible characters escaped; a raw byte outside printable ASCII as \\xNN."""
    if isinstance(piece, bytes):
        if len(piece) == 1 and not 0x20 <= piece[0] < 0x7F and chr(piece[0]) not in _VISIBLE:
            return f"\\x{piece[0]:02x}"
        piece = piece.decode("utf-8", errors="backslashreplace")
    shown = "".join(_VISIBLE.get(c, c if c.isprintable() else c.encode("unicode_escape").decode())
                    for c in piece)
    return shown or "∅"


def shade(weight: float) -> str:
    """The shade of an allowed cell: level k of SHADES covers weights in [k/5, (k+1)/5)."""
    level = int(np.clip(weight, 0.0, 1.0) * len(SHADES))
    return SHADES[min(level, len(SHADES) - 1)]


def heat_rows(pattern_TS: np.ndarray, cell: int = 2, causal: bool = True) -> list[str]:
    """One string per query row: each key a cell of `cell` characters, blank where masked
    (by the causal rule; cross-attention, `causal=False`, masks nothing)."""
    allowed_TS = (np.asarray(causal_mask(*pattern_TS.shape)) if causal
                  else np.ones(pattern_TS.shape, bool))
    return ["".join((shade(w) if ok else MASKED) * cell for w, ok in zip(weights_S, allowed_S))
            for weights_S, allowed_S in zip(pattern_TS, allowed_TS)]


def _column_header(labels: list[str], cell: int, indent: int) -> list[str]:
    """Key labels written downwards, one character per line, each over its column."""
    height = max(len(label) for label in labels)
    return [" " * indent + "".join(label[i:i + 1].ljust(cell) for label in labels).rstrip()
            for i in range(height)]


def ascii_heatmap(pattern_TS: np.ndarray, labels: list[str], title: str = "",
                  row_labels: list[str] | None = None) -> str:
    """A pattern (row t: how much query t attends to each key) as a terminal heat map, query
    tokens down the left, key tokens across the top; shades · ░ ▒ ▓ █ = weight 0..1 in fifths,
    blank = masked (a future key). Cross-attention: `labels` name the keys (the source) and
    `row_labels` the queries, and nothing is masked."""
    pattern_TS = np.asarray(pattern_TS, dtype=np.float64)
    T, S = pattern_TS.shape
    if len(labels) != S:
        raise ValueError(f"{len(labels)} labels for a pattern over {S} keys")
    cell = 2 if S <= 40 else 1  # a terminal cell is about twice as tall as it is wide
    causal = row_labels is None
    if not causal and len(row_labels) != T:
        raise ValueError(f"{len(row_labels)} row labels for a pattern over {T} queries")
    row_labels = [f"{t:>3} {label[:12]}"
                  for t, label in enumerate(labels[S - T:] if causal else row_labels)]
    width = max(len(label) for label in row_labels) + 1
    key_labels = [label[:6] for label in labels]
    lines = [title] if title else []
    lines.append(f"rows: queries (attending) · columns: keys (attended to) · "
                 f"{SHADES} = weight 0..1" + (" · blank = masked (future)" if causal else ""))
    lines += _column_header(key_labels, cell, width + 1)
    rows = heat_rows(pattern_TS, cell, causal)
    lines += [f"{label:<{width}}│{row}".rstrip() for label, row in zip(row_labels, rows)]
    return "\n".join(lines)
