"""Greedy decoding speed against transformers' `generate` (torch, KV cache) on the same random
GPT-2, imported from transformers: tokens/s of transformers, of headwise's host loop (one
jitted step per token), its stream (blocks of 16 steps) and its compiled loop (`generate`:
prefill and every step in one program), at batch 1 and 8, interleaved in one process; and a
check that headwise and transformers pick the same greedy tokens. Also timed: the unembedding and
greedy choice alone, n times in one compiled loop: what a step costs before any block runs, so
the most any decoder that computes float32 logits can reach on this machine.

    python benchmarks/decode.py [--rounds 3] [--new-tokens 200] [--batches 1,8]
    python benchmarks/decode.py --size gpu          # on a GPU: bigger batches, no host loop
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch spinning idle threads on a shared machine hurts all
import argparse
import dataclasses
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import machine
from headwise.model.decode import generate, generate_stream, generate_with_logits
from headwise.model.sampling import greedy
from headwise.model.transformer import unembed
from headwise.train.hf import import_gpt2

# A random GPT-2 (GPT-2's vocabulary and context; 4 layers of 128), as the issue measured it.
GPT2 = dict(n_layer=4, n_embd=128, n_head=4)
SIZES = {"cpu": dict(batches="1,8", new_tokens=200, rounds=3),
         "gpu": dict(batches="1,8,64", new_tokens=200, rounds=3)}


def random_gpt2(path: str, vocab: int, seed: int):
    """A randomly initialised transformers GPT-2 saved to `path`, and headwise's import of it."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**GPT2, vocab_size=vocab)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None  # never stop early: every run makes n tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    if torch.cuda.is_available():  # on a GPU machine, transformers decodes on the GPU too
        model = model.cuda()
    return model, *import_gpt2(path)


def hf_generate(model, prompts_BP: np.ndarray, n: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts_BP, device=model.device), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True)
    return out[:, prompts_BP.shape[1]:].cpu().numpy()  # .cpu() waits for the GPU


def ours(kind: str):
    """headwise's three ways to make n greedy tokens, each returning a [B, n] array."""
    def compiled(params, cfg, prompts_BP, n):
        return np.asarray(generate(params, cfg, prompts_BP, n, temperature=0.0))

    def stream(params, cfg, prompts_BP, n):
        return np.stack(list(generate_stream(params, cfg, prompts_BP, n, temperature=0.0)), 1)

    def host(params, cfg, prompts_BP, n):
        steps = generate_with_logits(params, cfg, prompts_BP, n, temperature=0.0)
        return np.stack([tokens_B for tokens_B, _ in steps], 1)
    return {"compiled": compiled, "stream": stream, "host": host}[kind]


@functools.partial(jax.jit, static_argnames=("cfg", "n"))
def _unembedding_only(params, x_BD, *, cfg, n):
    def step(i, tokens_B):
        # Each step waits for the last one's token, as decoding's steps do.
        logits_BV = unembed(params, x_BD + tokens_B[:, None] * 1e-9, cfg)
        return greedy(logits_BV)
    return jax.lax.fori_loop(0, n, step, jnp.zeros(x_BD.shape[0], jnp.int32))


def unembedding_only(params, cfg, prompts_BP, n):
    """n steps of the final norm, the unembedding and the greedy choice, nothing else."""
    x_BD = jnp.ones((prompts_BP.shape[0], cfg.d_model), cfg.dtype)
    return np.asarray(_unembedding_only(params, x_BD, cfg=cfg, n=n))


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def agreement(a_BN: np.ndarray, b_BN: np.ndarray) -> str:
    """'same' or where the first greedy token differs."""
    if np.array_equal(a_BN, b_BN):
        return "same"
    b, t = np.argwhere(a_BN != b_BN)[0]
    return f"differ from row {b} step {t}"


def bench_batch(model, params, cfg, batch: int, args, kinds) -> dict:
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_tokens))
    runs = {"transformers": lambda: hf_generate(model, prompts, args.new_tokens)} if model else {}
    runs |= {k: (lambda k=k: ours(k)(params, cfg, prompts, args.new_tokens)) for k in kinds}
    runs["unembedding_only"] = lambda: unembedding_only(params, cfg, prompts, args.new_tokens)
    outs = {name: run() for name, run in runs.items()}  # compile and warm up
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: load drift hits every contender alike
        for name, run in runs.items():
            seconds[name].append(timed(run)[1])
    row = {f"{n}_tok_s": batch * args.new_tokens / statistics.median(s) for n, s in seconds.items()}
    if model:
        row["compiled_over_transformers"] = statistics.median(
            t / c for t, c in zip(seconds["transformers"], seconds["compiled"]))
        row["unembedding_only_over_transformers"] = statistics.median(
            t / u for t, u in zip(seconds["transformers"], seconds["unembedding_only"]))
        row["greedy_tokens"] = agreement(outs["compiled"], outs["transformers"])
    for k in kinds[1:]:
        assert np.array_equal(outs[k], outs["compiled"]), f"{k} and compiled tokens differ"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="defaults for this backend (default: gpu if jax has one, else cpu)")
    parser.add_argument("--batches", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2's own by default")
    parser.add_argument("--attention", default="dot_product", help="headwise's attention path")
    parser.add_argument("--no-transformers", action="store_true", help="headwise alone")
    args = parser.parse_args()
    size = args.size or ("cpu" if jax.default_backend() == "cpu" else "gpu")
    for name, value in SIZES[size].items():
        setattr(args, name, getattr(args, name) or value)
    kinds = ["compiled", "stream"] + (["host"] if size == "cpu" else [])
    with tempfile.TemporaryDirectory() as tmp:
        model, params, cfg = random_gpt2(tmp, args.vocab, seed=0)
    model = None if args.no_transformers else model
    cfg = dataclasses.replace(cfg, attention=args.attention)
    params = jax.device_put(params)
    print(f"# {machine.describe('torch', 'transformers')}")
    print(f"# random GPT-2: {GPT2}, vocab {args.vocab}, context {cfg.context_length}; greedy, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, median of "
          f"{args.rounds} interleaved rounds; headwise attention '{args.attention}'")
    rows = {b: bench_batch(model, params, cfg, b, args, kinds)
            for b in map(int, args.batches.split(","))}
    print_table(rows)


def print_table(rows: dict) -> None:
    columns = list(next(iter(rows.values())))
    print("| batch | " + " | ".join(c.replace("_", " ") for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for batch, row in rows.items():
        cells = [f"{v:,.0f}" if k.endswith("tok_s") else f"{v:.1f}" if isinstance(v, float)
                 else str(v) for k, v in row.items()]
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
