"""The encoder-decoder against an independent NumPy one; cross-attention against the explanation's
head; what each side may see; cached decoding; the numbers task; training, sharded and resumed."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import (ModelConfig, attention_head, encode, encoder_decoder_loss,
                            forward_encoder_decoder, greedy_decode, heads_view, init_params)
from headwise.model.cross_attention import cross_attention_layer, source_keys_values
from test_reference import NP_ACTIVATIONS, np_norm, np_rope, np_softmax, random_params

B, T, S = 2, 9, 7  # target and source of different lengths, neither a multiple of the chunk
CHUNK = 3
PATHS = ("reference", "fused", "chunked", "dot_product")
# Row 0's source is ragged: 4 real tokens, then 3 of padding the model must not read.
LENGTHS = (4, 7)


def tiny(**overrides) -> ModelConfig:
    overrides = {"n_encoder_layers": 2, "source_length": 8, "attention_chunk": CHUNK,
                 **overrides}
    return ModelConfig.preset("tiny", **overrides)


def source_and_mask(cfg, seed=1):
    rng = np.random.default_rng(seed)
    source = rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
    mask = np.arange(S)[None, :] < np.asarray(LENGTHS)[:, None]
    return source, mask


def targets(cfg, seed=2):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


# --- The reference: NumPy, float64, one head at a time, the source cut to its real tokens ------

def np_attention(p, x_TD, source_SD, allowed_TS, cfg, rope: bool):
    """Sum over heads of pattern @ (source @ value_down) @ value_up, plus the output bias."""
    delta, patterns = np.zeros_like(x_TD), []
    for h in range(cfg.n_heads):
        def proj(x, name):
            y = x @ p[name][:, h, :]
            return y + p[f"{name}_bias"][h] if cfg.bias else y
        q, k, v = proj(x_TD, "query"), proj(source_SD, "key"), proj(source_SD, "value_down")
        if rope:
            q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
        scores = q @ k.T / math.sqrt(cfg.d_head)
        scores[~allowed_TS] = -np.inf
        pattern = np_softmax(scores)
        patterns.append(pattern)
        delta += pattern @ v @ p["value_up"][h]
    return delta + (p["output_bias"] if cfg.bias else 0.0), np.stack(patterns)


def np_mlp(p, x, cfg):
    def linear(name):
        return x @ p[name] + (p[f"{name}_bias"] if cfg.bias else 0.0)
    h = (NP_ACTIVATIONS["silu"](linear("gate")) * linear("up") if cfg.activation == "swiglu"
         else NP_ACTIVATIONS[cfg.activation](linear("up")))
    return h @ p["down"] + (p["down_bias"] if cfg.bias else 0.0)


def np_layer(blocks, l):
    return jax.tree.map(lambda a: a[l], blocks)


def np_encode(params, source, cfg):
    """Every source token sees every other one, before and after it."""
    x = params["embed"]["token"][source]
    if cfg.position == "learned":
        x = x + params["encoder"]["position"][: len(source)]
    everything = np.ones((len(source), len(source)), bool)
    patterns = []
    for l in range(cfg.n_encoder_layers):
        layer = np_layer(params["encoder"]["blocks"], l)
        h = np_norm(layer["attention_norm"], x, cfg)
        delta, pats = np_attention(layer["attention"], h, h, everything, cfg,
                                   cfg.position == "rope")
        x = x + delta
        x = x + np_mlp(layer["mlp"], np_norm(layer["mlp_norm"], x, cfg), cfg)
        patterns.append(pats)
    return np_norm(params["encoder"]["final_norm"], x, cfg), np.stack(patterns)


def np_forward(params, source_BS, lengths, tokens_BT, cfg):
    """(logits [B, T, V], cross patterns [B, L, N, T, S] with 0 on padding)."""
    all_logits, all_cross = [], []
    for source, n, tokens in zip(source_BS, lengths, tokens_BT):
        memory, _ = np_encode(params, source[:n], cfg)
        x = params["embed"]["token"][tokens]
        if cfg.position == "learned":
            x = x + params["embed"]["position"][: len(tokens)]
        causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
        cross = []
        for l in range(cfg.n_layers):
            layer = np_layer(params["blocks"], l)
            h = np_norm(layer["attention_norm"], x, cfg)
            x = x + np_attention(layer["attention"], h, h, causal, cfg, cfg.position == "rope")[0]
            h = np_norm(layer["cross_attention_norm"], x, cfg)
            delta, pats = np_attention(layer["cross_attention"], h, memory,
                                       np.ones((len(tokens), n), bool), cfg, rope=False)
            x = x + delta
            x = x + np_mlp(layer["mlp"], np_norm(layer["mlp_norm"], x, cfg), cfg)
            cross.append(np.pad(pats, ((0, 0), (0, 0), (0, source_BS.shape[1] - n))))
        x = np_norm(params["final_norm"], x, cfg)
        w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
        all_logits.append(x @ w_DV)
        all_cross.append(np.stack(cross))
    return np.stack(all_logits), np.stack(all_cross)


_forward = jax.jit(forward_encoder_decoder, static_argnames=("cfg", "return_patterns"))

# The bound: 1e-5 on logits of order one (the float32 error seen is ~1e-6; a wrong
# mask, a padded key read, RoPE in cross-attention or a missing norm move logits by > 1e-2).
ATOL = 1e-5


@pytest.mark.parametrize("attention", PATHS)
def test_every_path_matches_numpy(attention):
    # RMSNorm, RoPE, untied: the other branches of the reference; the ragged source throughout.
    cfg = tiny(attention=attention, position="rope", norm="rmsnorm", tie_embeddings=False)
    params, params_np = random_params(cfg, seed=3)
    source, mask = source_and_mask(cfg)
    tokens = targets(cfg)
    logits, patterns = _forward(params, source, tokens, cfg=cfg, source_mask_BS=mask,
                                return_patterns=True)
    want_logits, want_cross = np_forward(params_np, source, LENGTHS, tokens, cfg)
    assert logits.shape == (B, T, cfg.vocab_size)
    assert 0.5 < np.abs(want_logits).std() < 10  # logits of order one: 1e-5 means something
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=ATOL)
    if attention in ("reference", "fused"):  # the others make no patterns
        np.testing.assert_allclose(np.asarray(patterns["cross"]), want_cross, rtol=0, atol=ATOL)
        assert np.all(np.asarray(patterns["cross"])[0, ..., LENGTHS[0]:] == 0)


@pytest.mark.parametrize("position,norm,bias", [("learned", "layernorm", True),
                                                ("learned", "rmsnorm", False)])
def test_learned_positions_and_biases_match_numpy(position, norm, bias):
    cfg = tiny(attention="fused", position=position, norm=norm, bias=bias)
    params, params_np = random_params(cfg, seed=4)
    source, mask = source_and_mask(cfg, seed=5)
    tokens = targets(cfg, seed=6)
    logits = _forward(params, source, tokens, cfg=cfg, source_mask_BS=mask)
    want, _ = np_forward(params_np, source, LENGTHS, tokens, cfg)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attention", PATHS)
def test_cross_attention_is_the_explanations_head(attention):
    """The layer equals the explanation's attention_head with source_SD, summed over heads
    (plus the output bias), one sequence at a time; a source of another length than x."""
    cfg = tiny(attention=attention)
    params, _ = random_params(cfg, seed=7)
    layer = jax.tree.map(lambda a: a[1], params["blocks"]["cross_attention"])
    x_BTD = jax.random.normal(jax.random.key(8), (B, T, cfg.d_model))
    source_BSD = jax.random.normal(jax.random.key(9), (B, S, cfg.d_model))
    source = {**source_keys_values(layer, source_BSD), "mask": jnp.ones((B, S), bool)}
    got, _ = jax.jit(cross_attention_layer, static_argnums=3)(layer, x_BTD, source, cfg)
    heads = heads_view(layer)

    def explained(x_TD, source_SD):
        deltas_NTD, _ = jax.vmap(lambda head: attention_head(head, x_TD, None, source_SD))(heads)
        return deltas_NTD.sum(0) + layer["output_bias"]

    want = jax.vmap(explained)(x_BTD, source_BSD)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL)


def _position_gradients(fn):
    """fn(params) -> [T, D] made into (params, row) -> |d fn(params)[row] / d each position
    vector|, summed over features, for the decoder's positions and the encoder's: which
    positions the output at `row` can see. One compiled program for every row."""
    grad = jax.jit(jax.grad(lambda p, row: fn(p)[row].sum()))

    def seen(params, row):
        grads = grad(params, row)
        size = lambda g: np.abs(np.asarray(g)).sum(-1)
        return size(grads["embed"]["position"]), size(grads["encoder"]["position"])
    return seen


def test_decoder_sees_no_future_target_encoder_sees_whole_source():
    cfg = tiny(attention="fused", tie_embeddings=False)
    params, _ = random_params(cfg, seed=10)
    source, mask = source_and_mask(cfg, seed=11)
    tokens = targets(cfg, seed=12)
    forward_row0 = lambda p: forward_encoder_decoder(p, source[:1], tokens[:1], cfg,
                                                      source_mask_BS=mask[:1])[0]
    seen_from_row0 = _position_gradients(forward_row0)
    for t in (0, 4, T - 1):
        decoder_seen, source_seen = seen_from_row0(params, t)
        assert np.all(decoder_seen[: t + 1] > 1e-6), (t, decoder_seen)
        assert np.all(decoder_seen[t + 1:] == 0), (t, decoder_seen)  # the future: nothing
        n = LENGTHS[0]
        assert np.all(source_seen[:n] > 1e-6), (t, source_seen)  # every real source token
        assert np.all(source_seen[n:] == 0), (t, source_seen)  # padding: nothing
    # In the encoder, the first source token already depends on the last real one.
    encoded_row0 = lambda p: encode(p, source[:1], cfg, mask[:1])[0][0]
    _, source_seen = _position_gradients(encoded_row0)(params, 0)
    assert np.all(source_seen[: LENGTHS[0]] > 1e-6) and np.all(source_seen[LENGTHS[0]:] == 0)


@pytest.mark.parametrize("loss_chunk", [0, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_is_the_masked_mean_of_the_targets_negative_log_likelihood(dtype, loss_chunk):
    """encoder_decoder_loss against NumPy's float64 cross-entropy of the model's own logits over
    the unmasked target positions, whole or 3 target positions at a time: within f32 rounding;
    in bf16 (the fused, padded loss), within one bf16 rounding of the loss, since the logits
    are bf16 products summed in f32 both ways."""
    cfg = tiny(dtype=dtype, vocab_size=61, loss_chunk=loss_chunk)  # 61 columns, padded to 128
    params, _ = random_params(cfg, seed=20)
    source, mask = source_and_mask(cfg, seed=21)
    tokens, target_mask = targets(cfg, seed=22), np.arange(T)[None, :] < np.array([[5], [T]])
    inputs, wanted = tokens[:, :-1], tokens[:, 1:]
    value = float(jax.jit(lambda p: encoder_decoder_loss(
        p, source, inputs, wanted, cfg, source_mask_BS=mask,
        target_mask_BT=target_mask[:, 1:]))(params))
    logits = np.asarray(forward_encoder_decoder(params, source, inputs, cfg, source_mask_BS=mask),
                        np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, wanted[..., None], -1)[..., 0]
    expected = nll[target_mask[:, 1:]].mean()
    assert abs(value - expected) <= (1e-5 if dtype == "float32" else 2.0 ** -8) * expected, \
        (value, expected)


def test_cached_greedy_decoding_equals_the_uncached_forward():
    """Each step's logits from the KV-cached decoder (source encoded once) equal the full
    forward pass over the tokens it chose, teacher-forced; and each token is their argmax."""
    cfg = tiny(attention="fused", context_length=T)
    params, _ = random_params(cfg, seed=13)
    source, mask = source_and_mask(cfg, seed=14)
    tokens, logits = jax.jit(greedy_decode, static_argnames=("cfg", "start_token", "max_len"))(
        params, source, cfg, start_token=1, max_len=T, source_mask_BS=mask)
    tokens, logits = np.asarray(tokens), np.asarray(logits)
    assert len(set(tokens.ravel().tolist())) > 2  # random weights: not one token over and over
    inputs = np.concatenate([np.ones((B, 1), np.int32), tokens[:, :-1]], axis=1)
    want = np.asarray(_forward(params, source, inputs, cfg=cfg, source_mask_BS=mask))
    np.testing.assert_allclose(logits, want, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(tokens, want.argmax(-1))


def test_errors_name_the_field_before_compiling():
    cfg = tiny()
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    source, mask = source_and_mask(cfg)
    tokens = targets(cfg)
    from headwise.model import forward
    with pytest.raises(ValueError, match="forward_encoder_decoder"):
        forward(params, tokens, cfg)
    with pytest.raises(ValueError, match="source_length"):
        forward_encoder_decoder(params, np.zeros((B, 9), np.int32), tokens, cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        forward_encoder_decoder(params, source + cfg.vocab_size, tokens, cfg)
    with pytest.raises(ValueError, match="one True/False per source token"):
        forward_encoder_decoder(params, source, tokens, cfg, source_mask_BS=mask[:, :3])
    with pytest.raises(ValueError, match="n_encoder_layers"):
        forward_encoder_decoder(params, source, tokens, ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="n_encoder_layers must be an integer >= 0"):
        tiny(n_encoder_layers=-1)


def test_parameters_counted_sharded_and_decoder_only_unchanged():
    """Cross-attention and the encoder use the self-attention specs, so the tally and the
    rules cover them; n_encoder_layers=0 adds nothing to the tree."""
    from headwise.model import count_params, param_axes
    cfg = tiny(n_encoder_layers=3)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert count_params(cfg)["total"] == sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    axes = param_axes(cfg)
    assert axes["blocks"]["cross_attention"] == axes["blocks"]["attention"]
    assert axes["encoder"]["blocks"]["attention"] == axes["blocks"]["attention"]
    assert shapes["encoder"]["blocks"]["attention"]["query"].shape[0] == 3
    decoder_only = jax.eval_shape(lambda k: init_params(ModelConfig.preset("tiny"), k),
                                  jax.random.key(0))
    assert "encoder" not in decoder_only and "cross_attention" not in decoder_only["blocks"]
