"""Attention pictures: panels, labels, mask and weight colours read back from the PNG; the
terminal heat map; the parameter bars; `headwise attention` and its one-line errors."""
import functools

import jax
import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.colors import to_rgba

from headwise.explain import run_with_cache
from headwise.explain.ascii import SHADES, ascii_heatmap, heat_rows, shade, token_label
from headwise.explain.pictures import (CMAP, MASK_COLOUR, attention_figure,
                                       params_figure, png_plan, save_attention_pngs)
from headwise.model import ModelConfig, causal_mask, count_params, param_shapes
from headwise.train import checkpoint
from headwise.train.cli import main
from headwise.train.data import ByteTokenizer

CFG = ModelConfig.preset("tiny", vocab_size=256)  # 2 layers, 3 heads, context 16, bytes


def _random_params(seed=0) -> dict:
    """Random weights of the right shapes, from numpy (JAX's RNG would compile for seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: rng.normal(0, 0.3, shape).astype(np.float32),
                        param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


@functools.cache
def _patterns_LNTT(T=6):
    """One random sequence's patterns from random weights: [L, N, T, T]."""
    params = _random_params()
    tokens_BT = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, T))
    _, cache = jax.jit(run_with_cache, static_argnums=1)(params, CFG, tokens_BT)
    return np.asarray(cache["patterns"][0])


def _pixel_rgba(png, ax, key: int, query: int) -> np.ndarray:
    """The PNG's colour at the centre of cell (query row, key column) of panel `ax`."""
    x, y = ax.transData.transform((key, query))
    return png[int(png.shape[0] - y), int(x)]


def test_token_labels_show_what_is_invisible():
    assert [token_label(bytes([b])) for b in b"a \n\t"] == ["a", "␣", "⏎", "⇥"]
    assert token_label(b"\xe2") == "\\xe2" and token_label(b"\x00") == "\\x00"
    assert token_label(" the\n") == "␣the⏎" and token_label("é") == "é"
    assert token_label("\x07") == "\\x07" and token_label("") == "∅"


def test_shades_and_rows_follow_a_hand_built_pattern():
    assert [shade(w) for w in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)] == list("··░▒▓██")
    pattern_TS = np.array([[1.0, 0.0, 0.0],
                           [0.5, 0.5, 0.0],
                           [0.1, 0.3, 0.6]])
    assert heat_rows(pattern_TS, cell=1) == ["█  ", "▒▒ ", "·░▓"]
    assert heat_rows(pattern_TS, cell=2)[2] == "··░░▓▓"
    text = ascii_heatmap(pattern_TS, ["a", "␣", "b"], "layer 0, head 1").splitlines()
    assert text[0] == "layer 0, head 1" and "queries" in text[1] and SHADES in text[1]
    assert text[2].split() == ["a", "␣", "b"]  # keys across the top
    assert text[3:] == ["  0 a │██", "  1 ␣ │▒▒▒▒", "  2 b │··░░▓▓"]


def test_figure_has_a_panel_per_head_labelled_with_tokens():
    patterns_LNTT = _patterns_LNTT()
    labels = ["d", "e", "f", "␣", "$", "g"]
    fig = attention_figure(patterns_LNTT, labels)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == CFG.n_layers * CFG.n_heads and len(fig.axes) == len(panels) + 1
    assert panels[4].get_title() == "layer 1 · head 1"
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["d", "e", "f", "␣", r"\$", "g"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["d", "e", "f", "␣", r"\$", "g"]
    assert "query" in fig.get_suptitle() and "key" in fig.get_suptitle()
    colourbar = fig.axes[-1]
    assert colourbar.get_ylim() == (0.0, 1.0) and "sums to 1" in colourbar.get_ylabel()
    one = attention_figure(patterns_LNTT, labels, layers=[1], heads=[2])
    assert [ax.get_title() for ax in one.axes if ax.get_title()] == ["layer 1 · head 2"]


def test_png_masked_cells_grey_weights_on_the_colour_scale(tmp_path):
    pattern_TT = np.array([[1.0, 0, 0, 0],
                           [0.25, 0.75, 0, 0],
                           [0.0, 0.5, 0.5, 0],  # an allowed weight of exactly 0
                           [0.25, 0.25, 0.25, 0.25]], np.float32)
    fig = attention_figure(pattern_TT[None, None], list("abcd"))
    fig.savefig(tmp_path / "one.png", dpi=fig.dpi)
    png = mpimg.imread(tmp_path / "one.png")
    assert png.shape[:2] == tuple(int(round(v)) for v in fig.get_size_inches()[::-1] * fig.dpi)
    ax = fig.axes[0]
    close = lambda pixel, colour: np.allclose(pixel, colour, atol=2 / 255)
    assert close(_pixel_rgba(png, ax, key=3, query=0), to_rgba(MASK_COLOUR))
    assert close(_pixel_rgba(png, ax, key=2, query=1), to_rgba(MASK_COLOUR))
    assert close(_pixel_rgba(png, ax, key=0, query=0), CMAP(1.0))  # the largest weight
    assert close(_pixel_rgba(png, ax, key=0, query=2), CMAP(0.0))  # 0, but not masked
    assert not close(CMAP(0.0), to_rgba(MASK_COLOUR))
    assert close(_pixel_rgba(png, ax, key=3, query=3), CMAP(0.25))


def test_causal_mask_matches_the_model_patterns():
    patterns_LNTT = _patterns_LNTT()
    mask_TT = ~np.asarray(causal_mask(6))
    assert np.all(patterns_LNTT[..., mask_TT] == 0) and np.all(patterns_LNTT[..., ~mask_TT] > 0)
    np.testing.assert_allclose(patterns_LNTT.sum(-1), 1.0, atol=1e-5)


def test_one_png_per_layer_when_there_are_many_heads(tmp_path):
    assert png_plan(2, 3) == [("attention.png", [0, 1], [0, 1, 2])]
    assert png_plan(12, 12)[0] == ("attention_layer00.png", [0], list(range(12)))
    assert len(png_plan(12, 12)) == 12 and len(png_plan(4, 4)) == 1 and len(png_plan(4, 5)) == 4
    assert png_plan(12, 12, layer=3, head=7) == [("attention_layer03_head7.png", [3], [7])]
    assert png_plan(2, 3, head=1) == [("attention_head1.png", [0, 1], [1])]
    paths = save_attention_pngs(_patterns_LNTT(), list("abcdef"), tmp_path, max_panels=4)
    assert [p.name for p in paths] == ["attention_layer0.png", "attention_layer1.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_params_bars_hold_the_counts_and_gpt3_title():
    cfg = ModelConfig.preset("gpt3-175b")
    counts = count_params(cfg)
    fig = params_figure(cfg, "gpt3-175b")
    block_ax, whole_ax = fig.axes
    widths = [bar.get_width() for bar in whole_ax.patches]
    assert sum(widths) == counts["total"] and counts["attention_weights"] in widths
    assert sum(bar.get_width() for bar in block_ax.patches) == counts["per_block"]["total"]
    assert "175B" in fig.get_suptitle() and "~58B attention" in fig.get_suptitle()
    assert "175B" not in params_figure(ModelConfig.preset("gpt2-small"), "gpt2-small").get_suptitle()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with an untrained byte-level checkpoint and its tokenizer."""
    path = tmp_path_factory.mktemp("run")
    state = {"params": _random_params(), "step": np.int32(0),
             "key": jax.random.key(1)}
    with checkpoint.open_manager(path) as manager:
        checkpoint.save(manager, 0, state, {"model": {**CFG.__dict__}})
    (path / "tokenizer.json").write_text(ByteTokenizer().to_json())
    return path


def _cli_error(capsys, *argv) -> str:
    assert main(["attention", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("headwise attention: error: ")
    return err


def test_attention_cli_errors(run_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "pics")]
    assert "empty" in _cli_error(capsys, "--run-dir", str(run_dir), "--prompt", "", *out)
    assert "no checkpoints" in _cli_error(capsys, "--run-dir", str(tmp_path / "nothing"),
                                          "--prompt", "hi", *out)
    err = _cli_error(capsys, "--run-dir", str(run_dir), "--prompt", "hi", *out, "--layer", "2")
    assert "--layer 2 is out of range" in err and "2 layers (0..1)" in err
    err = _cli_error(capsys, "--run-dir", str(run_dir), "--prompt", "hi", *out, "--head", "-1")
    assert "--head -1 is out of range" in err and "3 heads (0..2)" in err
    (tmp_path / "afile").write_text("")
    err = _cli_error(capsys, "--run-dir", str(tmp_path / "nothing"), "--prompt", "hi",
                     "--out", str(tmp_path / "afile" / "pics"))  # checked before the run loads
    assert "--out" in err and "not a folder we can write to" in err
    assert "--ascii" in _cli_error(capsys, "--run-dir", str(run_dir), "--prompt", "hi")


def test_attention_cli_crops_and_draws(run_dir, tmp_path, capsys):
    prompt = "def f(x):\n    return x + 1"  # 26 bytes, context 16
    assert main(["attention", "--run-dir", str(run_dir), "--prompt", prompt,
                 "--out", str(tmp_path), "--layer", "1", "--ascii"]) == 0
    captured = capsys.readouterr()
    assert "the prompt is 26 tokens" in captured.err and "dropped its first 10" in captured.err
    assert (tmp_path / "attention_layer1.png").is_file() and (tmp_path / "attention.html").is_file()
    assert captured.out.count("layer 1, head") == CFG.n_heads and "layer 0" not in captured.out
    assert "  0 ␣ │██" in captured.out  # the first kept token: a space of the indent


def test_params_plot_cli(tmp_path, capsys):
    assert main(["params", "--preset", "tiny", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file() and "wrote" in capsys.readouterr().out
