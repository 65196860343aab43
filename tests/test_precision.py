"""Mixed precision: bf16 compute on f32 parameters and optimizer state trains as f32 does."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import ModelConfig, cross_entropy, forward, init_params, loss, param_axes
from headwise.train.config import OptimConfig
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.step import init_state, train_step
from compile_options import FAST

STEPS, B, T, V = 200, 8, 32, 64
CFG = ModelConfig(vocab_size=V, context_length=T, d_model=64, n_heads=4, d_head=16, n_layers=2,
                  d_mlp=128, position="rope")
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits


def markov_tokens(seed: int = 0) -> np.ndarray:
    """[STEPS, B, T + 1] tokens of a random Markov chain with peaked transitions: something a
    small model learns a lot of in 200 steps (its loss falls by a third)."""
    rng = np.random.default_rng(seed)
    cumulative = rng.dirichlet(np.full(V, 0.1), size=V).cumsum(1)
    tokens = np.zeros((STEPS, B, T + 1), np.int32)
    tokens[:, :, 0] = rng.integers(0, V, (STEPS, B))
    u = rng.random((STEPS, B, T))
    for t in range(T):
        tokens[:, :, t + 1] = (u[:, :, t, None] > cumulative[tokens[:, :, t]]).sum(-1).clip(0, V - 1)
    return tokens


def train_curve(cfg: ModelConfig, tokens: np.ndarray, lr: float = 3e-3):
    """Per-step losses and the final state of the project's own train step, the STEPS steps
    in one compiled scan (one compile, no per-step dispatch)."""
    optim = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=20)
    optimizer = make_optimizer(optim, STEPS, param_axes(cfg))
    step = functools.partial(train_step, cfg=cfg, optimizer=optimizer,
                             schedule=learning_rate(optim, STEPS))
    state = init_state(init_params(cfg, jax.random.key(0)), optimizer, jax.random.key(1))
    batches = {"inputs": tokens[:, :, :-1], "targets": tokens[:, :, 1:]}
    state, metrics = jax.jit(lambda s, b: jax.lax.scan(step, s, b))(state, batches)
    return np.asarray(metrics["loss"]), state


def windows(losses: np.ndarray, size: int = 20) -> np.ndarray:
    return losses.reshape(-1, size).mean(1)


def test_bf16_training_follows_the_f32_curve():
    """200 steps in bf16 compute and in f32, same batches and initial parameters. Tolerance:
    every 20-step mean of the bf16 losses within one bf16 rounding of the loss itself
    (2^-8 x 4 nats = 0.016 nats) of the f32 one; measured 1e-4. It can fail: the same f32 run
    with a learning rate 10 % higher moves the curve by about twice that (measured 0.029).
    Parameters and Adam's moments stay f32 (bf16 is only what the matmuls compute in)."""
    tokens = markov_tokens()
    f32, _ = train_curve(CFG, tokens)
    bf16, state = train_curve(dataclasses.replace(CFG, dtype="bfloat16"), tokens)
    faster, _ = train_curve(CFG, tokens, lr=3.3e-3)
    tolerance = BF16_UNIT_ROUNDOFF * 4.0
    assert windows(f32)[-1] < 0.75 * windows(f32)[0], windows(f32)  # it learned something
    assert np.abs(windows(bf16) - windows(f32)).max() <= tolerance, (windows(bf16), windows(f32))
    assert np.abs(windows(faster) - windows(f32)).max() > tolerance, windows(faster)
    assert np.abs(bf16 - f32).max() > 0, "bf16 gave f32's losses bit for bit: was it used?"
    dtypes = {a.dtype for a in jax.tree.leaves((state["params"], state["opt_state"]))
              if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes


def result_types(hlo: str, op: str) -> set[str]:
    """The element types of every `stablehlo.<op>` result in a lowered module's text."""
    lines = [line for line in hlo.splitlines() if f"stablehlo.{op} " in line]
    return {line.rsplit("x", 1)[-1].rstrip(">") for line in lines}


def test_bf16_matmuls_softmax_and_loss_in_f32():
    """What runs in bf16 and what does not: the compiled loss has bf16 matmuls, while the
    attention softmax's exponentials, the norms' rsqrt and the loss's log-sum-exp are f32."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", attention="fused")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    hlo = jax.jit(lambda p, t: loss(p, t, t, cfg)).lower(params, tokens).as_text()
    assert "bf16" in result_types(hlo, "dot_general"), result_types(hlo, "dot_general")
    for op in ("exponential", "rsqrt", "log"):
        assert result_types(hlo, op) == {"f32"}, (op, result_types(hlo, op))


def test_bf16_gradient_matmuls_are_bf16():
    """Every matmul of the bf16 gradient takes bf16 operands, the unembedding's too: its f32
    logits must not pull its two backward matmuls (the largest in a GPT-2 step) into f32. The
    unembedding gradient itself agrees with the f32 one within bf16's rounding. ('fused':
    XLA's jax.nn.dot_product_attention keeps its own score gradients f32; on a GPU, cuDNN's
    kernel replaces it.)"""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", attention="fused")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(markov_tokens()[0])
    grad = jax.jit(jax.grad(lambda p, t: loss(p, t[:, :-1], t[:, 1:], cfg)))
    hlo = grad.lower(params, tokens).as_text()
    operand_types = {line.rsplit(":", 1)[1].split("->")[0] for line in hlo.splitlines()
                     if "stablehlo.dot_general" in line}
    assert operand_types and all("f32" not in t for t in operand_types), operand_types
    g16 = grad(params, tokens)["embed"]["token"]
    f32 = dataclasses.replace(cfg, dtype="float32")
    g32 = jax.grad(lambda p, t: loss(p, t[:, :-1], t[:, 1:], f32))(params, tokens)["embed"]["token"]
    scale = float(jnp.abs(g32).max())
    assert float(jnp.abs(g16 - g32).max()) < 8 * BF16_UNIT_ROUNDOFF * scale


def test_fused_16bit_loss_equals_logits_then_cross_entropy():
    """In 16-bit compute the loss runs the unembedding and the cross-entropy as one function
    over a vocabulary padded to a multiple of 128 (300 -> 384 here). It must equal the
    unfused path, `cross_entropy(forward(...))`, which the logits' users (sampling, eval of
    patterns) still take: the loss within f32 rounding, every gradient within bf16's, and a
    position mask honoured. The padding's columns take no probability. A bias's gradient sums
    B·T = 256 positions' bf16 terms: roundings of random sign add to about sqrt(256)·u = 16u of
    its largest value (an AMD EPYC shows 4.1u between the paths and 9.4u from float32); dropping
    the mask moves every gradient by at least 115u."""
    cfg = dataclasses.replace(CFG, vocab_size=300, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (B, T))
    fused = lambda p: loss(p, tokens[:, :-1], tokens[:, 1:], cfg, mask)
    unfused = lambda p: cross_entropy(forward(p, tokens[:, :-1], cfg), tokens[:, 1:], mask)
    (value, grads), (value_u, grads_u) = jax.jit(jax.value_and_grad(fused), **FAST)(params), \
        jax.jit(jax.value_and_grad(unfused), **FAST)(params)
    assert abs(float(value - value_u)) <= 4 * 2.0 ** -24 * float(value), (value, value_u)
    for g, g_u in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_u)):
        assert float(jnp.abs(g - g_u).max()) <= 16 * BF16_UNIT_ROUNDOFF * float(jnp.abs(g_u).max())
    hlo = jax.jit(fused).lower(params).as_text()
    assert "8x32x384xf32>" in hlo and "8x32x300xf32>" not in hlo  # logits only padded
    unmasked = float(jax.jit(lambda p: loss(p, tokens[:, :-1], tokens[:, 1:], cfg), **FAST)(params))
    assert abs(unmasked - float(value)) > 1e-4  # the mask changed which positions counted


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_whole_sequences(dtype, tie):
    """`model.loss_chunk`: the logits 7 positions at a time (32 = 4 chunks of 7 and one of 4,
    padded), the backward computing them again. The loss and every gradient equal the
    unchunked loss's (f32: log_softmax of the logits under autodiff; 16-bit: the fused
    function), with a mask, tied or untied."""
    cfg = dataclasses.replace(CFG, vocab_size=300, dtype=dtype, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (B, T))
    values = [jax.jit(jax.value_and_grad(
        lambda p, c=c: loss(p, tokens[:, :-1], tokens[:, 1:], c, mask)), **FAST)(params)
        for c in (cfg, dataclasses.replace(cfg, loss_chunk=7))]
    (value, grads), (value_c, grads_c) = values
    assert abs(float(value_c - value)) <= 4 * 2.0 ** -24 * float(value), (value, value_c)
    # f32: sums in another order (8.7 units of roundoff seen); bf16: the weight's gradient summed
    # over chunks in f32 and rounded once, where one matmul rounds it once (0 seen)
    bound = 16 * 2.0 ** -24 if dtype == "float32" else BF16_UNIT_ROUNDOFF
    for g, g_c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        scale = float(jnp.abs(g).max())
        assert float(jnp.abs(g_c - g).max()) <= bound * scale + 1e-9, scale
