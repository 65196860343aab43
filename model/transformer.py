"""The forward pass: embed, a scan over blocks (attention then MLP), unembed."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention_layer
from .config import ModelConfig
from .cross_attention import cross_attention_layer
from .fused import gelu_tanh, layer_norm
from .linear import linear
from .logical import constrain

_ACTIVATIONS = {
    "gelu_tanh": gelu_tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def norm(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """LayerNorm (centre, scale, shift) or RMSNorm (scale only), computed in f32."""
    return layer_norm(x, p["scale"], p.get("bias"), cfg.norm_eps, cfg.norm == "layernorm")


def mlp(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Up to d_mlp, a nonlinearity (or SwiGLU's gated product), back down to d_model."""
    h = linear(x, p["up"], p.get("up_bias"))
    if cfg.activation == "swiglu":
        h = jax.nn.silu(linear(x, p["gate"], p.get("gate_bias"))) * h
    else:
        h = _ACTIVATIONS[cfg.activation](h)
    return linear(h, p["down"], p.get("down_bias"))


def block(layer: dict, x_BTD: jax.Array, cfg: ModelConfig, *, positions_BT=None, cache=None,
          inspect: bool = False, causal: bool = True, mask_BTS=None, source=None):
    """Pre-norm block: attention's summed head deltas, then the MLP's, added to the residual.
    Training, prefill and each decode step all run this; see `attention_layer` for the cache,
    `causal` and `mask_BTS` (an encoder block: causal=False and the source's padding mask).
    With `source` (a decoder block of an encoder-decoder: this layer's keys and values of the
    encoded source, and its mask), a cross-attention layer sits between attention and MLP.
    Returns (x_BTD, cache, seen): with `inspect`, `seen` keeps what the block did (the residual
    entering it, patterns, each head's change, the attention and MLP changes); else None."""
    attention_delta, cache, seen = attention_layer(
        layer["attention"], norm(layer["attention_norm"], x_BTD, cfg), cfg,
        positions_BT=positions_BT, cache=cache, causal=causal, mask_BTS=mask_BTS,
        inspect=inspect)
    x_mid = x_BTD + attention_delta
    if source is not None:
        cross_delta, cross_seen = cross_attention_layer(
            layer["cross_attention"], norm(layer["cross_attention_norm"], x_mid, cfg), source,
            cfg, inspect)
        x_mid = x_mid + cross_delta
    mlp_delta = mlp(layer["mlp"], norm(layer["mlp_norm"], x_mid, cfg), cfg)
    if inspect:
        seen = {"residual": x_BTD, "patterns": seen["patterns"],
                "head_deltas": _head_deltas(seen, layer["attention"]),
                "attention_deltas": attention_delta, "mlp_deltas": mlp_delta}
        if source is not None:
            seen |= {"cross_patterns": cross_seen["patterns"],
                     "cross_head_deltas": _head_deltas(cross_seen, layer["cross_attention"]),
                     "cross_attention_deltas": cross_delta}
    return x_mid + mlp_delta, cache, seen


def _head_deltas(seen: dict, layer: dict) -> jax.Array:
    """Each head's proposed change [B, N, T, D]: its weighted values through its value_up."""
    return jnp.einsum("BTNH,NHD->BNTD", seen["head_outputs"], layer["value_up"])


def embed(params: dict, tokens: jax.Array, cfg: ModelConfig,
          positions: jax.Array | None = None) -> jax.Array:
    """Context-free token vectors (plus learned position vectors): [..., T] -> [..., T, D].
    Token t sits at position t unless `positions` (same shape as `tokens`) says otherwise."""
    x = jnp.take(params["embed"]["token"], tokens, axis=0)
    if cfg.position == "learned":
        table = params["embed"]["position"]
        x = x + (table[: tokens.shape[-1]] if positions is None
                 else jnp.take(table, positions, axis=0))
    return x.astype(cfg.dtype)


@jax.custom_vjp
def _logits_f32(x_BTD: jax.Array, w_DV: jax.Array) -> jax.Array:
    """x @ w accumulated and returned in f32, for 16-bit x and w. Its gradient rounds the
    incoming f32 gradient to x's dtype first, so the two backward matmuls run in 16 bits as
    every other matmul's gradient does (left f32, they were 40 % of a GPT-2 step on an H100)."""
    return jnp.matmul(x_BTD, w_DV, preferred_element_type=jnp.float32)


def _logits_f32_fwd(x_BTD, w_DV):
    return _logits_f32(x_BTD, w_DV), (x_BTD, w_DV)


def _logits_f32_bwd(saved, g_BTV):
    x_BTD, w_DV = saved
    g_BTV = g_BTV.astype(x_BTD.dtype)
    return (jnp.einsum("BTV,DV->BTD", g_BTV, w_DV),
            jnp.einsum("BTD,BTV->DV", x_BTD, g_BTV))


_logits_f32.defvjp(_logits_f32_fwd, _logits_f32_bwd)


def unembed(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm, then every position's vector against every token: logits in f32,
    accumulated in f32 (bf16 logits near 10 would be 1/16 apart)."""
    x = norm(params["final_norm"], x, cfg)
    w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
    if x.dtype == jnp.float32:
        return linear(x, w_DV)
    return _logits_f32(x, w_DV.astype(x.dtype))


# jax.checkpoint's policy per ModelConfig.remat (None: save nothing but the block's inputs).
REMAT_POLICIES = {"full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def rematerialized(step, remat: str):
    """The scan's block step, with what its backward pass may keep chosen by `remat`. Inside
    a scan, CSE cannot merge the recomputation with the forward pass, so it need not be
    prevented (jax.checkpoint's documented advice)."""
    if remat == "none":
        return step
    return jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)


def run_blocks(params: dict, x_BTD: jax.Array, cfg: ModelConfig, *, positions_BT=None,
               cache=None, inspect: bool = False, causal: bool = True, mask_BTS=None,
               source=None):
    """Every block of params["blocks"] under `lax.scan` (compile time does not grow with
    depth), each reading and writing its layer of the cache ([L, ...] leaves) if there is one:
    (x_BTD, cache, seen), `seen` being each block's (see `block`) stacked on a leading layers axis, or None.
    `source` ({"key", "value"}: [L, B, S, N, H], "mask": [B, S]) gives each block its layer
    of the encoded source to cross-attend to."""
    layer_sources = None if source is None else {k: source[k] for k in ("key", "value")}

    def step(x_BTD, inputs):
        layer, layer_cache, layer_source = inputs
        if layer_source is not None:
            layer_source = dict(layer_source, mask=source["mask"])
        x_BTD, layer_cache, seen = block(_cast(layer, cfg.dtype), x_BTD, cfg,
                                         positions_BT=positions_BT, cache=layer_cache,
                                         inspect=inspect, causal=causal, mask_BTS=mask_BTS,
                                         source=layer_source)
        # The residual stream at block boundaries (sharded as the rules say, if any).
        return constrain(x_BTD, ("batch", "seq", "embed")), (layer_cache, seen)

    if cache is not None:
        return _run_blocks_cached(step, params, x_BTD, cfg, cache, layer_sources)
    x_BTD, (cache, seen) = jax.lax.scan(rematerialized(step, cfg.remat), x_BTD,
                                        (params["blocks"], cache, layer_sources),
                                        unroll=cfg.scan_unroll)
    return x_BTD, cache, seen


def _run_blocks_cached(step, params, x_BTD, cfg: ModelConfig, cache, layer_sources):
    """`run_blocks`' scan with the whole cache carried: each block writes its layer's new keys
    and values into it in place. Taken as the scan's xs and returned as its ys, the whole
    cache was copied at every decode step; taken out and put back, each layer's slice was
    (batch 8, 272 slots, quiet machine: 7.8 ms a step as xs/ys, 5.2 put back; under load,
    13 ms put back against 4-7 in place)."""

    def carried(carry, inputs):
        x_BTD, cache = carry
        layer, i, layer_source = inputs
        x_BTD, (cache, seen) = step(x_BTD, (layer, dict(cache, layer=i), layer_source))
        return (x_BTD, {name: cache[name] for name in ("key", "value")}), seen

    (x_BTD, cache), seen = jax.lax.scan(
        rematerialized(carried, cfg.remat), (x_BTD, cache),
        (params["blocks"], jnp.arange(cfg.n_layers), layer_sources), unroll=cfg.scan_unroll)
    return x_BTD, cache, seen


def forward_embeddings(params: dict, x_BTD: jax.Array, cfg: ModelConfig, *,
                       return_patterns: bool = False):
    """From embeddings [B, T, D] to logits [B, T, V] (and patterns [L, B, N, T, T])."""
    x_BTD, _, seen = run_blocks(params, x_BTD, cfg, inspect=return_patterns)
    logits = constrain(unembed(params, x_BTD, cfg), ("batch", "seq", "vocab"))
    return (logits, seen["patterns"]) if return_patterns else logits


def check_tokens(tokens, cfg: ModelConfig, name: str = "tokens") -> None:
    """Host-side checks that need no compilation: rank, length, and (when the values are
    known, i.e. not under jit) the range of ids."""
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"{name} must be [batch, time], got shape {jnp.shape(tokens)}")
    T = jnp.shape(tokens)[1]
    if T > cfg.context_length:
        raise ValueError(f"{name} has {T} positions but ModelConfig.context_length is "
                         f"{cfg.context_length}: crop the sequence or raise context_length")
    check_ids(tokens, cfg, name)


def check_ids(tokens, cfg: ModelConfig, name: str) -> None:
    """Every id in [0, vocab_size), when the values are known (not under jit)."""
    if not isinstance(tokens, jax.core.Tracer) and np.size(tokens):
        ids = np.asarray(tokens)  # on the host: a jax array closed over under jit is concrete too
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"{name} holds id {hi if hi >= cfg.vocab_size else lo}, outside "
                             f"ModelConfig.vocab_size={cfg.vocab_size}: ids must be in "
                             f"[0, {cfg.vocab_size})")


def _check_decoder_only(cfg: ModelConfig) -> None:
    if cfg.n_encoder_layers:
        raise ValueError(f"ModelConfig.n_encoder_layers={cfg.n_encoder_layers}: this model "
                         f"reads a source; call forward_encoder_decoder(params, source, tokens, "
                         f"cfg), or set n_encoder_layers=0 for a decoder-only model")


def forward(params: dict, tokens_BT: jax.Array, cfg: ModelConfig, return_patterns: bool = False):
    """Logits [B, T, V] for a batch of token ids; with `return_patterns`, also every attention
    pattern, [B, L, N, T, T]. Every path runs the same blocks; `cfg.attention` picks only the
    kernel that turns queries, keys and values into each head's output."""
    _check_decoder_only(cfg)
    check_tokens(tokens_BT, cfg)
    out = forward_embeddings(params, embed(params, tokens_BT, cfg), cfg,
                             return_patterns=return_patterns)
    if not return_patterns:
        return out
    logits, patterns_LBNTS = out
    return logits, patterns_LBNTS.swapaxes(0, 1)
