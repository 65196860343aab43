"""`linear`: a weight applied to every position as one 2-D matmul."""
import jax
import jax.numpy as jnp


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] times w [in, *out] (+ b [*out]) as ONE matmul of x's positions flattened,
    [positions, in], contracting w's first axis: [..., *out]. With x 3-D, the weight gradient
    contracts two axes at once and XLA:CPU transposes activations for it in slow loop fusions;
    this way it is a plain x.T @ dy (issue 13). w's other axes stay apart, so a heads axis
    split over devices stays split."""
    y = jnp.tensordot(x.reshape(-1, x.shape[-1]), w, axes=1)
    y = y.reshape(*x.shape[:-1], *w.shape[1:])
    return y if b is None else y + b
