"""PNG pictures: every head's attention pattern on one colour scale; where the parameters are."""
import math
import pathlib

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global figures, no backend to pick

from headwise.model import ModelConfig, causal_mask, count_params

MASK_COLOUR = "#d9d9d9"  # a future key: masked by the causal rule, not a weight of 0
CMAP = colormaps["viridis"].with_extremes(bad=MASK_COLOUR)  # 0 dark violet ... 1 yellow
MAX_PANELS = 16  # more than this many heads in one picture: one PNG per layer
DPI = 100


def _panel_inches(T: int) -> float:
    return float(np.clip(0.16 * T + 0.8, 2.2, 7.0))


def _tick_step(T: int) -> int:
    return math.ceil(T / 48)  # past ~48 tokens a label per token no longer fits


def _escape(label: str) -> str:
    return label.replace("$", r"\$")  # a pair of $ would start matplotlib's maths mode


def _grid(layers: list[int], heads: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
    """(rows, columns, panels): layers down, heads across; one layer's heads wrap at 6."""
    panels = [(l, n) for l in layers for n in heads]
    if len(layers) > 1:
        return len(layers), len(heads), panels
    columns = min(len(heads), 6)
    return math.ceil(len(heads) / columns), columns, panels


def _ticks(labels: list[str], inches: float):
    ticks = np.arange(0, len(labels), _tick_step(len(labels)))
    shown = [_escape(labels[i]) for i in ticks]
    return ticks, shown, float(np.clip(inches * 72 / (len(ticks) + 2) * 0.8, 4, 9))


def _draw_pattern(ax, pattern_TS: np.ndarray, labels: list[str], title: str,
                  key_labels: list[str] | None = None):
    """One head's pattern: query rows, key columns. Self-attention (no `key_labels`): the keys
    are the queries' own tokens and masked (future) cells are MASK_COLOUR; cross-attention: the
    keys are another sequence's `key_labels`, every cell a weight."""
    T, S = pattern_TS.shape
    shown_TS = pattern_TS
    if key_labels is None:
        key_labels = labels
        shown_TS = np.ma.masked_array(pattern_TS, mask=~np.asarray(causal_mask(T, S)))
    image = ax.imshow(shown_TS, cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    inches = _panel_inches(max(T, S))
    x_ticks, x_shown, x_size = _ticks(key_labels, inches)
    y_ticks, y_shown, y_size = _ticks(labels, inches)
    vertical = max(len(s) for s in x_shown) > 2
    ax.set_xticks(x_ticks, x_shown, fontsize=min(x_size, y_size), rotation=90 if vertical else 0)
    ax.set_yticks(y_ticks, y_shown, fontsize=min(x_size, y_size))
    ax.tick_params(length=0, pad=1)
    ax.set_title(title, fontsize=9)
    return image


SELF_TITLE = ("attention patterns: row = query (the token attending), column = key "
              "(attended to); grey = masked future key")


def attention_figure(patterns_LNTT, labels: list[str], layers=None, heads=None, *,
                     key_labels: list[str] | None = None, title: str | None = None) -> Figure:
    """One sequence's patterns, chosen layers × heads, each a panel with its tokens labelled
    (rows: queries, columns: keys), the causal triangle in grey, one colour scale 0..1.
    Cross-attention ([L, N, T, S]): `key_labels` name the S source tokens, nothing is masked."""
    patterns_LNTT = np.asarray(patterns_LNTT, dtype=np.float32)
    L, N, T, S = patterns_LNTT.shape
    if len(labels) != T:
        raise ValueError(f"{len(labels)} labels for patterns over {T} tokens")
    if key_labels is not None and len(key_labels) != S:
        raise ValueError(f"{len(key_labels)} key labels for patterns over {S} keys")
    layers = list(range(L)) if layers is None else list(layers)
    heads = list(range(N)) if heads is None else list(heads)
    rows, columns, panels = _grid(layers, heads)
    width, height = _panel_inches(S), _panel_inches(T)
    fig = Figure(figsize=(columns * width + 1.6, rows * height + 1.2), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (l, n) in zip(axes.flat, panels):
        image = _draw_pattern(ax, patterns_LNTT[l, n], labels, f"layer {l} · head {n}",
                              key_labels)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight (each row sums to 1)")
    fig.suptitle(title or SELF_TITLE, fontsize=10)
    fig.supxlabel("key token", fontsize=9)
    fig.supylabel("query token", fontsize=9)
    return fig


def png_plan(L: int, N: int, layer=None, head=None, max_panels=MAX_PANELS):
    """[(file name, layers, heads)]: one picture of the selection, or one per layer if the
    selection has more than `max_panels` heads."""
    layers = list(range(L)) if layer is None else [layer]
    heads = list(range(N)) if head is None else [head]
    suffix = "" if head is None else f"_head{head}"
    if layer is None and len(layers) * len(heads) <= max_panels:
        return [(f"attention{suffix}.png", layers, heads)]
    width = len(str(L - 1))
    return [(f"attention_layer{l:0{width}d}{suffix}.png", [l], heads) for l in layers]


def save_attention_pngs(patterns_LNTT, labels: list[str], out_dir, layer=None, head=None,
                        max_panels=MAX_PANELS, **figure) -> list[pathlib.Path]:
    """Write the pictures `png_plan` names into out_dir; return their paths. `figure`:
    attention_figure's key_labels and title (for cross-attention)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L, N = np.shape(patterns_LNTT)[:2]
    paths = []
    for name, layers, heads in png_plan(L, N, layer, head, max_panels):
        fig = attention_figure(patterns_LNTT, labels, layers, heads, **figure)
        fig.savefig(out_dir / name, dpi=DPI)
        paths.append(out_dir / name)
    return paths


def _short(n: float) -> str:
    """175 B, 604 M, 12 K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)}"


def _params_bars(cfg: ModelConfig) -> tuple[list, list]:
    """(per-block bars, whole-model bars), each [(label, count, kind)]."""
    c = count_params(cfg)
    b, L = c["per_block"], cfg.n_layers
    block = [("query", b["query"], "attention"), ("key", b["key"], "attention"),
             ("value_down", b["value_down"], "attention"), ("value_up", b["value_up"], "attention"),
             ("attention biases", b["attention_biases"], "other"), ("MLP", b["mlp"], "mlp"),
             ("MLP biases", b["mlp_biases"], "other"), ("norms", b["norms"], "other")]
    whole = [("embedding", c["embedding"], "embedding"), ("positions", c["positions"], "embedding"),
             ("unembedding" + (" (tied)" if cfg.tie_embeddings else ""), c["unembedding"], "embedding"),
             (f"attention weights ({L} blocks)", c["attention_weights"], "attention"),
             (f"MLP ({L} blocks)", L * b["mlp"], "mlp"),
             ("biases and norms", c["total"] - c["embedding"] - c["positions"] - c["unembedding"]
              - c["attention_weights"] - L * b["mlp"], "other")]
    return block, whole


_KIND_COLOURS = {"embedding": "#4c72b0", "attention": "#dd8452", "mlp": "#55a868",
                 "other": "#8c8c8c"}


def _draw_bars(ax, bars: list, title: str) -> None:
    labels, counts, kinds = zip(*bars)
    y = np.arange(len(bars))[::-1]
    ax.barh(y, counts, color=[_KIND_COLOURS[k] for k in kinds])
    ax.set_yticks(y, labels, fontsize=9)
    top = max(counts)
    for yi, n in zip(y, counts):
        ax.text(n + top * 0.01, yi, f"{n:,} ({_short(n)})", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.6)  # room for the numbers after the longest bar
    ax.xaxis.set_major_formatter(lambda value, _: _short(value))
    ax.set_xlabel("parameters")
    ax.set_title(title, fontsize=10)


def params_figure(cfg: ModelConfig, name: str = "model") -> Figure:
    """Bars of where the parameters are: one block's, then the whole model's; for gpt3-175b
    the explanation's figures (175B in all, ~58B attention weights) in the title."""
    c = count_params(cfg)
    block, whole = _params_bars(cfg)
    fig = Figure(figsize=(12, 5.5), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _draw_bars(left, block, f"one block ({_short(c['per_block']['total'])})")
    _draw_bars(right, whole, f"the whole model ({_short(c['total'])})")
    share = 100 * c["attention_weights"] / c["total"]
    title = (f"{name}: {c['total']:,} parameters ({_short(c['total'])}); attention weights "
             f"{c['attention_weights']:,} ({_short(c['attention_weights'])}, {share:.0f}%)")
    if name == "gpt3-175b":
        title += ("\nthe explanation's GPT-3: 175B parameters in all, of them ~58B attention "
                  f"weights ({cfg.n_layers} layers × {cfg.n_heads} heads × 4 × {cfg.d_model:,} "
                  f"× {cfg.d_head})")
    fig.suptitle(title, fontsize=11)
    return fig


def save_params_plot(cfg: ModelConfig, name: str, path) -> pathlib.Path:
    path = pathlib.Path(path)
    params_figure(cfg, name).savefig(path, dpi=DPI)
    return path
