"""nanoGPT's Shakespeare-char CPU run in PyTorch, timed against headwise in one process (and, with --full, trained to its final validation loss).

    python benchmarks/nanogpt_reference.py --data ../shared/data/tinyshakespeare.txt [--full] [--rounds N]
Speeds are ratios from interleaved blocks of steps, since this machine's speed drifts between minutes.
"""
import argparse
import json
import math
import os
import statistics
import time

# libgomp's default busy-wait turns torch's 2-thread ops from ~50 ms/iter into 1-2 s/iter whenever
# another process (or headwise's XLA threads, in this very process) holds a core; sleeping waiters
# cost ~nothing on an idle machine. Set OMP_WAIT_POLICY=ACTIVE in the environment to measure that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp, so before the import

import jax
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import machine
from headwise.model import init_params, param_axes
from headwise.parallel.launch import keep_freed_memory
from headwise.train.config import load_config
from headwise.train.data import DataConfig, eval_batches, get_batch, load_dataset
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.step import init_state, make_train_step

# nanoGPT's README CPU command with config/train_shakespeare_char.py.
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, BIAS = 4, 4, 128, 64, 12, False
LR, MIN_LR, WARMUP, ITERS, BETAS, WD, CLIP = 1e-3, 1e-4, 100, 2000, (0.9, 0.99), 0.1, 1.0
SEED, EVAL_STEPS = 0, 200  # headwise's train.seed and train.eval_steps, so batches match


# ---------------------------------------------------------------- nanoGPT's model.py, dropout 0


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has none to switch off)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=BIAS)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=BIAS)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=BIAS)
        self.gelu = nn.GELU()  # exact erf GELU, as nanoGPT
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=BIAS)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(N_EMBD, BIAS), CausalSelfAttention()
        self.ln_2, self.mlp = LayerNorm(N_EMBD, BIAS), MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = LayerNorm(N_EMBD, BIAS)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------- nanoGPT's train.py loop


def configure_optimizer(model: GPT) -> torch.optim.AdamW:
    """Decay matrices and embeddings (dim >= 2), not norm weights or biases."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight listed once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def get_lr(it: int) -> float:
    """nanoGPT's schedule: linear warmup, then cosine down to MIN_LR at ITERS."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > ITERS:
        return MIN_LR
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def torch_batch(tokens: np.ndarray, it: int):
    x, y = get_batch(tokens, seed=SEED, step=it, batch_size=BATCH, context_length=BLOCK)
    return torch.from_numpy(x).long(), torch.from_numpy(y).long()


def torch_step(model: GPT, opt, tokens: np.ndarray, it: int) -> float:
    for group in opt.param_groups:
        group["lr"] = get_lr(it)
    loss = model(*torch_batch(tokens, it))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss.item()  # nanoGPT syncs on the loss only when logging; on CPU eager it costs nothing


@torch.no_grad()
def torch_eval(model: GPT, val: np.ndarray) -> float:
    """headwise's `evaluate`: mean loss over the same EVAL_STEPS batches of validation data."""
    model.eval()
    losses = [model(torch.from_numpy(x).long(), torch.from_numpy(y).long()).item()
              for x, y in eval_batches(val, seed=SEED + 1, num_batches=EVAL_STEPS,
                                       batch_size=BATCH, context_length=BLOCK)]
    model.train()
    return float(np.mean(losses))


# ---------------------------------------------------------------- headwise, as train/loop.py builds it


def headwise_runner(data_path: str, overrides: list[str]):
    """A closure running one headwise train step at `it` (state kept inside), and the config."""
    cfg = load_config("shakespeare_char", [f"data.path={data_path}", *overrides])
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, param_axes(cfg.model))
    step = make_train_step(cfg.model, optimizer, learning_rate(cfg.optim, cfg.train.steps))
    key, init_key = jax.random.split(jax.random.key(cfg.train.seed))
    box = {"state": init_state(init_params(cfg.model, init_key), optimizer, key)}

    def run(tokens: np.ndarray, it: int):
        x, y = get_batch(tokens, seed=SEED, step=it, batch_size=BATCH, context_length=BLOCK)
        box["state"], metrics = step(box["state"], {"inputs": jax.numpy.asarray(x),
                                                    "targets": jax.numpy.asarray(y)})
        return metrics

    return run, cfg


# ---------------------------------------------------------------- measurements


def time_block(fn, start: int, k: int) -> float:
    """Seconds for k consecutive steps, synchronised at both ends."""
    begin = time.perf_counter()
    out = None
    for it in range(start, start + k):
        out = fn(it)
    jax.block_until_ready(out)
    return time.perf_counter() - begin


def interleaved_speed(model, opt, hw_run, train: np.ndarray, rounds: int, k: int) -> dict:
    """Alternate k-step blocks of each framework (order swapped each round) so drift hits both."""
    torch_fn = lambda it: torch_step(model, opt, train, it)
    jax_fn = lambda it: hw_run(train, it)
    time_block(torch_fn, 0, 10), time_block(jax_fn, 0, 10)  # warm-up; the jit compiles here
    ms_t, ms_j, it = [], [], 10
    for r in range(rounds):
        order = [(torch_fn, ms_t), (jax_fn, ms_j)][:: 1 if r % 2 == 0 else -1]
        for fn, sink in order:
            sink.append(1000 * time_block(fn, it, k) / k)
        it += k
    ratios = [t / j for t, j in zip(ms_t, ms_j)]  # tokens/s ratio = inverse ms ratio
    return {"torch_ms_per_iter": round(statistics.median(ms_t), 2),
            "headwise_ms_per_iter": round(statistics.median(ms_j), 2),
            "headwise_over_torch_tokens_per_s": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(x, 3) for x in ratios],
            "rounds": rounds, "steps_per_block": k}


def full_run(vocab: int, data) -> dict:
    """Torch from a fresh init for all ITERS, evaluated like headwise's final evaluation."""
    torch.manual_seed(1337)
    model = GPT(vocab)
    opt = configure_optimizer(model)
    begin = time.perf_counter()
    losses = [torch_step(model, opt, data.train, it) for it in range(ITERS)]
    return {"torch_final_val_loss": round(torch_eval(model, data.val), 4),
            "torch_final_train_loss_last50": round(float(np.mean(losses[-50:])), 4),
            "torch_full_wall_s": round(time.perf_counter() - begin, 1), "nanogpt_readme_val_loss": 1.88}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--full", action="store_true", help="also train torch for all 2000 iters")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of each framework")
    parser.add_argument("--steps-per-block", type=int, default=50)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--set", nargs="*", default=[], help="headwise config overrides, e.g. model.position=learned")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as `headwise train` starts (torch, in this process, gets it too)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    data = load_dataset(DataConfig(path=args.data, tokenizer="char"))
    torch.manual_seed(1337)
    model = GPT(data.vocab_size)
    hw_run, cfg = headwise_runner(args.data, args.set)
    result = interleaved_speed(model, configure_optimizer(model), hw_run, data.train,
                               args.rounds, args.steps_per_block)
    if args.full:
        result.update(full_run(data.vocab_size, data))
    emulation = {k: os.environ[k] for k in ("XLA_FLAGS", "ATEN_CPU_CAPABILITY") if k in os.environ}
    result.update(machine=machine.describe("torch"), emulation=emulation or "none",
                  load_after=[round(x, 1) for x in os.getloadavg()],
                  torch=torch.__version__, jax=jax.__version__, cpu_cores=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), keep_freed_memory=kept,
                  omp_wait_policy=os.environ["OMP_WAIT_POLICY"], device=jax.devices()[0].device_kind,
                  headwise_model={k: getattr(cfg.model, k) for k in ("position", "activation", "attention")},
                  torch_params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
