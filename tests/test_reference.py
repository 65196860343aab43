"""The forward pass against an independent NumPy transformer written from the definitions."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import ModelConfig, embed, forward, forward_embeddings, init_params, loss
from tolerances import (cross_entropy_steps, f32_error, forward_steps, pattern_error,
                        score_steps, softmax_steps)

B, T = 2, 13  # T is not a multiple of CHUNK, so the last 'chunked' block is padded
CHUNK = 4  # four key blocks for 'chunked'


# --- The reference: NumPy only, float64, one head at a time -------------------------------------

def np_layernorm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_rmsnorm(x, scale, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def np_norm(p, x, cfg):
    if cfg.norm == "layernorm":
        # bias=False drops LayerNorm's bias too (nanoGPT's convention).
        assert ("bias" in p) == cfg.bias
        return np_layernorm(x, p["scale"], p.get("bias", 0.0), cfg.norm_eps)
    assert set(p) == {"scale"}, "RMSNorm has a scale and nothing else"
    return np_rmsnorm(x, p["scale"], cfg.norm_eps)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf)

NP_ACTIVATIONS = {
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                    * (x + 0.044715 * x ** 3))),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x * np_sigmoid(x),
}


def np_rope(x_TH, theta):
    """Rotate-half RoPE: pair (i, i + H/2) turned by angle pos * theta^(-i / (H/2))."""
    T_, H = x_TH.shape
    half = H // 2
    out = np.empty_like(x_TH)
    for pos in range(T_):
        for i in range(half):
            angle = pos * theta ** (-i / half)
            a, b = x_TH[pos, i], x_TH[pos, i + half]
            out[pos, i] = a * math.cos(angle) - b * math.sin(angle)
            out[pos, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_attention(p, x_TD, cfg):
    """Sum over heads of pattern_h @ v_h @ value_up[h], plus output bias; and the patterns."""
    T_ = x_TD.shape[0]
    future = np.triu(np.ones((T_, T_), bool), k=1)
    delta = np.zeros_like(x_TD)
    patterns = []
    for h in range(cfg.n_heads):
        def proj(name):
            y = x_TD @ p[name][:, h, :]
            return y + p[f"{name}_bias"][h] if cfg.bias else y
        q, k, v = proj("query"), proj("key"), proj("value_down")
        if cfg.position == "rope":
            q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
        scores = q @ k.T / math.sqrt(cfg.d_head)
        scores[future] = -np.inf
        pattern = np_softmax(scores)
        patterns.append(pattern)
        delta += pattern @ v @ p["value_up"][h]
    if cfg.bias:
        delta += p["output_bias"]
    return delta, np.stack(patterns)


def np_mlp(p, x, cfg):
    def linear(name):
        y = x @ p[name]
        return y + p[f"{name}_bias"] if cfg.bias else y
    if cfg.activation == "swiglu":
        h = NP_ACTIVATIONS["silu"](linear("gate")) * linear("up")
    else:
        h = NP_ACTIVATIONS[cfg.activation](linear("up"))
    y = h @ p["down"]
    return y + p["down_bias"] if cfg.bias else y


def np_forward(params, tokens_BT, cfg):
    """(logits [B, T, V], patterns [B, L, N, T, T]), one sequence and one layer at a time."""
    all_logits, all_patterns = [], []
    for tokens in tokens_BT:
        x = params["embed"]["token"][tokens]
        if cfg.position == "learned":
            x = x + params["embed"]["position"][: len(tokens)]
        layer_patterns = []
        for l in range(cfg.n_layers):
            layer = jax.tree.map(lambda a: a[l], params["blocks"])
            x_norm = np_norm(layer["attention_norm"], x, cfg)
            delta, pats = np_attention(layer["attention"], x_norm, cfg)
            x = x + delta
            x = x + np_mlp(layer["mlp"], np_norm(layer["mlp_norm"], x, cfg), cfg)
            layer_patterns.append(pats)
        x = np_norm(params["final_norm"], x, cfg)
        w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
        all_logits.append(x @ w_DV)
        all_patterns.append(np.stack(layer_patterns))
    return np.stack(all_logits), np.stack(all_patterns)


def np_cross_entropy(logits, targets, mask=None):
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    if mask is None:
        return nll.mean()
    return nll[mask].mean()


# --- Fixtures: random parameters of every kind, so biases and norms are really tested -----------

def _perturb(path, leaf, rng):
    """Random values for one leaf: norm scales near 1, everything else centred on 0."""
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("scale"):
        values = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    elif name.endswith("value_up") or name.endswith("mlp/down"):
        values = 0.15 * rng.standard_normal(leaf.shape)
    elif "bias" in name:
        values = 0.1 * rng.standard_normal(leaf.shape)
    else:
        values = 0.25 * rng.standard_normal(leaf.shape)
    return values.astype(np.dtype(leaf.dtype))


def random_params(cfg, seed=0):
    """init_params' tree, every leaf replaced by random values; the JAX copy and an f64 NumPy
    copy hold the same (f32-representable) numbers."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(seed))
    params_np32 = jax.tree_util.tree_map_with_path(lambda p, a: _perturb(p, a, rng), shapes)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params_np32))
    params_jax = jax.tree.map(jnp.asarray, params_np32)
    params_np = jax.tree.map(lambda a: np.asarray(a, np.float64), params_np32)
    return params_jax, params_np


def random_tokens(cfg, seed=1, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


def tiny(**overrides):
    overrides.setdefault("attention_chunk", CHUNK)
    return ModelConfig.preset("tiny", **overrides)


_jit_forward = jax.jit(forward, static_argnames=("cfg", "return_patterns"))
_jit_loss = jax.jit(loss, static_argnames=("cfg",))

# Float32 against exact (float64) arithmetic, bounded as tests/tolerances.py explains: a logit
# is within forward_steps (662 for tiny at T = 13) roundings of exact, each at most u times its
# Σ|terms|, which is at most 1.9x the largest logit for these parameters (worst case ~3e-4; the
# f32 error seen is ~3e-6 on AVX-512 and with XLA held to AVX2, AVX or SSE4.2). The bugs this
# must catch stand far above: a wrong causal mask, a head's value_up swapped, 1/sqrt(D) for
# 1/sqrt(H) or a missing output bias move logits by 0.9 to 7, RoPE's pairing by 5; subtler ones
# less: GELU's tanh form for its erf form 1.4e-3, a norm eps of 1e-6 or outside the sqrt 6e-4
# to 8e-4 (only 1.5x to 2.5x the bound: this test is not the guard for those).


def logits_tol(cfg, want_logits):
    return dict(rtol=0, atol=f32_error(forward_steps(cfg, T), 2 * np.abs(want_logits).max()))


def patterns_tol(cfg):
    # A score's Σ|q_h k_h| / sqrt(H) is at most 7.1 for these parameters: 8 bounds it.
    return dict(rtol=0, atol=pattern_error(score_steps(cfg, T), 8.0, T))


def loss_tol(cfg, want_logits, want_loss):
    """Cross-entropy passes on at most twice its logits' error (logsumexp minus one logit), then
    adds its own roundings on per-token losses of at most ~2x the mean."""
    return dict(rtol=0, atol=2 * logits_tol(cfg, want_logits)["atol"] + f32_error(
        cross_entropy_steps(cfg.vocab_size, B * T), 2 * want_loss))


def _check_logits(cfg, seed=0):
    params, params_np = random_params(cfg, seed)
    tokens = random_tokens(cfg, seed + 1)
    logits = np.asarray(_jit_forward(params, tokens, cfg=cfg))
    want, _ = np_forward(params_np, tokens, cfg)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == np.float32
    # Logits of order one, so an absolute bound of a few 1e-4 is a real test of f32 agreement.
    assert 0.5 < np.abs(want).std() < 10, np.abs(want).std()
    np.testing.assert_allclose(logits, want, **logits_tol(cfg, want))


# --- 1. logits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,position,tie,bias", list(itertools.product(
    ("layernorm", "rmsnorm"), ("learned", "rope"), (True, False), (True, False))))
def test_reference_path_matches_numpy(norm, position, tie, bias):
    cfg = tiny(norm=norm, position=position, tie_embeddings=tie, bias=bias, attention="reference")
    _check_logits(cfg)


@pytest.mark.parametrize("attention", ("reference", "fused", "chunked", "dot_product"))
def test_every_attention_path_matches_numpy(attention):
    # RoPE, because the fast paths apply it to [B, T, N, H] rather than one head's [T, H].
    cfg = tiny(attention=attention, position="rope", norm="rmsnorm", tie_embeddings=False)
    _check_logits(cfg, seed=2)


@pytest.mark.parametrize("activation", ("gelu_tanh", "gelu", "relu", "silu", "swiglu"))
def test_every_activation_matches_numpy(activation):
    cfg = tiny(activation=activation, attention="fused")
    _check_logits(cfg, seed=3)


def test_numpy_gelus_are_the_textbook_ones():
    """Guards the reference itself: erf-GELU and tanh-GELU at points with known values."""
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    exact = NP_ACTIVATIONS["gelu"](x)
    erf = np.array([math.erf(v / math.sqrt(2)) for v in x])
    np.testing.assert_allclose(exact, x * 0.5 * (1 + erf))
    np.testing.assert_allclose(exact[3], 0.34573123063700656, rtol=1e-12)
    np.testing.assert_allclose(NP_ACTIVATIONS["gelu_tanh"](x), exact, atol=2e-3)


# --- 2. patterns -------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ("reference", "fused", "chunked", "dot_product"))
def test_patterns_match_numpy(attention):
    cfg = tiny(attention=attention, position="rope")
    params, params_np = random_params(cfg, seed=4)
    tokens = random_tokens(cfg, seed=5)
    logits, patterns = _jit_forward(params, tokens, cfg=cfg, return_patterns=True)
    patterns = np.asarray(patterns)
    want_logits, want_patterns = np_forward(params_np, tokens, cfg)
    assert patterns.shape == (B, cfg.n_layers, cfg.n_heads, T, T)
    np.testing.assert_allclose(patterns, want_patterns, **patterns_tol(cfg))
    np.testing.assert_allclose(np.asarray(logits), want_logits, **logits_tol(cfg, want_logits))
    # A row's exp()s cancel in its normalisation: the model's sum over T keys, its division and
    # this float32 sum of T entries are what is left (2.6e-6 at T = 13; 2.4e-7 seen).
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=f32_error(softmax_steps(T) + T, 1.0))
    above = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(patterns[..., above] == 0.0)
    assert np.all(patterns[..., ~above] > 0.0)


# --- 3. causality through gradients ------------------------------------------------------------

@pytest.mark.parametrize("attention", ("reference", "fused", "chunked", "dot_product"))
def test_no_gradient_flows_from_the_future(attention):
    """d(log p(target_t)) / d(x_s) is exactly zero for every s > t (and across sequences), and
    nonzero for every s <= t."""
    cfg = tiny(attention=attention, position="rope")
    params, _ = random_params(cfg, seed=6)
    tokens = random_tokens(cfg, seed=7)
    targets = random_tokens(cfg, seed=8)
    x_BTD = embed(params, tokens, cfg)

    def logp_BT(x_BTD, params, targets):  # params as arguments, not constants: faster compile
        logits = forward_embeddings(params, x_BTD, cfg)
        logp = jax.nn.log_softmax(logits, -1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

    jac = np.asarray(jax.jit(jax.jacrev(logp_BT))(x_BTD, params, targets))  # [B, T, B, S, D]
    assert jac.shape == (B, T, B, T, cfg.d_model)
    nonzero_BTBS = np.any(jac != 0.0, axis=-1)
    same_seq = np.eye(B, dtype=bool)[:, None, :, None]
    past_or_present = np.tril(np.ones((T, T), bool))[None, :, None, :]
    allowed = same_seq & past_or_present
    assert not np.any(nonzero_BTBS & ~allowed), np.argwhere(nonzero_BTBS & ~allowed)[:5]
    assert np.all(nonzero_BTBS[allowed])


# --- 4. the loss -------------------------------------------------------------------------------

def test_loss_is_numpy_cross_entropy():
    cfg = tiny(attention="fused", position="learned")
    params, params_np = random_params(cfg, seed=9)
    tokens, targets = random_tokens(cfg, seed=10), random_tokens(cfg, seed=11)
    want_logits, _ = np_forward(params_np, tokens, cfg)

    got = float(_jit_loss(params, tokens, targets, cfg=cfg))
    want = np_cross_entropy(want_logits, targets)
    tol = loss_tol(cfg, want_logits, want)
    np.testing.assert_allclose(got, want, **tol)

    mask = np.random.default_rng(12).random((B, T)) < 0.4
    mask[0, 0] = True
    got_masked = float(_jit_loss(params, tokens, targets, cfg=cfg, mask=jnp.asarray(mask)))
    want_masked = np_cross_entropy(want_logits, targets, mask)
    np.testing.assert_allclose(got_masked, want_masked, **tol)
    # A masked mean, not the plain one: the two differ by far more than the tolerance.
    assert abs(want_masked - want) > 10 * tol["atol"]
