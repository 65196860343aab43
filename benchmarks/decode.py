"""Decoding speed: tokens/s with the KV cache and without it (the whole window re-read per
token), at batch 1 and batch 8, and their ratio, in one process. Greedy, random weights
(speed does not depend on them; tests/test_decode.py proves the two agree).

    python benchmarks/decode.py [--preset byte-cpu] [--new-tokens 100]
"""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from headwise.model import ModelConfig, forward, init_params
from headwise.model.decode import generate


@functools.partial(jax.jit, static_argnames="cfg")
def _uncached_next(params, window_BC, length, cfg):
    """Greedy next token after `length` tokens, re-reading the whole fixed-size window."""
    return jnp.argmax(forward(params, window_BC, cfg)[:, length - 1], axis=-1).astype(jnp.int32)


def uncached(params, cfg, prompts_BP: np.ndarray, new_tokens: int) -> np.ndarray:
    B, P = prompts_BP.shape
    window = jnp.zeros((B, cfg.context_length), jnp.int32).at[:, :P].set(prompts_BP)
    for t in range(P, P + new_tokens):
        window = window.at[:, t].set(_uncached_next(params, window, t, cfg))
    return np.asarray(window[:, P:])


def cached(params, cfg, prompts_BP: np.ndarray, new_tokens: int) -> np.ndarray:
    return np.asarray(generate(params, cfg, prompts_BP.tolist(), new_tokens, temperature=0.0))


def tokens_per_s(fn, *args) -> float:
    fn(*args)  # compile
    started = time.perf_counter()
    out = fn(*args)
    return out.size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="byte-cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=100)
    args = parser.parse_args()
    cfg = ModelConfig.preset(args.preset)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    rows = {}
    for batch in (1, 8):
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_tokens)).astype(np.int32)
        c = tokens_per_s(cached, params, cfg, prompts, args.new_tokens)
        u = tokens_per_s(uncached, params, cfg, prompts, args.new_tokens)
        rows[f"batch_{batch}"] = {"cached_tokens_per_s": round(c, 1),
                                  "uncached_tokens_per_s": round(u, 1),
                                  "cached_over_uncached": round(c / u, 2)}
    print(json.dumps({"preset": args.preset, "context": cfg.context_length, **rows,
                      "jax": jax.__version__, "device": jax.devices()[0].device_kind}, indent=1))


if __name__ == "__main__":
    main()
