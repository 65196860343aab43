"""Float32 tolerances from the rounding error a computation can make, not from what one machine
happened to give (issue 8: a summation order on AVX2 broke a tolerance picked on AVX-512).

The model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2, §3.1):

- u = 2**-24 is float32's unit roundoff: each +, -, *, / and sqrt is exact to within (1 + d), |d| <= u.
- A sum or dot product of K terms, added in ANY order (any SIMD width, blocking, tree, thread
  split or device split), is within (K - 1)·u·Σ|terms| of the exact value (first order).
- A chain of operations (a matmul feeding a softmax feeding a matmul ...) adds its roundings, to
  first order, where each stage passes relative error on at a gain of about one (a norm
  rescales values and their errors alike; a softmax at most doubles its scores' error). So a
  computation is within `steps`·u·`scale` of the exact value: `steps` counts the roundings along
  its longest chain (K per K-term sum, 1 per elementwise op, 2 per exp, log, tanh or rsqrt,
  which XLA, NumPy and torch get within 1-2 ulp) and `scale` bounds Σ|terms| of the result.
- Two float32 evaluations of one quantity that add in different orders (two CPUs, two attention
  paths, one device or eight) are each that close to the exact value: twice it to each other.

These are worst cases: every rounding in the same direction. Rounding errors of random sign
add up to about sqrt(steps)·u·scale, so a machine shows far less; each use says how far a real
bug (a wrong mask, a missing bias, a transposed head) stands above its bound.
"""
U = 2.0 ** -24  # float32 unit roundoff, about 6e-8


def f32_error(steps: int, scale: float) -> float:
    """Worst-case |float32 result - exact result|: `steps` roundings along the longest chain,
    on values whose Σ|terms| is at most `scale`."""
    return steps * U * scale


def f32_gap(steps: int, scale: float) -> float:
    """Worst-case |a - b| between two float32 evaluations of one value that round differently
    (different summation orders): each is within f32_error of the exact value."""
    return 2 * f32_error(steps, scale)


def norm_steps(D: int) -> int:
    """LayerNorm or RMSNorm over D features: the mean (D), the centred mean square (D + 1),
    + eps, rsqrt (2), times the scale, plus the bias."""
    return 2 * D + 6


def softmax_steps(S: int) -> int:
    """Softmax over S keys: minus the max, exp (2), the sum of S terms, the division; plus, for
    the chunked path's online softmax, a rescale (exp and multiply) per key block of >= 3 keys."""
    return 2 * S + 4


def _layer_steps(cfg, T: int) -> tuple[int, int, int]:
    """One block's roundings in three legs: to a score (the norm, the q/k projection + bias,
    RoPE, q·k and the 1/sqrt(H) scaling); from the scores to the residual (softmax over T keys,
    the weighted sum of T values, all N heads through value_up, the output bias, the residual
    add); the MLP (its norm, up + bias, the activation or SwiGLU gate, down + bias, the residual
    add)."""
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    to_scores = norm_steps(D) + (D + 1) + 6 + (H + 1)
    attention_rest = softmax_steps(T) + T + (N * H + 2)
    mlp = norm_steps(D) + (D + 1) + 8 + (F + 2)
    return to_scores, attention_rest, mlp


def score_steps(cfg, T: int) -> int:
    """Roundings along the longest chain from the embeddings to one attention score of the last
    layer (T tokens)."""
    return (cfg.n_layers - 1) * sum(_layer_steps(cfg, T)) + _layer_steps(cfg, T)[0]


def forward_steps(cfg, T: int) -> int:
    """Roundings along the longest chain from the embeddings to one logit of `forward` on T
    tokens: every block, then the final norm and the unembedding (662 for 'tiny' at T = 13)."""
    return cfg.n_layers * sum(_layer_steps(cfg, T)) + norm_steps(cfg.d_model) + cfg.d_model


def pattern_error(steps_to_scores: int, score_terms: float, S: int) -> float:
    """Worst-case error of an attention pattern entry: a softmax passes on at most twice its
    scores' error (d p_i = p_i (d s_i - Σ_j p_j d s_j), p <= 1), plus its own rounding."""
    return 2 * f32_error(steps_to_scores, score_terms) + f32_error(softmax_steps(S), 1.0)


def cross_entropy_steps(V: int, n_tokens: int) -> int:
    """The mean cross-entropy's own roundings, on top of its logits' error (which it passes on
    at most doubled: logsumexp minus one logit): logsumexp over V (V + 5) and the mean over
    n_tokens (n_tokens + 1)."""
    return V + n_tokens + 6


def backward_steps(cfg, T: int, n_tokens: int) -> int:
    """Roundings along the longest chain to one element of a parameter's gradient: the forward
    chain (which sets the softmax probabilities), a backward chain about as long, and the sum
    over the batch's n_tokens per-token terms."""
    return 2 * forward_steps(cfg, T) + n_tokens


def adam_first_step_gap(g, dg, p, lr: float):
    """Elementwise bound on |p1 - p2| after one AdamW step from the same params p with gradients
    g and g + d, |d| <= dg. The first update is lr·g/(|g| + eps) (bias-corrected moments; global
    norm clipping only rescales g, which this ignores but for eps): while g keeps its sign it
    moves by at most lr·dg/(|g| - dg), else by up to 2·lr. Plus the update's own roundings (the
    moments, sqrt and division: 8u of lr) and each side's p - update rounding (u·|p|)."""
    import numpy as np
    g, dg, p = (np.abs(np.asarray(a, np.float64)) for a in (g, dg, p))
    safe = g > 2 * dg  # far from a sign change
    moved = np.where(safe, dg / np.where(safe, g - dg, 1.0), 2.0)
    return lr * (np.minimum(moved, 2.0) + 8 * U) + 2 * U * p


def loss_gap(cfg, T: int, n_tokens: int, max_logit: float, loss: float) -> float:
    """Worst-case |a - b| between two float32 evaluations of the mean cross-entropy over n_tokens
    (T per sequence): twice its logits' gap (logsumexp minus one logit; a logit's Σ|terms| taken
    as 2x the largest logit, which bounds it for the tests' parameters), plus the gap of its own
    logsumexps and mean, on per-token losses of at most 2x the mean."""
    return (2 * f32_gap(forward_steps(cfg, T), 2 * max_logit)
            + f32_gap(cross_entropy_steps(cfg.vocab_size, n_tokens), 2 * loss))


def gradient_terms(params, inputs, targets, cfg):
    """Σ_t |d loss_t / d param| / n over the batch's n tokens, elementwise: the Σ|terms| of the
    mean that each gradient element is (one vmapped backward pass per token; tiny models only).
    key_bias's exact gradient is 0 (softmax ignores a shift shared by a row of scores): what is
    computed is rounding left over from the keys' gradient terms (its gradient is the sum over
    positions of d loss / d key), so it takes the key's scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from headwise.model import forward
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    n = targets.size

    def token_loss(params, one_hot):
        logp = jax.nn.log_softmax(forward(params, inputs, cfg), -1)
        return -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * one_hot).sum()

    per_token = jax.jit(jax.vmap(jax.grad(token_loss), (None, 0)))(
        params, np.eye(n, dtype=np.float32).reshape(n, *targets.shape))
    terms = jax.tree.map(lambda g: np.asarray(jnp.abs(g).sum(0)) / n, per_token)
    attention = terms["blocks"]["attention"]
    if "key_bias" in attention:
        attention["key_bias"] = np.maximum(attention["key_bias"], attention["key"].max())
    return terms


def gradient_gap(params, inputs, targets, cfg):
    """Elementwise worst-case |a - b| between two float32 evaluations of the mean loss's
    gradient (one device or eight, one batch or micro-batches)."""
    import jax
    T = inputs.shape[-1]
    return jax.tree.map(lambda t: f32_gap(backward_steps(cfg, T, targets.size), t),
                        gradient_terms(params, inputs, targets, cfg))


def attention_gap(cfg, S: int, score_terms: float, out_terms: float) -> float:
    """Worst-case |a - b| between two float32 evaluations of one attention layer's output (any
    path, or head by head against all heads at once) from the same inputs: a score's error (q/k
    projection + bias, RoPE, q·k and the scaling, at Σ|terms| <= score_terms) moves a pattern
    entry by at most twice itself relative (d p_i = p_i (d s_i - Σ_j p_j d s_j)); then the
    softmax over S keys, the values' projection, their weighted sum, value_up over all N·H and
    the output bias round too, relative to the output's Σ|terms| (<= out_terms)."""
    D, N, H = cfg.d_model, cfg.n_heads, cfg.d_head
    relative = (2 * f32_error((D + 1) + 6 + (H + 1), score_terms)
                + U * (softmax_steps(S) + (D + 1) + S + N * H + 1))
    return 2 * relative * out_terms


def pattern_gap(cfg, S: int, score_terms: float) -> float:
    """Worst-case |a - b| between two float32 evaluations of one attention pattern entry from the
    same inputs (see attention_gap)."""
    D, H = cfg.d_model, cfg.d_head
    return 2 * pattern_error((D + 1) + 6 + (H + 1), score_terms, S)
