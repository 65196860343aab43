"""`linear`: every weight matrix of the model applied as one 2-D matmul over all positions."""
import jax


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, ...out] (+ b [...out]) as ONE [positions, in] x [in, out] matmul.
    On a 3-D x, or with the output's axes (heads, head width) kept apart, the weight gradient
    contracts two axes at once and XLA:CPU transposes activations for it in slow loop fusions;
    as a 2-D matmul it is a plain x.T @ dy (issue 13)."""
    y = (x.reshape(-1, x.shape[-1]) @ w.reshape(w.shape[0], -1))
    y = y.reshape(*x.shape[:-1], *w.shape[1:])
    return y if b is None else y + b
