"""LayerNorm/RMSNorm and tanh-GELU with their gradients written out: one pass over the
activations forward and one back. Autodiff of the plain formulas saves intermediates and makes
several elementwise loops each way, and on the CPU such loops cost about as much as the matmuls
beside them (XLA:CPU, issue 13). Same forward bits as the plain formulas; gradients equal to
autodiff's within float rounding (tests/test_model.py)."""
import functools

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = 0.7978845608028654
_CUBIC = 0.044715


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, center: bool):
    """(x - mean) / rms * scale + bias over the last axis, in f32, returned in x's dtype;
    `center=False` is RMSNorm (no mean taken out); `bias` may be None."""
    return _layer_norm_fwd(x, scale, bias, eps, center)[0]


def _normalized(x, eps, center):
    """(x̂ in f32, 1/rms [..., 1])."""
    x32 = x.astype(jnp.float32)
    if center:
        x32 = x32 - x32.mean(-1, keepdims=True)
    inv_rms = jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)
    return x32 * inv_rms, inv_rms


def _layer_norm_fwd(x, scale, bias, eps, center):
    x_hat, inv_rms = _normalized(x, eps, center)
    y = x_hat * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, scale, bias)


def _layer_norm_bwd(eps, center, saved, dy):
    """dx = (g - mean(g) - x̂ mean(g x̂)) / rms with g = dy * scale (no mean(g) for RMSNorm):
    x̂ is recomputed from x, not saved."""
    x, scale, bias = saved
    x_hat, inv_rms = _normalized(x, eps, center)
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale.astype(jnp.float32)
    dx_hat = g - x_hat * (g * x_hat).mean(-1, keepdims=True)
    if center:
        dx_hat = dx_hat - g.mean(-1, keepdims=True)
    rows = tuple(range(x.ndim - 1))
    dscale = (dy32 * x_hat).sum(rows).astype(scale.dtype)
    dbias = None if bias is None else dy32.sum(rows).astype(bias.dtype)
    return (dx_hat * inv_rms).astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def gelu_tanh(x):
    """GELU, tanh approximation: exactly `jax.nn.gelu(x, approximate=True)`."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, dy):
    """d/dx of x (1 + tanh u) / 2, u = sqrt(2/pi) (x + 0.044715 x^3), from x alone."""
    u = _SQRT_2_OVER_PI * (x + _CUBIC * x * x * x)
    t = jnp.tanh(u)
    du = _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * x * x)
    return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
