"""Attention paths against the reference, heads against their sum, counts, compile size, errors."""
import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import (ModelConfig, attention_head, attention_layer, causal_mask, count_params,
                            embed, flops_per_token, forward, heads_view, init_params, loss,
                            multi_head_attention, output_matrix, param_axes, param_specs)
from headwise.model.config import GPT3_PUBLISHED_PARAMS, PRESETS
from tolerances import (attention_gap, f32_error, f32_gap, forward_steps, gradient_gap,
                        pattern_gap, softmax_steps)

PATHS = ("reference", "fused", "chunked", "dot_product")


def _random_layer(cfg, key):
    """One layer's attention params with every leaf random (biases included)."""
    layer = jax.tree.map(lambda a: a[0], init_params(cfg, key)["blocks"]["attention"])
    keys = jax.random.split(key, len(layer))
    return {name: 0.3 * jax.random.normal(k, a.shape) for k, (name, a) in zip(keys, layer.items())}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["causal", "non_causal", "cross"])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_attention_paths_match_the_explanation(path, kind, position):
    """Every path's layer (one wide projection, then its kernel) against the explanation's own
    functions: `multi_head_attention` (vmap of `attention_head`, each head projecting for
    itself) on one sequence at a time, plus the output bias."""
    # T=11 with chunks of 4: several key blocks, the last one padded.
    cfg = ModelConfig.preset("tiny", attention=path, position=position, attention_chunk=4)
    layer = _random_layer(cfg, jax.random.key(0))
    x_BTD = jax.random.normal(jax.random.key(1), (2, 11, cfg.d_model))
    source = jax.random.normal(jax.random.key(2), (2, 7, cfg.d_model)) if kind == "cross" else None
    mask_TS = causal_mask(11) if kind == "causal" else None
    theta = cfg.rope_theta if position == "rope" else None

    def explained(x_TD, source_SD):
        delta_TD, _ = multi_head_attention(heads_view(layer), x_TD, mask_TS, source_SD,
                                           rope_theta=theta)
        return delta_TD + layer["output_bias"]

    expected = jax.vmap(explained)(x_BTD, source)
    got, _, _ = attention_layer(layer, x_BTD, cfg, source_BSD=source, causal=kind == "causal")
    # Bounds from float32 rounding (tests/tolerances.py); 10.0 and 13.0 bound |scores| and the
    # output's Σ|terms| for these fixed keys (computed once in float64). A wrong mask, a rolled
    # head or a missing bias is off by 0.8 to 10, some 800x the bound.
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=attention_gap(cfg, 11, score_terms=10.0, out_terms=13.0))


def test_multi_head_attention_is_the_sum_of_heads():
    cfg = ModelConfig.preset("tiny")
    heads = heads_view(_random_layer(cfg, jax.random.key(3)))
    x_TD = jax.random.normal(jax.random.key(4), (9, cfg.d_model))
    mask = causal_mask(9)
    delta, patterns = multi_head_attention(heads, x_TD, mask)
    per_head = [attention_head(jax.tree.map(lambda a: a[n], heads), x_TD, mask)
                for n in range(cfg.n_heads)]
    # Summed in another order (the AVX2 machine was 2.9e-6 off where 1e-6 was asked):
    # the bound is float32's worst case for this sum, 11.0 and 13.0 bounding |scores| and the
    # output's Σ|terms| for these keys. Rolled heads or a dropped bias are off by 1.2 to 10.
    np.testing.assert_allclose(delta, sum(d for d, _ in per_head), rtol=0,
                               atol=attention_gap(cfg, 9, score_terms=11.0, out_terms=13.0))
    for n, (_, pattern) in enumerate(per_head):
        np.testing.assert_allclose(patterns[n], pattern, rtol=0,
                                   atol=pattern_gap(cfg, 9, score_terms=11.0))


def test_patterns_sum_to_one_and_masked_entries_are_zero():
    cfg = ModelConfig.preset("tiny")
    heads = heads_view(_random_layer(cfg, jax.random.key(5)))
    x_TD = jax.random.normal(jax.random.key(6), (9, cfg.d_model))
    _, patterns_NTS = multi_head_attention(heads, x_TD, causal_mask(9))
    np.testing.assert_allclose(patterns_NTS.sum(-1), 1.0, atol=f32_error(softmax_steps(9) + 9, 1.0))
    future = ~np.asarray(causal_mask(9))
    assert np.all(np.asarray(patterns_NTS)[:, future] == 0.0)
    # Cross-attention: every query may read every key of the other sequence.
    source = jax.random.normal(jax.random.key(7), (5, cfg.d_model))
    _, cross_NTS = multi_head_attention(heads, x_TD, None, source)
    assert cross_NTS.shape == (cfg.n_heads, 9, 5)
    np.testing.assert_allclose(cross_NTS.sum(-1), 1.0, atol=f32_error(softmax_steps(5) + 5, 1.0))


def test_output_matrix_is_value_up_stacked():
    cfg = ModelConfig.preset("tiny")
    heads = heads_view(_random_layer(cfg, jax.random.key(8)))
    w_out = output_matrix(heads)
    N, H, D = cfg.n_heads, cfg.d_head, cfg.d_model
    assert w_out.shape == (N * H, D)
    for n in range(N):
        np.testing.assert_array_equal(w_out[n * H:(n + 1) * H], heads["value_up"][n])


def _explained_forward(params, tokens_BT, cfg):
    """The forward pass written the explanation's way, apart from the model's scan and kernels:
    a Python loop over layers, each sequence on its own, `multi_head_attention` per layer."""
    from headwise.model.transformer import mlp, norm, unembed

    def one_sequence(tokens_T):
        x_TD = embed(params, tokens_T, cfg)
        theta = cfg.rope_theta if cfg.position == "rope" else None
        for l in range(cfg.n_layers):
            layer = jax.tree.map(lambda a: a[l], params["blocks"])
            delta_TD, _ = multi_head_attention(
                heads_view(layer["attention"]), norm(layer["attention_norm"], x_TD, cfg),
                causal_mask(len(tokens_T)), rope_theta=theta)
            x_TD = x_TD + delta_TD + layer["attention"].get("output_bias", 0.0)
            x_TD = x_TD + mlp(layer["mlp"], norm(layer["mlp_norm"], x_TD, cfg), cfg)
        return unembed(params, x_TD, cfg)

    return jax.vmap(one_sequence)(tokens_BT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_forward_paths_match_the_explanation(path, position):
    cfg = ModelConfig.preset("tiny", attention=path, attention_chunk=5, position=position)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, cfg.vocab_size)
    expected = jax.jit(_explained_forward, static_argnums=2)(params, tokens, cfg)
    gap = f32_gap(forward_steps(cfg, 16), 2 * float(np.abs(expected).max()))
    np.testing.assert_allclose(forward(params, tokens, cfg), expected, atol=gap, rtol=0)


def test_init_params_inside_a_callers_jit_with_a_key_of_its_own():
    """Called eagerly, init_params is its own compiled program; inside a caller's jit or
    eval_shape with a concrete key (closed over, not traced) it is traced into theirs. The
    same numbers either way, to float32 rounding of the scaled normals (|w| < 0.1)."""
    cfg, key = ModelConfig.preset("tiny"), jax.random.key(0)
    eager = init_params(cfg, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-8),
                 jax.jit(lambda: init_params(cfg, key))(), eager)
    shapes = jax.eval_shape(lambda: init_params(cfg, key))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, eager)


def test_param_axes_match_params():
    cfg = ModelConfig.preset("tiny", bias=True, tie_embeddings=False)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    axes = param_axes(cfg)
    flat_shapes, tree = jax.tree.flatten(shapes)
    flat_axes = tree.flatten_up_to(axes)
    assert all(len(a) == len(s.shape) for a, s in zip(flat_axes, flat_shapes))
    assert shapes["blocks"]["attention"]["query"].shape == (2, 24, 3, 8)  # [L, D, N, H]
    assert shapes["blocks"]["attention"]["value_up"].shape == (2, 3, 8, 24)  # [L, N, H, D]


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_params_equals_tree_size(name):
    cfg = ModelConfig.preset(name)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))  # allocates nothing
    real = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count_params(cfg)["total"] == real


@pytest.mark.parametrize("variant", [dict(norm="rmsnorm", bias=False, position="rope",
                                          tie_embeddings=False), dict(activation="swiglu")])
def test_count_params_equals_tree_size_variants(variant):
    cfg = ModelConfig.preset("tiny", **variant)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    assert count_params(cfg)["total"] == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", list(GPT3_PUBLISHED_PARAMS))
def test_gpt3_presets_match_the_paper(name):
    published = GPT3_PUBLISHED_PARAMS[name]
    assert abs(count_params(ModelConfig.preset(name))["total"] / published - 1) < 0.02


def test_gpt2_small_is_124m():
    # nanoGPT's GPT-2 small: 124,439,808 parameters with tied embeddings.
    assert count_params(ModelConfig.preset("gpt2-small"))["total"] == 124_439_808


def test_flops_per_token_gpt2_small():
    # nanoGPT's estimate_mfu for gpt2-small at T=1024: 6N + 12*L*N*H*T with N excluding positions.
    cfg = ModelConfig.preset("gpt2-small")
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_params_cli_shows_the_explanation_figures():
    out = subprocess.run([sys.executable, "-m", "headwise.train.cli", "params", "--preset",
                          "gpt3-175b"], capture_output=True, text=True, check=True).stdout
    for figure in ("4 × 12,288 × 128 = 6,291,456", "603,979,776", "(about 58 B)",
                   "50,257 × 12,288 = 617,558,016", "(about 175 B)"):
        assert figure in out, figure


def test_compiled_program_does_not_grow_with_depth():
    def hlo_size(n_layers):
        cfg = ModelConfig.preset("tiny", n_layers=n_layers, attention="fused")
        params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
        tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        grad = jax.jit(jax.grad(loss), static_argnums=3)
        return len(grad.lower(params, tokens, tokens, cfg).as_text())

    assert hlo_size(12) <= 1.2 * hlo_size(2)


@pytest.mark.parametrize("field", ["vocab_size", "context_length", "d_model", "n_heads",
                                   "d_head", "n_layers", "d_mlp"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_raise(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})
    with pytest.raises(ValueError, match=field):  # replace() re-validates too
        dataclasses.replace(ModelConfig.preset("tiny"), **{field: value})


def test_unknown_preset_and_path_raise():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="attention"):
        ModelConfig.preset("tiny", attention="flash")
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")


def test_config_is_hashable_and_frozen():
    cfg = ModelConfig.preset("tiny")
    assert hash(cfg) == hash(ModelConfig.preset("tiny"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3
    with pytest.raises(TypeError):
        ModelConfig(256)  # keyword-only


def test_bad_tokens_raise():
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="vocab_size"):
        forward(params, jnp.full((1, 4), cfg.vocab_size), cfg)
    with pytest.raises(ValueError, match="context_length"):
        forward(params, jnp.zeros((1, cfg.context_length + 1), jnp.int32), cfg)
    with pytest.raises(ValueError, match="targets.*vocab_size"):
        loss(params, jnp.zeros((1, 4), jnp.int32), jnp.full((1, 4), 99), cfg)


def test_specs_are_the_single_source():
    cfg = ModelConfig.preset("tiny")
    specs = param_specs(cfg)
    params = init_params(cfg, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.tree.map(lambda s: 0, specs, is_leaf=lambda x: hasattr(x, "init")))


@pytest.mark.parametrize("path", PATHS[1:])
def test_gradients_of_every_path_match_reference(path):
    """Training runs through the backward pass too: each path's gradients equal the reference's."""
    cfg = ModelConfig.preset("tiny", attention=path, attention_chunk=5, position="rope")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    grad = lambda c: jax.jit(jax.grad(loss), static_argnums=3)(params, tokens, tokens, c)
    expected = grad(dataclasses.replace(cfg, attention="reference"))
    gap = gradient_gap(params, tokens, tokens, cfg)  # elementwise, from float32 rounding
    jax.tree.map(lambda a, b, g: np.testing.assert_array_less(np.abs(a - b), g + 1e-30),
                 grad(cfg), expected, gap)


def test_chunked_backward_memory_is_linear_in_length():
    """The chunked path's gradient keeps no [T, S] pattern: doubling T doubles its temporary
    memory (XLA's own figure), which stays far below one pattern's size."""
    from headwise.model.chunked import attend_chunked
    from headwise.model.masks import Visible

    def temp_bytes(attend, T):
        q = jax.ShapeDtypeStruct((1, T, 3, 8), jnp.float32)
        grad = jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    chunked = lambda q, k, v: attend_chunked(q, k, v, Visible(None), 64)[0]
    growth = temp_bytes(chunked, 2048) / temp_bytes(chunked, 1024)
    pattern_bytes = 3 * 2048 * 2048 * 4  # one f32 [N, T, T] pattern
    assert growth < 2.2, growth
    assert temp_bytes(chunked, 2048) < pattern_bytes / 4


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_hand_written_norm_and_gelu_gradients_match_autodiff(center):
    """model/fused.py's forwards are the plain formulas' bit for bit, and their written-out
    gradients equal autodiff of the plain formulas within float32 rounding (each row's
    backward is a chain of about 4·D roundings over Σ|terms| <= Σ|g|(1 + |x̂| max|x̂|) / rms)."""
    from headwise.model.fused import gelu_tanh, layer_norm
    M, D, eps = 48, 96, 1e-5
    x, dy = (jax.random.normal(k, (M, D)) * 3 + 1 for k in jax.random.split(jax.random.key(0)))
    scale, bias = (jax.random.normal(k, (D,)) for k in jax.random.split(jax.random.key(1)))

    def plain(x, scale, bias):
        x = x - x.mean(-1, keepdims=True) if center else x
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale + bias

    ours = lambda x, s, b: layer_norm(x, s, b, eps, center)
    assert np.array_equal(ours(x, scale, bias), plain(x, scale, bias))
    got = jax.vjp(ours, x, scale, bias)[1](dy)
    want = jax.vjp(plain, x, scale, bias)[1](dy)
    xc = np.asarray(x - x.mean(-1, keepdims=True) if center else x)
    inv_rms = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    x_hat, g = xc * inv_rms, np.abs(np.asarray(dy * scale))
    row_terms = inv_rms * (g * (1 + np.abs(x_hat) * np.abs(x_hat).max(-1, keepdims=True))).sum(-1, keepdims=True)
    bounds = (f32_gap(4 * D + 20, row_terms), f32_gap(M + 2 * D + 10, np.abs(dy * x_hat).sum(0)),
              f32_gap(M, np.abs(dy).sum(0)))
    for a, b, bound in zip(got, want, bounds):
        np.testing.assert_array_less(np.abs(a - b), np.broadcast_to(bound, a.shape))

    h = x / 2
    assert np.array_equal(gelu_tanh(h), jax.nn.gelu(h, approximate=True))
    got = jax.vjp(gelu_tanh, h)[1](dy)[0]
    want = jax.vjp(lambda h: jax.nn.gelu(h, approximate=True), h)[1](dy)[0]
    # about 12 roundings (the cubic, tanh, products) on terms up to |dy| (1 + |h| (1 + 3·0.045 h²))
    np.testing.assert_array_less(np.abs(got - want),
                                 f32_gap(12, np.abs(dy) * (1 + np.abs(h) * (1 + 0.14 * h * h))))


def test_rope_gradient_is_the_rotation_back():
    """RoPE's written-out gradient (rotate back) equals autodiff of the plain rotation."""
    from headwise.model.attention import rope
    x, dy = (jax.random.normal(k, (3, 10, 2, 8)) for k in jax.random.split(jax.random.key(2)))
    positions = jnp.arange(10)[:, None]

    def plain(x):
        angles = positions[..., None] * 100.0 ** (-jnp.arange(4) / 4)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        x1, x2 = x[..., :4], x[..., 4:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    np.testing.assert_allclose(rope(x, positions, 100.0), plain(x), rtol=0, atol=f32_gap(4, 2 * np.abs(x).max()))
    got = jax.vjp(lambda x: rope(x, positions, 100.0), x)[1](dy)[0]
    want = jax.vjp(plain, x)[1](dy)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=f32_gap(4, 2 * np.abs(dy).max()))


def test_linears_gradient_equals_autodiff_of_separate_matmuls():
    """`linears`' written-out backward (one stacked matmul for the input's gradient) equals
    autodiff of three plain `linear`s, biases included, within float32 rounding."""
    from headwise.model.linear import linear, linears
    keys = jax.random.split(jax.random.key(3), 8)
    x = jax.random.normal(keys[0], (2, 5, 16))
    ws = tuple(jax.random.normal(k, (16, 3, 4)) for k in keys[1:4])
    bs = tuple(jax.random.normal(k, (3, 4)) for k in keys[4:7])
    dys = tuple(jax.random.normal(k, (2, 5, 3, 4)) for k in jax.random.split(keys[7], 3))
    plain = lambda x, ws, bs: tuple(linear(x, w, b) for w, b in zip(ws, bs))
    assert all(np.array_equal(a, b) for a, b in zip(linears(x, ws, bs), plain(x, ws, bs)))
    got = jax.vjp(linears, x, ws, bs)[1](dys)
    want = jax.vjp(plain, x, ws, bs)[1](dys)
    scale = 3 * 12 * np.abs(np.asarray(dys)).max() * max(np.abs(np.asarray(ws)).max(), np.abs(x).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=f32_gap(36 + 10, scale)),
                 got, want)
