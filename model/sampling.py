"""Choosing the next token from logits (greedy, temperature, top-k, top-p), and a simple generator."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .transformer import forward


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """One token id per row. temperature 0 is greedy; top_k keeps the k likeliest (0 = all);
    top_p keeps the smallest set whose probability reaches p."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        mass_before_BV = jnp.cumsum(jax.nn.softmax(sorted_BV), axis=-1) - jax.nn.softmax(sorted_BV)
        cutoff = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), -1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p"))
def _next_token(params, window_BC, length, key, *, cfg, temperature, top_k, top_p):
    """The token after the first `length` tokens of a fixed-size window (one compile)."""
    logits_BCV = forward(params, window_BC, cfg)
    return sample_token(logits_BCV[:, length - 1], key, temperature, top_k, top_p)


def generate_uncached(params: dict, cfg: ModelConfig, prompt: list[int], max_new_tokens: int,
                      key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0):
    """Yield new token ids one at a time, re-reading the whole context each step (no KV cache).
    Past context_length the window slides: the model sees the newest context_length tokens."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max(prompt) >= cfg.vocab_size or min(prompt) < 0:
        raise ValueError(f"prompt ids must be in [0, ModelConfig.vocab_size={cfg.vocab_size})")
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        recent = tokens[-cfg.context_length:]
        window = np.zeros((1, cfg.context_length), np.int32)
        window[0, :len(recent)] = recent
        key, sub = jax.random.split(key)
        token = int(_next_token(params, jnp.asarray(window), len(recent), sub, cfg=cfg,
                                temperature=temperature, top_k=top_k, top_p=top_p)[0])
        tokens.append(token)
        yield token
