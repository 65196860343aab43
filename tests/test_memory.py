"""Compiled memory of the whole model's gradient (XLA's own figure), by attention path and remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import ModelConfig, forward, init_params, loss
from compile_options import FAST
from tolerances import gradient_gap, loss_gap

MiB = 2 ** 20


def gradient_temp_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """Temporary bytes of the compiled gradient of the loss, compiled only (nothing runs)."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, t: loss(p, t, t, cfg)))
    compiled = grad.lower(params, tokens).compile(FAST["compiler_options"])
    return compiled.memory_analysis().temp_size_in_bytes


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_loss_keeps_no_whole_sequence_of_logits(dtype):
    """GPT-2's vocabulary on a narrow block, where the loss's logits are most of the memory
    (f32 [T, 50,304]: 786 MiB at T = 4096). With `loss_chunk = 256` the compiled gradient keeps
    under a third of that at 4096, and from 2048 to 4096 it grows by under 15 % of a logits row
    per position (what it does keep per position is the block's activations); unchunked it
    keeps more than the whole sequence's logits."""
    cfg = lambda T, chunk: ModelConfig(vocab_size=50257, context_length=T, d_model=128,
                                       n_heads=2, d_head=64, n_layers=1, d_mlp=512,
                                       attention="chunked", dtype=dtype, loss_chunk=chunk)
    row = 50304 * 4  # one position's f32 logits, the vocabulary padded to a multiple of 128
    chunked = {T: gradient_temp_bytes(cfg(T, 256), 1, T) for T in (2048, 4096)}
    whole = gradient_temp_bytes(cfg(4096, 0), 1, 4096)
    assert chunked[4096] < 4096 * row / 3 < whole / 3, (chunked[4096] / MiB, whole / MiB)
    assert chunked[4096] - chunked[2048] < 0.15 * 2048 * row, {T: b / MiB for T, b in chunked.items()}


def test_loss_chunk_is_checked():
    with pytest.raises(ValueError, match=r"loss_chunk=128 is not below context_length=128: .* "
                                         r"\(e.g. 32\), or 0"):
        ModelConfig(loss_chunk=128)
    with pytest.raises(ValueError, match=r"loss_chunk must be an integer >= 0, got -1"):
        ModelConfig(loss_chunk=-1)


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("path", ["dot_product", "chunked"])
def test_remat_gives_the_same_loss_and_gradients(remat, path):
    """Rematerializing only recomputes: the loss and every gradient equal those of the model
    that keeps its activations, within float32's rounding of the gradient (tolerances.py)."""
    cfg = ModelConfig.preset("tiny", attention=path, attention_chunk=5, position="rope")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    value_and_grad = lambda c: jax.jit(jax.value_and_grad(loss), static_argnums=3)(
        params, tokens, tokens, c)
    (value, grads), (value_r, grads_r) = value_and_grad(cfg), value_and_grad(
        dataclasses.replace(cfg, remat=remat))
    max_logit = float(jnp.abs(forward(params, tokens, cfg)).max())
    assert abs(value - value_r) <= loss_gap(cfg, 16, tokens.size, max_logit, float(value))
    gap = gradient_gap(params, tokens, tokens, cfg)
    jax.tree.map(lambda a, b, g: np.testing.assert_array_less(np.abs(a - b), g + 1e-30),
                 grads_r, grads, gap)


def test_remat_keeps_less():
    """Compiled temporary memory of a 4-block, 768-wide model's gradient (batch 4 x 1024):
    'dots' keeps the projections' and MLP's matmul outputs, 'full' only each block's input, so
    each keeps less than the one before. Measured: 3,921 / 1,352 / 1,075 MiB on 'dot_product'."""
    cfg = ModelConfig.preset("gpt2-small", n_layers=4, vocab_size=256, attention="dot_product")
    temp = {remat: gradient_temp_bytes(dataclasses.replace(cfg, remat=remat), 4, 1024)
            for remat in ("none", "dots", "full")}
    assert temp["dots"] < 0.5 * temp["none"], temp
    assert temp["full"] < 0.9 * temp["dots"], temp
    # Unrolled in part (two blocks per scan step), it still keeps less (measured 1,295 MiB).
    half = gradient_temp_bytes(dataclasses.replace(cfg, remat="full", scan_unroll=2), 4, 1024)
    assert half < 0.7 * temp["none"], (half, temp)


def test_remat_on_a_scan_unrolled_whole_is_refused():
    """Unrolled whole, XLA's program keeps what remat='none' keeps (GPT-2 small on an H200:
    18.5 GiB of temporaries with every policy, against 9.9 for 'full' rolled): the config
    refuses it and says what to set."""
    with pytest.raises(ValueError, match=r"ModelConfig.remat='full' saves no memory when "
                                         r"scan_unroll=4 .* set scan_unroll below n_layers \(e.g. 2\)"):
        ModelConfig.preset("byte-cpu", remat="full")
    assert ModelConfig.preset("byte-cpu", remat="full", scan_unroll=2).remat == "full"


def test_remat_is_checked():
    with pytest.raises(ValueError, match="ModelConfig.remat must be one of"):
        ModelConfig(remat="some")
