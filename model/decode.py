"""Generation with a KV cache: prefill the prompts, then one jitted step per new token."""
import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .attention import (attend_chunked, attend_dot_product, attend_fused, attention_pattern,
                        attention_scores, heads_to_residual, project_qkv, rope)
from .config import ModelConfig
from .logical import constrain
from .sampling import sample_token
from .transformer import _cast, mlp, norm, unembed

# Layout: prompts are RIGHT-padded, so every row's token t sits at position t and in cache
# slot t; row b's true length is lengths[b]. The cache is {"key", "value"}: [L, B, C, N, H]
# with C = context_length, fixed, so the decode step has one shape for the whole generation.


CACHE_AXES = ("layers", "batch", None, "heads", "head_dim")  # split like the activations


def init_cache(cfg: ModelConfig, batch: int) -> dict:
    """An empty cache: keys and values of every layer, [L, B, context_length, N, H]."""
    shape = (cfg.n_layers, batch, cfg.context_length, cfg.n_heads, cfg.d_head)
    return {name: constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES) for name in ("key", "value")}


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
    k_BSNH, v_BSNH = (constrain(_write(c, new, starts_B), CACHE_AXES[1:])
                      for c, new in ((k_BSNH, k), (v_BSNH, v)))
    out_BTNH = attend(q, k_BSNH, v_BSNH, mask_BTS, cfg)
    x_BTD = x_BTD + heads_to_residual(layer["attention"], out_BTNH)
    x_BTD = x_BTD + mlp(layer["mlp"], norm(layer["mlp_norm"], x_BTD, cfg), cfg)
    return constrain(x_BTD, ("batch", "seq", "embed")), k_BSNH, v_BSNH


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


def decode_config(cfg: ModelConfig) -> ModelConfig:
    """The config decoding runs under: every path decodes with the 'fused' einsums. One query
    against the cache makes a [B, N, 1, S] pattern, too small for chunking or flash attention
    to pay; and one compiled step then serves every path."""
    return dataclasses.replace(cfg, attention="fused", attention_chunk=ModelConfig.attention_chunk)


def decode_step(params: dict, cache: dict, tokens_B: jax.Array, positions_B: jax.Array,
                cfg: ModelConfig):
    """One new token per row at its own position -> (logits_BV, cache), attending by the
    'fused' path whatever `cfg.attention` says (see `decode_config`)."""
    x_B1D, cache = extend(params, cache, tokens_B[:, None], positions_B, decode_config(cfg))
    return unembed(params, x_B1D[:, 0], cfg), cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _choose(logits_BV, key, step, done_B, stop_token, *, sampling):
    """Sample, blank (-1) rows already done, and mark rows that just produced the stop token
    (-1: none). Jitted apart from the model, so a new sampling setting compiles only this."""
    token_B = sample_token(logits_BV, jax.random.fold_in(key, step), *sampling).astype(jnp.int32)
    return jnp.where(done_B, -1, token_B), done_B | (token_B == stop_token)


_first = jax.jit(prefill, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _next(params, cache, tokens_B, positions_B, cfg):
    """The decode step: shapes never change during a generation, so this compiles once (per
    batch size and `decode_config`).
    Rows that are done feed -1; any id will do, their output is discarded."""
    return decode_step(params, cache, jnp.maximum(tokens_B, 0), positions_B, cfg)


def _check(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p, stop_token):
    """Every error a caller can cause, raised before anything compiles."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
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
                             f"generate_stream_sliding, which slides its window")
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
    sampling = (float(temperature), int(top_k), float(top_p))
    key = jax.random.key(0) if key is None else key
    stop = jnp.int32(-1 if stop_token is None else stop_token)  # traced: no compile per stop id
    return _run(params, cfg, *_pad(prompts, cfg), max_new_tokens, key, stop, sampling)


def _run(params, cfg, tokens_BP, lengths_B, max_new_tokens, key, stop, sampling):
    if max_new_tokens == 0:
        return
    logits_BV, cache = _first(params, tokens_BP, lengths_B, cfg=cfg)
    done_B = jnp.zeros(len(lengths_B), bool)
    for step in range(max_new_tokens):
        if step:
            if bool(done_B.all()):
                return
            logits_BV, cache = _next(params, cache, token_B, lengths_B + step - 1,
                                     cfg=decode_config(cfg))  # one compile for all paths
        token_B, done_B = _choose(logits_BV, key, step, done_B, stop, sampling=sampling)
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


def generate_stream_sliding(params: dict, cfg: ModelConfig, prompt: list[int],
                            max_new_tokens: int, *, key: jax.Array | None = None,
                            **sampling) -> Iterator[int]:
    """One prompt, any number of new tokens: when the cache is full, prefill again from the
    newest half of the context and go on (the model then sees at least context_length / 2
    tokens). Prompts longer than the context are cropped to their last context_length tokens."""
    C = cfg.context_length
    tokens = list(prompt)[-C:]
    _check(cfg, [tokens], min(max_new_tokens, 1), sampling.get("temperature", 1.0),
           sampling.get("top_k", 0), sampling.get("top_p", 1.0), sampling.get("stop_token"))
    key = jax.random.key(0) if key is None else key
    return _slide(params, cfg, tokens, max_new_tokens, key, sampling)


def _slide(params, cfg, tokens, max_new_tokens, key, sampling):
    window, left, round_ = list(tokens), max_new_tokens, 0
    while left > 0:
        n = min(left, cfg.context_length + 1 - len(window))
        for token_B in generate_stream(params, cfg, [window], n,
                                       key=jax.random.fold_in(key, round_), **sampling):
            if token_B[0] < 0:
                return
            tokens.append(int(token_B[0]))
            yield int(token_B[0])
            if token_B[0] == sampling.get("stop_token"):
                return
        left, round_ = left - n, round_ + 1
        window = tokens[-max(1, cfg.context_length // 2):]
