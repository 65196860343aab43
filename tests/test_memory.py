"""Compiled memory of the whole model's gradient (XLA's own figure), by attention path and remat."""
import jax
import jax.numpy as jnp
import pytest

from headwise.model import ModelConfig, init_params, loss

MiB = 2 ** 20


def gradient_temp_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """Temporary bytes of the compiled gradient of the loss, compiled only (nothing runs)."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, t: loss(p, t, t, cfg)))
    return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def one_wide_block(T: int, **overrides) -> ModelConfig:
    """One GPT-2-small-wide block (12 heads of 64, width 768) over a byte vocabulary, so the
    logits stay small next to attention."""
    return ModelConfig.preset("gpt2-small", n_layers=1, vocab_size=256, context_length=T,
                              **overrides)


def test_chunked_model_gradient_memory_is_linear_in_length():
    """The model's gradient on the 'chunked' path: x2.1 at most from T = 4096 to 8192, and under
    1.2 GiB at 8192, where the 'fused' path's [B, N, T, T] patterns need 9 GiB. (Before the
    key blocks' masks were made inside the loop, JAX's partial evaluation kept every block's
    mask at once: 2.1 GiB, x3.1 per doubling.) From 2048 to 4096 XLA's heap packing alone moves
    the figure by ~10 %, so the slope is read above that."""
    chunked = {T: gradient_temp_bytes(one_wide_block(T, attention="chunked"), 1, T)
               for T in (4096, 8192)}
    fused_8k = gradient_temp_bytes(one_wide_block(8192, attention="fused"), 1, 8192)
    assert chunked[8192] / chunked[4096] <= 2.1, chunked
    assert chunked[8192] <= 1.2 * 1024 * MiB, chunked[8192] / MiB
    pattern_bytes = 12 * 8192 * 8192 * 4  # one f32 [N, T, T] pattern: what 'chunked' never holds
    assert fused_8k > 2 * pattern_bytes > 2 * chunked[8192], (fused_8k / MiB, chunked[8192] / MiB)
