"""Generation with a KV cache: prefill the prompts, then one jitted step per new token."""
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .attention import CACHE_AXES
from .config import ModelConfig
from .logical import constrain
from .sampling import sample_token
from .transformer import embed, run_blocks, unembed

# Layout: prompts are RIGHT-padded, so every row's token t sits at position t and in cache
# slot t; row b's true length is lengths[b]. The cache is {"key", "value"}: [L, B, C, N, H]
# with C = context_length, fixed, so the decode step has one shape for the whole generation.
# Prefill and decode steps run the model's own blocks (`run_blocks`), cache in hand.


def init_cache(cfg: ModelConfig, batch: int, length: int | None = None) -> dict:
    """An empty cache: keys and values of every layer, [L, B, length, N, H] (default length:
    the context)."""
    length = cfg.context_length if length is None else length
    shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.d_head)
    return {name: constrain(jnp.zeros(shape, cfg.dtype), ("layers", *CACHE_AXES))
            for name in ("key", "value")}


def prefill(params: dict, tokens_BP: jax.Array, lengths_B: jax.Array, cfg: ModelConfig):
    """Right-padded prompts [B, P] with true lengths -> (logits_BV of each row's last prompt
    token, cache). The prompts attend among their own P slots; the cache is then widened to
    the whole context. Pad slots get keys too, but each is overwritten before it is read."""
    B, P = tokens_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
    x_BPD, cache, _ = run_blocks(params, embed(params, tokens_BP, cfg, positions_BP), cfg,
                                 positions_BT=positions_BP, cache=init_cache(cfg, B, P))
    widen = ((0, 0), (0, 0), (0, cfg.context_length - P), (0, 0), (0, 0))
    cache = {name: constrain(jnp.pad(c, widen), ("layers", *CACHE_AXES))
             for name, c in cache.items()}
    last_BD = jnp.take_along_axis(x_BPD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return unembed(params, last_BD, cfg), cache


def decode_step(params: dict, cache: dict, tokens_B: jax.Array, positions_B: jax.Array,
                cfg: ModelConfig):
    """One new token per row at its own position -> (logits_BV, cache)."""
    positions_B1 = positions_B[:, None]
    x_B1D, cache, _ = run_blocks(params, embed(params, tokens_B[:, None], cfg, positions_B1),
                                 cfg, positions_BT=positions_B1, cache=cache)
    return unembed(params, x_B1D[:, 0], cfg), cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _choose(logits_BV, key, step, done_B, stop_token, *, sampling):
    """Sample, blank (-1) rows already done, and mark rows that just produced the stop token
    (-1: none). Jitted apart from the model, so a new sampling setting compiles only this."""
    token_B = sample_token(logits_BV, jax.random.fold_in(key, step), *sampling).astype(jnp.int32)
    return jnp.where(done_B, -1, token_B), done_B | (token_B == stop_token)


_prefill_jit = jax.jit(prefill, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step_jit(params, cache, tokens_B, positions_B, cfg):
    """The decode step: shapes never change during a generation, so this compiles once (per
    batch size and config). Rows that are done feed -1; any id will do, their output is
    discarded."""
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


def generate_with_logits(params: dict, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
          *, key: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0, stop_token: int | None = None):
    """Yield (tokens_B, logits_BV) per step: each row's new token, or -1 once the row has
    emitted `stop_token` (which is itself yielded), and the logits it was sampled from.
    Ends early when every row has stopped."""
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_token)  # now, not lazily
    sampling = (float(temperature), int(top_k), float(top_p))
    key = jax.random.key(0) if key is None else key
    stop = jnp.int32(-1 if stop_token is None else stop_token)  # traced: no compile per stop id
    return _generation_loop(params, cfg, *_pad(prompts, cfg), max_new_tokens, key, stop, sampling)


def _generation_loop(params, cfg, tokens_BP, lengths_B, max_new_tokens, key, stop, sampling):
    if max_new_tokens == 0:
        return
    logits_BV, cache = _prefill_jit(params, tokens_BP, lengths_B, cfg=cfg)
    done_B = jnp.zeros(len(lengths_B), bool)
    for step in range(max_new_tokens):
        if step:
            if bool(done_B.all()):
                return
            logits_BV, cache = _decode_step_jit(params, cache, token_B, lengths_B + step - 1,
                                                cfg=cfg)
        token_B, done_B = _choose(logits_BV, key, step, done_B, stop, sampling=sampling)
        yield np.asarray(token_B), logits_BV


def generate_stream(params: dict, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    **sampling) -> Iterator[np.ndarray]:
    """Yield one int32 array [B] per step: each row's new token, or -1 once the row has
    emitted `stop_token` (which is itself yielded). Ends early when every row has stopped.
    Keywords as `generate`: key, temperature, top_k, top_p, stop_token."""
    return (tokens_B for tokens_B, _ in generate_with_logits(params, cfg, prompts, max_new_tokens, **sampling))


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
