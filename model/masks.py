"""Which keys a query may read: the causal rule and the caller's mask, shared by every attention
path."""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Masked scores get the most negative finite value rather than -inf: exp() still makes them
# exactly 0 next to any allowed key, and a row with no allowed key gives no NaN.
MASKED = jnp.finfo(jnp.float32).min


def causal(query_positions_T: jax.Array, key_positions_S: jax.Array) -> jax.Array:
    """[..., T, S] booleans: a key at position s is visible to a query at position t when
    s <= t. The one causal rule: training, decoding and every attention path use it."""
    return key_positions_S <= query_positions_T[..., None]


def causal_mask(T: int, S: int | None = None) -> jax.Array:
    """[T, S] booleans, True where query t may look at key s. With S > T the queries are the
    last T positions of the S keys (as when decoding after a prefix)."""
    S = T if S is None else S
    return causal(jnp.arange(T) + (S - T), jnp.arange(S))


class Visible(NamedTuple):
    """Which keys each query may read: the causal rule (when `causal`) and the caller's mask."""

    positions_BT: jax.Array | None  # the queries' positions; None: the last T of the S keys
    causal: bool = True
    mask_BTS: jax.Array | None = None  # anything broadcasting to [B, T, S]

    def query_positions(self, T: int, S: int) -> jax.Array:
        """[B or 1, T]."""
        positions = jnp.arange(T) + (S - T) if self.positions_BT is None else self.positions_BT
        return jnp.atleast_2d(positions)

    def allowed(self, B: int, T: int, S: int) -> jax.Array:
        """The whole [B, T, S] mask, for the paths that build one."""
        allowed = (causal(self.query_positions(T, S), jnp.arange(S)) if self.causal
                   else jnp.ones((T, S), bool))
        allowed = allowed if self.mask_BTS is None else allowed & self.mask_BTS
        return jnp.broadcast_to(allowed, (B, T, S))
