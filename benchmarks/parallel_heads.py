"""The explanation's parallelism argument, timed on one GPT-2-small attention layer (12 heads of
64, width 768, a 1,024-token sequence). Heads: (a) one head at a time from Python, each head
its own call; (b) `jax.vmap` over heads (the 'reference' path); (c) 'fused' einsums;
(d) 'dot_product' (`jax.nn.dot_product_attention`). Positions: the sequence token by token
through the KV cache (as a recurrent model must: a compiled loop, and one call per token from
Python) against all positions at once (prefill). Interleaved rounds in one process, medians;
writes a plot.

    python benchmarks/parallel_heads.py [--rounds 5] [--plot docs/parallel_heads.png]
    python benchmarks/parallel_heads.py --size gpu   # on a GPU: batch 8
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import machine
from headwise.model import ModelConfig, attention_head, attention_layer, causal_mask, heads_view
from headwise.model import init_params
from headwise.model.decode import init_cache

SIZES = {"cpu": dict(batch=1, seq=1024, rounds=5), "gpu": dict(batch=8, seq=1024, rounds=10)}


def gpt2_small_layer(seq: int):
    """One GPT-2-small attention layer (stored layout) and its config; no real vocabulary."""
    cfg = ModelConfig.preset("gpt2-small", n_layers=1, vocab_size=256, context_length=seq)
    params = init_params(cfg, jax.random.key(0))
    return jax.tree.map(lambda a: a[0], params["blocks"]["attention"]), cfg


# --- Heads -----------------------------------------------------------------------------------

@jax.jit
def _one_head(head, x_BTD, mask_TS):
    """The explanation's `attention_head` on every row: one head's change [B, T, D]."""
    return jax.vmap(lambda x_TD: attention_head(head, x_TD, mask_TS)[0])(x_BTD)


def heads_one_by_one(heads, x_BTD, mask_TS):
    """(a): a Python loop, one call per head, the changes summed."""
    N = heads["query"].shape[0]
    return sum(_one_head(jax.tree.map(lambda a: a[i], heads), x_BTD, mask_TS) for i in range(N))


@functools.partial(jax.jit, static_argnames="cfg")
def all_positions(layer, x_BTD, cfg):
    """The layer over every position at once, on the path `cfg.attention` names."""
    return attention_layer(layer, x_BTD, cfg)[0]


# --- Positions -------------------------------------------------------------------------------

def _one_position(layer, cfg, cache, x_BD, t):
    positions_B1 = jnp.full((x_BD.shape[0], 1), t)
    delta_B1D, cache, _ = attention_layer(layer, x_BD[:, None], cfg, positions_BT=positions_B1,
                                          cache=cache)
    return cache, delta_B1D[:, 0]


@functools.partial(jax.jit, static_argnames="cfg")
def positions_in_a_loop(layer, x_BTD, cfg):
    """Token by token through the KV cache, as one compiled `lax.scan` over positions."""
    B, T, _ = x_BTD.shape
    cache = dict(init_cache(cfg, B), layer=0)  # the one layer's
    step = lambda cache, xt: _one_position(layer, cfg, cache, *xt)
    _, deltas_TBD = jax.lax.scan(step, cache, (x_BTD.swapaxes(0, 1), jnp.arange(T)))
    return deltas_TBD.swapaxes(0, 1)


_position_jit = jax.jit(_one_position, static_argnums=1, donate_argnums=2)


def positions_from_python(layer, x_BTD, cfg):
    """Token by token through the KV cache, one call per token from Python."""
    cache = dict(init_cache(cfg, x_BTD.shape[0]), layer=0)
    deltas = []
    for t in range(x_BTD.shape[1]):
        cache, delta_BD = _position_jit(layer, cfg, cache, x_BTD[:, t], t)
        deltas.append(delta_BD)
    return jnp.stack(deltas, 1)


# --- Timing ----------------------------------------------------------------------------------

def contenders(layer, cfg, x_BTD):
    """name -> a function of no arguments returning the layer's change [B, T, D]."""
    mask_TS, heads = causal_mask(x_BTD.shape[1]), heads_view(layer)
    path = lambda name: ModelConfig.preset("gpt2-small", n_layers=1, vocab_size=256,
                                           context_length=cfg.context_length, attention=name)
    return {
        "(a) one head at a time, from Python": lambda: heads_one_by_one(heads, x_BTD, mask_TS),
        "(b) vmap over heads ('reference')": lambda: all_positions(layer, x_BTD, path("reference")),
        "(c) 'fused'": lambda: all_positions(layer, x_BTD, path("fused")),
        "(d) 'dot_product'": lambda: all_positions(layer, x_BTD, path("dot_product")),
        "token by token, compiled loop": lambda: positions_in_a_loop(layer, x_BTD, cfg),
        "token by token, one call each": lambda: positions_from_python(layer, x_BTD, cfg),
    }


def median_seconds(runs: dict, rounds: int) -> dict:
    outs = {name: jax.block_until_ready(run()) for name, run in runs.items()}  # compile
    seconds = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: load drift hits every contender alike
        for name, run in runs.items():
            started = time.perf_counter()
            jax.block_until_ready(run())
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(s) for name, s in seconds.items()}, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, help="default: gpu if jax has one, else cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--plot", default=None, help="write the bar chart here (a .png)")
    args = parser.parse_args()
    size = args.size or ("cpu" if jax.default_backend() == "cpu" else "gpu")
    for name, value in SIZES[size].items():
        setattr(args, name, getattr(args, name) or value)
    layer, cfg = gpt2_small_layer(args.seq)
    x_BTD = jax.random.normal(jax.random.key(1), (args.batch, args.seq, cfg.d_model))
    seconds, outs = median_seconds(contenders(layer, cfg, x_BTD), args.rounds)
    print(f"# {machine.describe()}")
    print(f"# one GPT-2-small attention layer (12 heads of 64, width 768), batch {args.batch}, "
          f"{args.seq} positions, float32; median of {args.rounds} interleaved rounds")
    print_table(seconds, outs, args.seq)
    if args.plot:
        plot(seconds, args, machine.cpu() if size == "cpu" else jax.devices()[0].device_kind)


def print_table(seconds: dict, outs: dict, seq: int) -> None:
    names = list(seconds)
    fastest_heads = min(seconds[n] for n in names[:4])
    prefill = seconds[names[3]]  # all positions at once, on the dot_product path
    reference = np.asarray(outs[names[2]])
    scale = np.abs(reference).max()
    print("| computation | ms per layer | µs per token | ÷ fastest heads path | ÷ all at once | "
          "max |diff| / max |out| |")
    print("|---|---|---|---|---|---|")
    for name in names:
        s, gap = seconds[name], np.abs(np.asarray(outs[name]) - reference).max() / scale
        print(f"| {name} | {s * 1e3:,.1f} | {s / seq * 1e6:,.1f} | {s / fastest_heads:.1f} | "
              f"{s / prefill:.1f} | {gap:.0e} |")


def plot(seconds: dict, args, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(seconds)[::-1]
    colours = ["tab:orange" if "token" in n else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.barh(names, [seconds[n] * 1e3 for n in names], color=colours)
    ax.set_xscale("log")
    ax.set_xlabel(f"ms for the layer over {args.seq} positions (log scale)")
    ax.set_title(f"One GPT-2-small attention layer, batch {args.batch}: heads (blue) and "
                 f"positions (orange)\n{device}", fontsize=9)
    for i, n in enumerate(names):
        ax.text(seconds[n] * 1e3, i, f" {seconds[n] * 1e3:,.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"# plot: {args.plot}")


if __name__ == "__main__":
    main()
