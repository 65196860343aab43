"""Generation with a KV cache: prefill the prompts, then one jitted step per new token."""
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .attention import (attend_chunked, attend_dot_product, attend_fused, attention_pattern,
                        attention_scores, project_qkv, rope)
from .config import ModelConfig
from .sampling import sample_token
from .transformer import _cast, mlp, norm, unembed

# Layout: prompts are RIGHT-padded, so every row's token t sits at position t and in cache
# slot t; row b's true length is lengths[b]. The cache is {"key", "value"}: [L, B, C, N, H]
# with C = context_length, fixed, so the decode step has one shape for the whole generation.


def init_cache(cfg: ModelConfig, batch: int) -> dict:
    """An empty cache: keys and values of every layer, [L, B, context_length, N, H]."""
    shape = (cfg.n_layers, batch, cfg.context_length, cfg.n_heads, cfg.d_head)
    return {"key": jnp.zeros(shape, cfg.dtype), "value": jnp.zeros(shape, cfg.dtype)}


def embed_at(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
             cfg: ModelConfig) -> jax.Array:
    """`embed`, but each token gets its own position (per row, not 0..T-1)."""
    x = jnp.take(params["embed"]["token"], tokens_BT, axis=0)
    if cfg.position == "learned":
        x = x + jnp.take(params["embed"]["position"], positions_BT, axis=0)
    return x.astype(cfg.dtype)


def _attend_reference(q_BTNH, k_BSNH, v_BSNH, mask_BTS):
    """The explanation's one-head math (scores, pattern, weighted values), vmapped over N, B."""
    def head(q_TH, k_SH, v_SH, mask_TS):
        pattern_TS = attention_pattern(attention_scores(q_TH, k_SH), mask_TS)
        return pattern_TS.astype(v_SH.dtype) @ v_SH
    heads = jax.vmap(head, in_axes=(1, 1, 1, None), out_axes=1)
    return jax.vmap(heads)(q_BTNH, k_BSNH, v_BSNH, mask_BTS)


def attend(q_BTNH, k_BSNH, v_BSNH, mask_BTS, cfg: ModelConfig):
    """Queries against the cache by the path `cfg.attention` names: out_BTNH."""
    if cfg.attention == "reference":
        return _attend_reference(q_BTNH, k_BSNH, v_BSNH, mask_BTS)
    if cfg.attention == "fused":
        return attend_fused(q_BTNH, k_BSNH, v_BSNH, mask_BTS)[0]
    if cfg.attention == "chunked":
        return attend_chunked(q_BTNH, k_BSNH, v_BSNH, mask_BTS, cfg.attention_chunk)
    return attend_dot_product(q_BTNH, k_BSNH, v_BSNH, mask_BTS, is_causal=False)


def _write(cache_BSNH, new_BTNH, starts_B):
    """Each row's new entries into its own slots starts[b] .. starts[b] + T - 1."""
    put = lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s, 0, 0))
    return jax.vmap(put)(cache_BSNH, new_BTNH.astype(cache_BSNH.dtype), starts_B)


def _layer(x_BTD, layer, k_BSNH, v_BSNH, starts_B, mask_BTS, cfg):
    """One pre-norm block that also reads from and writes to this layer's cache."""
    h = norm(layer["attention_norm"], x_BTD, cfg)
    q, k, v = project_qkv(layer["attention"], h)
    if cfg.position == "rope":
        positions_BT1 = (starts_B[:, None] + jnp.arange(x_BTD.shape[1]))[..., None]
        q, k = rope(q, positions_BT1, cfg.rope_theta), rope(k, positions_BT1, cfg.rope_theta)
    k_BSNH, v_BSNH = _write(k_BSNH, k, starts_B), _write(v_BSNH, v, starts_B)
    out_BTNH = attend(q, k_BSNH, v_BSNH, mask_BTS, cfg)
    B, T, N, H = out_BTNH.shape
    delta = out_BTNH.reshape(B * T, N * H) @ layer["attention"]["value_up"].reshape(N * H, -1)
    delta = delta.reshape(B, T, -1)
    if "output_bias" in layer["attention"]:
        delta = delta + layer["attention"]["output_bias"]
    x_BTD = x_BTD + delta
    x_BTD = x_BTD + mlp(layer["mlp"], norm(layer["mlp_norm"], x_BTD, cfg), cfg)
    return x_BTD, k_BSNH, v_BSNH


def extend(params: dict, cache: dict, tokens_BT: jax.Array, starts_B: jax.Array,
           cfg: ModelConfig, kv_len: int | None = None):
    """Run T new tokens per row at positions starts[b] + t, writing their keys and values into
    the cache and attending to slots s <= starts[b] + t among the first `kv_len` (static; default
    the whole cache). Returns (x_BTD after the blocks, new cache)."""
    T = tokens_BT.shape[1]
    S = cfg.context_length if kv_len is None else kv_len
    positions_BT = starts_B[:, None] + jnp.arange(T)
    mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    x = embed_at(params, tokens_BT, positions_BT, cfg)

    def step(x, inputs):
        layer, k_BCNH, v_BCNH = inputs
        k_BSNH, v_BSNH = k_BCNH[:, :S], v_BCNH[:, :S]
        x, k_BSNH, v_BSNH = _layer(x, _cast(layer, cfg.dtype), k_BSNH, v_BSNH, starts_B,
                                   mask_BTS, cfg)
        return x, (k_BCNH.at[:, :S].set(k_BSNH), v_BCNH.at[:, :S].set(v_BSNH))

    x, (keys, values) = jax.lax.scan(step, x, (params["blocks"], cache["key"], cache["value"]))
    return x, {"key": keys, "value": values}


def prefill(params: dict, tokens_BP: jax.Array, lengths_B: jax.Array, cfg: ModelConfig):
    """Right-padded prompts [B, P] with true lengths -> (logits_BV of each row's last prompt
    token, cache). Pad slots get keys too, but every one is overwritten before it is read."""
    B, P = tokens_BP.shape
    cache = init_cache(cfg, B)
    x_BPD, cache = extend(params, cache, tokens_BP, jnp.zeros(B, jnp.int32), cfg, kv_len=P)
    last_BD = jnp.take_along_axis(x_BPD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return unembed(params, last_BD, cfg), cache


def decode_step(params: dict, cache: dict, tokens_B: jax.Array, positions_B: jax.Array,
                cfg: ModelConfig):
    """One new token per row at its own position -> (logits_BV, cache)."""
    x_B1D, cache = extend(params, cache, tokens_B[:, None], positions_B, cfg)
    return unembed(params, x_B1D[:, 0], cfg), cache


def _choose(logits_BV, key, step, done_B, sampling, stop_token):
    """Sample, blank (-1) rows already done, and mark rows that just produced the stop token."""
    token_B = sample_token(logits_BV, jax.random.fold_in(key, step), *sampling).astype(jnp.int32)
    emitted_B = jnp.where(done_B, -1, token_B)
    return emitted_B, done_B | (token_B == stop_token)  # stop_token -1: none


_STATIC = ("cfg", "sampling")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _first(params, tokens_BP, lengths_B, key, stop_token, *, cfg, sampling):
    logits_BV, cache = prefill(params, tokens_BP, lengths_B, cfg)
    done_B = jnp.zeros(tokens_BP.shape[0], bool)
    return (*_choose(logits_BV, key, 0, done_B, sampling, stop_token), logits_BV, cache)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _next(params, cache, tokens_B, positions_B, done_B, key, step, stop_token, *, cfg, sampling):
    """The decode step: shapes never change during a generation, so this compiles once."""
    logits_BV, cache = decode_step(params, cache, jnp.maximum(tokens_B, 0), positions_B, cfg)
    return (*_choose(logits_BV, key, step, done_B, sampling, stop_token), logits_BV, cache)


def _check(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p, stop_token):
    """Every error a caller can cause, raised before anything compiles."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    C, V = cfg.context_length, cfg.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(prompt) > C:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens but ModelConfig.context_length "
                             f"is {C}: crop the prompt to its last {C} tokens")
        # The last new token is never read back, so n + max_new_tokens - 1 positions are needed.
        if len(prompt) + max_new_tokens - 1 > C:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} "
                             f"needs {len(prompt) + max_new_tokens - 1} positions but "
                             f"ModelConfig.context_length is {C}: lower max_new_tokens to at most "
                             f"{C + 1 - len(prompt)}, shorten the prompt, or use "
                             f"sampling.generate_uncached, which slides its window")
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"prompt {i} holds an id outside ModelConfig.vocab_size={V}: "
                             f"ids must be in [0, {V})")
    if stop_token is not None and not 0 <= stop_token < V:
        raise ValueError(f"stop_token={stop_token} is outside [0, ModelConfig.vocab_size={V})")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")


def _pad(prompts, cfg: ModelConfig):
    """Right-pad to a power of two (capped at the context), so prefill compiles per bucket."""
    longest = max(len(p) for p in prompts)
    P = min(cfg.context_length, 1 << (longest - 1).bit_length())
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def steps(params: dict, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
          *, key: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0, stop_token: int | None = None):
    """Yield (tokens_B, logits_BV) per step: each row's new token, or -1 once the row has
    emitted `stop_token` (which is itself yielded), and the logits it was sampled from.
    Ends early when every row has stopped."""
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_token)  # now, not lazily
    static = dict(cfg=cfg, sampling=(float(temperature), int(top_k), float(top_p)))
    key = jax.random.key(0) if key is None else key
    stop = jnp.int32(-1 if stop_token is None else stop_token)  # traced: no compile per stop id
    return _run(params, *_pad(prompts, cfg), max_new_tokens, key, stop, static)


def _run(params, tokens_BP, lengths_B, max_new_tokens, key, stop, static):
    if max_new_tokens == 0:
        return
    token_B, done_B, logits_BV, cache = _first(params, tokens_BP, lengths_B, key, stop, **static)
    yield np.asarray(token_B), logits_BV
    for step in range(1, max_new_tokens):
        if bool(done_B.all()):
            return
        token_B, done_B, logits_BV, cache = _next(params, cache, token_B, lengths_B + step - 1,
                                                  done_B, key, jnp.int32(step), stop,
                                                  **static)
        yield np.asarray(token_B), logits_BV


def generate_stream(params: dict, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    **sampling) -> Iterator[np.ndarray]:
    """Yield one int32 array [B] per step: each row's new token, or -1 once the row has
    emitted `stop_token` (which is itself yielded). Ends early when every row has stopped.
    Keywords as `generate`: key, temperature, top_k, top_p, stop_token."""
    return (tokens_B for tokens_B, _ in steps(params, cfg, prompts, max_new_tokens, **sampling))


def generate(params: dict, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
             **sampling) -> list[list[int]]:
    """The new tokens of each prompt (ending with `stop_token` where one was produced)."""
    new = [[] for _ in prompts]
    for token_B in generate_stream(params, cfg, prompts, max_new_tokens, **sampling):
        for row, token in zip(new, token_B.tolist()):
            if token >= 0:
                row.append(token)
    return new
