"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""
import jax
import jax.numpy as jnp


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
