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


def linears(x: jax.Array, ws: tuple, bs: tuple = ()) -> tuple:
    """`linear` of x by each weight in `ws` (with its bias from `bs`, if any): a tuple. Their
    input's gradient is ONE matmul, of the outputs' gradients stacked by the weights stacked
    (see `_linears_bwd`)."""
    ys = _linears(x.reshape(-1, x.shape[-1]), tuple(ws), tuple(bs))
    return tuple(y.reshape(*x.shape[:-1], *y.shape[1:]) for y in ys)


@jax.custom_vjp
def _linears(x_MD, ws, bs):
    return tuple(linear(x_MD, w, b) for w, b in zip(ws, bs or (None,) * len(ws)))


def _linears_fwd(x_MD, ws, bs):
    return _linears(x_MD, ws, bs), (x_MD, ws, bool(bs))


def _linears_bwd(saved, dys):
    """Under tensor parallelism each weight's output axes are split over devices, so the
    input's gradient is a partial sum on each: summing three matmuls would all-reduce three
    times (+28 % of test_plan's tp bytes), one matmul of the stacked arrays all-reduces once.
    Each weight's gradient is its own x.T @ dy (autodiff of one stacked matmul padded and
    transposed the outputs' gradients: a twelfth of the CPU gradient, issue 13)."""
    x_MD, ws, biased = saved
    dY = jnp.stack(dys, axis=1)
    out = tuple(range(1, dY.ndim))
    dx_MD = jnp.tensordot(dY, jnp.stack(ws, axis=1), axes=(out, out))
    dws = tuple(jnp.tensordot(x_MD, dy, axes=(0, 0)) for dy in dys)
    return dx_MD, dws, tuple(dy.sum(0) for dy in dys) if biased else ()


_linears.defvjp(_linears_fwd, _linears_bwd)
