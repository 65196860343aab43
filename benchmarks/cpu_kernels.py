"""Where the CPU gradient's gap to PyTorch lies: in the matrix multiplications themselves, or in
everything around them. Every matmul of one forward+backward at nanoGPT's CPU config (and at
`headwise train`'s default model) is timed alone, in XLA (jnp.einsum, jitted, as the step
compiles it) and in torch (the matmul autograd calls, transposed operands as strided views),
interleaved in one process; then both whole gradients: headwise's `jax.grad` of its loss and
the PyTorch port's `loss.backward()` (benchmarks/nanogpt_reference.py's model).

    python benchmarks/cpu_kernels.py [--rounds 5] [--model nanogpt-cpu|default]

Each model's whole time splits into its matmuls (the sum below) and the rest (norms, GELU,
softmax, RoPE, transposes, the loss, the optimizer-free backward's glue). Kinds: NN is x @ W,
NT is dY @ W^T (an input's gradient), TN is X^T @ dY (a weight's gradient); a batch of B·N is
attention's per-head products.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as nanogpt_reference.py: torch waits asleep

import jax
import jax.numpy as jnp
import numpy as np
import torch

import machine
import nanogpt_reference as ref
from cpu_step import MODELS
from headwise.model import init_params, loss
from headwise.model.compiler import compiler_options
from headwise.parallel.launch import keep_freed_memory

EINSUM = {"NN": "bmk,bkn->bmn", "NT": "bmk,bnk->bmn", "TN": "bkm,bkn->bmn"}
COPIES = 8  # of each matmul in XLA's program


def matmuls(cfg, batch: int) -> list[tuple[str, str, int, int, int, int, int]]:
    """(what, kind, batch, M, K, N, count) for every matmul of one forward+backward."""
    T, D, F, H, L = cfg.context_length, cfg.d_model, cfg.d_mlp, cfg.d_head, cfg.n_layers
    M, NH, BN = batch * T, cfg.n_heads * H, batch * cfg.n_heads
    linears = [("q, k, v", D, NH, 3 * L), ("attention out", NH, D, L), ("mlp up", D, F, L),
               ("mlp down", F, D, L), ("unembedding", D, cfg.vocab_size, 1)]
    rows = []
    for what, K, N, count in linears:
        rows += [(what, "NN", 1, M, K, N, count),
                 (f"{what}: input grad", "NT", 1, M, N, K, count),
                 (f"{what}: weight grad", "TN", 1, K, M, N, count)]
    return rows + [("scores q.k", "NT", BN, T, H, T, L), ("pattern @ v", "NN", BN, T, T, H, L),
                   ("grad v = p^T dout", "TN", BN, T, T, H, L),
                   ("grad p = dout v^T", "NT", BN, T, H, T, L),
                   ("grad q = ds k", "NN", BN, T, T, H, L),
                   ("grad k = ds^T q", "TN", BN, T, T, H, L)]


def operands(kind: str, b: int, M: int, K: int, N: int):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((b, K, M) if kind == "TN" else (b, M, K), np.float32)
    w = rng.standard_normal((b, N, K) if kind == "NT" else (b, K, N), np.float32)
    return a, w


def torch_matmul(kind: str, a: torch.Tensor, w: torch.Tensor):
    """What autograd calls: transposes are views, the BLAS call takes them as flags."""
    a = a.transpose(1, 2) if kind == "TN" else a
    w = w.transpose(1, 2) if kind == "NT" else w
    return (lambda: torch.bmm(a, w)) if a.shape[0] > 1 else (lambda: a[0] @ w[0])


def xla_program(kind: str, a: np.ndarray, w: np.ndarray, n: int):
    """n of the matmul in one compiled program, as inside a step: one dispatch for all n (a
    program per matmul would add its launch to each). Each has its own copy of the input, so
    none can be folded into another. XLA may run two at once on two cores, which can only
    flatter XLA here."""
    eq = EINSUM[kind]
    program = jax.jit(lambda inputs, w: [jnp.einsum(eq, x, w) for x in inputs],
                      compiler_options=compiler_options("cpu"))
    inputs = [jnp.asarray(a + i) for i in range(n)]
    w = jnp.asarray(w)
    return lambda: program(inputs, w)


def _done(out):
    return out if isinstance(out, torch.Tensor) else jax.block_until_ready(out)


def seconds(fn, calls: int) -> float:
    """Seconds for `calls` calls of fn, after one untimed call."""
    _done(fn())
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    _done(out)
    return time.perf_counter() - start


def interleaved(pair: tuple, rounds: int, calls: tuple[int, int], per: tuple[int, int] = (1, 1)):
    """Median seconds per operation of (xla_fn, torch_fn), alternating each round; `per`: how
    many operations one call of each runs."""
    times = ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(seconds(pair[i], calls[i]) / (calls[i] * per[i]))
    return statistics.median(times[0]), statistics.median(times[1])


def kernel_table(cfg, batch: int, rounds: int) -> tuple[list, float, float]:
    rows, xla_sum, torch_sum = [], 0.0, 0.0
    for what, kind, b, M, K, N, count in matmuls(cfg, batch):
        a, w = operands(kind, b, M, K, N)
        x_s, t_s = interleaved((xla_program(kind, a, w, COPIES),
                                torch_matmul(kind, torch.tensor(a), torch.tensor(w))),
                               rounds, (4, 4 * COPIES), (COPIES, 1))
        gflop = 2 * b * M * K * N / 1e9
        rows.append((what, kind, f"{b}x" if b > 1 else "", M, K, N, count, x_s, t_s, gflop))
        xla_sum, torch_sum = xla_sum + count * x_s, torch_sum + count * t_s
    return rows, xla_sum, torch_sum


def whole_gradients(rounds: int) -> tuple[float, float]:
    """headwise's gradient and the PyTorch port's forward+backward at nanoGPT's config."""
    cfg, B = MODELS["nanogpt-cpu"]
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, cfg.context_length + 1))
    grad = jax.jit(jax.grad(lambda p, x, y: loss(p, x, y, cfg)),
                   compiler_options=compiler_options("cpu"))
    x, y = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
    torch.manual_seed(0)
    model = ref.GPT(cfg.vocab_size)
    tx, ty = (torch.from_numpy(np.ascontiguousarray(t)).long()
              for t in (tokens[:, :-1], tokens[:, 1:]))

    def torch_grad():
        model.zero_grad(set_to_none=True)
        model(tx, ty).backward()

    return interleaved((lambda: grad(params, x, y), torch_grad), rounds, (10, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="nanogpt-cpu", choices=["nanogpt-cpu", "default"])
    args = parser.parse_args()
    keep_freed_memory()
    cfg, batch = MODELS[args.model]
    rows, xla_sum, torch_sum = kernel_table(cfg, batch, args.rounds)
    print(f"{args.model}: batch {batch}, context {cfg.context_length}, width {cfg.d_model}, "
          f"{cfg.n_heads} heads of {cfg.d_head}, {cfg.n_layers} layers, vocab {cfg.vocab_size}")
    print("| matmul | kind | M x K x N | per gradient | XLA ms | torch ms | XLA / torch |")
    print("|---|---|---|---|---|---|---|")
    for what, kind, b, M, K, N, count, x_s, t_s, gflop in rows:
        print(f"| {what} | {kind} | {b}{M}x{K}x{N} | {count} | {1e3 * x_s:.3f} "
              f"({gflop / x_s:.0f} GFLOP/s) | {1e3 * t_s:.3f} ({gflop / t_s:.0f}) | {x_s / t_s:.2f} |")
    print(f"all matmuls of one gradient, alone: XLA {1e3 * xla_sum:.1f} ms, "
          f"torch {1e3 * torch_sum:.1f} ms ({xla_sum / torch_sum:.2f}x)")
    forward = [(r[6] * r[7], r[6] * r[8]) for r in rows if "grad" not in r[0]]
    xla_fwd, torch_fwd = (sum(f) for f in zip(*forward))
    print(f"the forward's matmuls: XLA {1e3 * xla_fwd:.1f} ms, torch {1e3 * torch_fwd:.1f} ms; "
          f"gradient / forward from matmuls alone: XLA {xla_sum / xla_fwd:.2f}, "
          f"torch {torch_sum / torch_fwd:.2f}")
    if args.model == "nanogpt-cpu":
        hw, pt = whole_gradients(args.rounds)
        print(f"whole gradient: headwise {1e3 * hw:.1f} ms, PyTorch port {1e3 * pt:.1f} ms "
              f"(headwise / torch {hw / pt:.2f}); the rest (whole - matmuls): "
              f"headwise {1e3 * (hw - xla_sum):.1f} ms, torch {1e3 * (pt - torch_sum):.1f} ms")
    print(f"{machine.describe('torch')}; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
