"""Generation with a KV cache: prefill the prompts, then the token loop on the device."""
import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .attention import CACHE_AXES
from .config import ModelConfig
from .logical import constrain
from .sampling import sample_token
from .transformer import embed, run_blocks, unembed

# Layout: prompts are RIGHT-padded, so every row's token t sits at position t and in cache
# slot t; row b's true length is lengths[b]. The cache is {"key", "value"}: [L, B, N, C, H]
# with C fixed for a whole generation (just the slots it can reach; the host loop: the context),
# so the decode step has one shape throughout. Prefill and decode steps run the model's own
# blocks (`run_blocks`), cache in hand. `generate` runs prefill and every step in ONE
# compiled program (`lax.while_loop`); `generate_stream` runs blocks of steps the same way.


def init_cache(cfg: ModelConfig, batch: int, length: int | None = None) -> dict:
    """An empty cache: keys and values of every layer, [L, B, N, length, H] (default length:
    the context)."""
    length = cfg.context_length if length is None else length
    shape = (cfg.n_layers, batch, cfg.n_heads, length, cfg.d_head)
    return {name: constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES)
            for name in ("key", "value")}


def prefill(params: dict, tokens_BP: jax.Array, lengths_B: jax.Array, cfg: ModelConfig,
            cache_length: int | None = None):
    """Right-padded prompts [B, P] with true lengths -> (logits_BV of each row's last prompt
    token, cache). The prompts attend among their own P slots; the cache is then widened to
    `cache_length` slots (default: the context). Pad slots get keys too, but each is
    overwritten before it is read."""
    B, P = tokens_BP.shape
    cache_length = cfg.context_length if cache_length is None else cache_length
    positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
    x_BPD, cache, _ = run_blocks(params, embed(params, tokens_BP, cfg, positions_BP), cfg,
                                 positions_BT=positions_BP, cache=init_cache(cfg, B, P))
    widen = ((0, 0), (0, 0), (0, 0), (0, cache_length - P), (0, 0))
    cache = {name: constrain(jnp.pad(c, widen), CACHE_AXES)
             for name, c in cache.items()}
    last_BD = jnp.take_along_axis(x_BPD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return unembed(params, last_BD, cfg), cache


def decode_step(params: dict, cache: dict, tokens_B: jax.Array, positions_B: jax.Array,
                cfg: ModelConfig):
    """One new token per row at its own position -> (logits_BV, cache)."""
    positions_B1 = positions_B[:, None]
    x_B1D, cache, _ = run_blocks(params, embed(params, tokens_B[:, None], cfg, positions_B1),
                                 cfg, positions_BT=positions_B1, cache=cache)
    return unembed(params, x_B1D[:, 0], cfg), cache


def choose(logits_BV, key, step, done_B, stop_token, sampling):
    """Sample with the key of this step, blank (-1) rows already done, and mark rows that just
    produced the stop token (-1: none). `sampling` is (temperature, top_k, top_p)."""
    token_B = sample_token(logits_BV, jax.random.fold_in(key, step), *sampling).astype(jnp.int32)
    return jnp.where(done_B, -1, token_B), done_B | (token_B == stop_token)


# Jitted apart from the model, so a new sampling setting compiles only this (the host loop's).
_choose = jax.jit(choose, static_argnames=("sampling",))
_prefill_jit = jax.jit(prefill, static_argnames=("cfg", "cache_length"))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step_jit(params, cache, tokens_B, positions_B, cfg):
    """The decode step: shapes never change during a generation, so this compiles once (per
    batch size and config). Rows that are done feed -1; any id will do, their output is
    discarded."""
    return decode_step(params, cache, jnp.maximum(tokens_B, 0), positions_B, cfg)


# --- The token loop on the device ---------------------------------------------------------

class Decoding(NamedTuple):
    """What the token loop carries from one step to the next."""

    step: jax.Array     # how many tokens each row has chosen so far (a scalar)
    token_B: jax.Array  # each row's newest token, -1 once the row is done
    done_B: jax.Array   # rows that have emitted the stop token
    cache: Any          # what the step function reads and updates: the KV cache, and anything
                        # else it carries (e.g. a source's keys and values, computed once)


def start(logits_BV, cache, key, stop_token, sampling) -> Decoding:
    """The first new token of every row, chosen from the prefill's logits (step 0)."""
    token_B, done_B = choose(logits_BV, key, 0, jnp.zeros(logits_BV.shape[0], bool),
                             stop_token, sampling)
    return Decoding(jnp.int32(1), token_B, done_B, cache)


StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def decode_steps(step_fn: StepFn, state: Decoding, lengths_B, key, stop_token, end,
                 width: int, sampling):
    """Steps state.step .. end - 1 (at most `width` of them) in one `lax.while_loop`, which
    stops early once every row is done: each step feeds every row's newest token at its
    position to `step_fn(cache, tokens_B, positions_B) -> (logits_BV, cache)` and chooses the
    next. Returns (tokens_BW, state): column i holds step state.step + i's tokens, -1 where
    a row was done or the loop had ended."""
    first = state.step
    last = jnp.minimum(end, first + width)

    def running(carry):
        state, _ = carry
        return (state.step < last) & ~state.done_B.all()

    def step(carry):
        state, tokens_BW = carry
        # Rows that are done feed 0 (any id will do: their output is discarded).
        logits_BV, cache = step_fn(state.cache, jnp.maximum(state.token_B, 0),
                                   lengths_B + state.step - 1)
        token_B, done_B = choose(logits_BV, key, state.step, state.done_B, stop_token, sampling)
        tokens_BW = jax.lax.dynamic_update_slice(tokens_BW, token_B[:, None], (0, state.step - first))
        return Decoding(state.step + 1, token_B, done_B, cache), tokens_BW

    tokens_BW = jnp.full((lengths_B.shape[0], width), -1, jnp.int32)
    state, tokens_BW = jax.lax.while_loop(running, step, (state, tokens_BW))
    return tokens_BW, state


def _model_step(params, cfg) -> StepFn:
    # `decode_step` is looked up when traced, so a test can count the traces.
    return lambda cache, tokens_B, positions_B: decode_step(params, cache, tokens_B, positions_B,
                                                            cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_length", "width", "sampling"))
def _generate_jit(params, tokens_BP, lengths_B, key, stop_token, n, *, cfg, cache_length,
                  width, sampling):
    """Prefill and all n new tokens (n <= width) in one program: (tokens_BW, steps run)."""
    state = start(*prefill(params, tokens_BP, lengths_B, cfg, cache_length), key, stop_token,
                  sampling)
    first_B = state.token_B
    rest_BW, state = decode_steps(_model_step(params, cfg), state, lengths_B, key, stop_token,
                                  n, width - 1, sampling)
    return jnp.concatenate([first_B[:, None], rest_BW], axis=1), state.step


@functools.partial(jax.jit, static_argnames=("cfg", "cache_length", "sampling"))
def _start_jit(params, tokens_BP, lengths_B, key, stop_token, *, cfg, cache_length, sampling):
    """Streaming's first program: prefill and step 0."""
    return start(*prefill(params, tokens_BP, lengths_B, cfg, cache_length), key, stop_token,
                 sampling)


@functools.partial(jax.jit, static_argnames=("cfg", "width", "sampling"),
                   donate_argnames=("state",))
def _steps_jit(params, state, lengths_B, key, stop_token, end, *, cfg, width, sampling):
    """Streaming's next block of at most `width` steps. `end` is traced: one compile serves
    every generation of this batch size, config and cache length."""
    return decode_steps(_model_step(params, cfg), state, lengths_B, key, stop_token, end,
                        width, sampling)


def _check(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p, stop_token):
    """Every error a caller can cause, raised before anything compiles."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    C, V = cfg.context_length, cfg.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(prompt) > C:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens but ModelConfig.context_length "
                             f"is {C}: crop the prompt to its last {C} tokens")
        # The last new token is never read back, so n + max_new_tokens - 1 positions are needed.
        if len(prompt) + max_new_tokens - 1 > C:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} "
                             f"needs {len(prompt) + max_new_tokens - 1} positions but "
                             f"ModelConfig.context_length is {C}: lower max_new_tokens to at most "
                             f"{C + 1 - len(prompt)}, shorten the prompt, or use "
                             f"generate_stream_sliding, which slides its window")
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"prompt {i} holds an id outside ModelConfig.vocab_size={V}: "
                             f"ids must be in [0, {V})")
    if stop_token is not None and not 0 <= stop_token < V:
        raise ValueError(f"stop_token={stop_token} is outside [0, ModelConfig.vocab_size={V})")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")


def _pad(prompts, cfg: ModelConfig):
    """Right-pad to a power of two (capped at the context), so prefill compiles per bucket."""
    longest = max(len(p) for p in prompts)
    P = min(cfg.context_length, 1 << (longest - 1).bit_length())
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def as_prompts(prompts) -> list[list[int]]:
    """Prompts as lists of token ids, from a list of them (any lengths) or a [B, T] array."""
    if hasattr(prompts, "ndim"):
        if prompts.ndim != 2:
            raise ValueError(f"prompts as an array must be [batch, time], got shape "
                             f"{tuple(prompts.shape)}: give a single prompt as prompts[None]")
        if not jnp.issubdtype(prompts.dtype, jnp.integer):
            raise ValueError(f"prompts must hold integer token ids, got dtype {prompts.dtype}: "
                             f"convert them with .astype('int32')")
        return np.asarray(prompts).tolist()
    prompts = list(prompts)
    if any(isinstance(p, (int, np.integer)) for p in prompts):
        raise ValueError("prompts must be a list of prompts, each a list of token ids: "
                         "wrap a single prompt as [prompt]")
    return [list(p) for p in prompts]


def _request(cfg, prompts, max_new_tokens, key, temperature, top_k, top_p, stop_token):
    """Checked prompts, the sampling setting (static), the key and the stop id (traced: no
    compile per stop id)."""
    prompts = as_prompts(prompts)
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_token)
    key = jax.random.key(0) if key is None else key
    stop = jnp.int32(-1 if stop_token is None else stop_token)
    return prompts, (float(temperature), int(top_k), float(top_p)), key, stop


def _bucket(n: int) -> int:
    """The next power of two: generations of similar lengths share one compiled loop."""
    return 1 << (n - 1).bit_length()


def _cache_length(cfg: ModelConfig, tokens_BP, width: int) -> int:
    """Only the slots a generation of `width` new tokens can reach: every step reads them all."""
    return min(cfg.context_length, tokens_BP.shape[1] + width)


def generate(params: dict, cfg: ModelConfig, prompts, max_new_tokens: int, *,
             key: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_token: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt, ending with `stop_token` where one was produced.
    `prompts`: lists of token ids (any lengths) or a [B, T] integer array. temperature 0 is
    greedy. Prefill and the whole token loop run as ONE compiled program (a `lax.while_loop`
    that ends when every row has stopped), compiled per batch size, prompt-length and
    max_new_tokens power-of-two bucket and sampling setting."""
    prompts, sampling, key, stop = _request(cfg, prompts, max_new_tokens, key, temperature,
                                            top_k, top_p, stop_token)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    tokens_BP, lengths_B = _pad(prompts, cfg)
    width = _bucket(max(max_new_tokens, 2))  # the loop after the first token is never empty
    tokens_BW, _ = _generate_jit(params, tokens_BP, lengths_B, key, stop, max_new_tokens,
                                 cfg=cfg, cache_length=_cache_length(cfg, tokens_BP, width),
                                 width=width, sampling=sampling)
    return [[t for t in row if t >= 0] for row in np.asarray(tokens_BW).tolist()]


def generate_stream(params: dict, cfg: ModelConfig, prompts, max_new_tokens: int, *,
                    key: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, stop_token: int | None = None,
                    block: int = 16) -> Iterator[np.ndarray]:
    """Yield one int32 array [B] per step: each row's new token, or -1 once the row has
    emitted `stop_token` (which is itself yielded). Ends early when every row has stopped.
    The first token comes with the prefill; the rest are computed on the device `block` steps
    at a time (one compiled loop), so the host waits once per block, not once per token.
    The same tokens as `generate` for the same arguments."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer (steps per device call), got {block!r}")
    prompts, sampling, key, stop = _request(cfg, prompts, max_new_tokens, key, temperature,
                                            top_k, top_p, stop_token)
    return _stream(params, cfg, *_pad(prompts, cfg), max_new_tokens, key, stop, sampling, block)


def _stream(params, cfg, tokens_BP, lengths_B, n, key, stop, sampling, block):
    if n == 0:
        return
    state = _start_jit(params, tokens_BP, lengths_B, key, stop, cfg=cfg, sampling=sampling,
                       cache_length=_cache_length(cfg, tokens_BP, _bucket(n)))
    yield np.asarray(state.token_B)
    taken = 1
    while taken < n and not bool(state.done_B.all()):
        tokens_BW, state = _steps_jit(params, state, lengths_B, key, stop, n, cfg=cfg,
                                      width=block, sampling=sampling)
        now = int(state.step)
        yield from np.asarray(tokens_BW)[:, :now - taken].T
        taken = now


def generate_with_logits(params: dict, cfg: ModelConfig, prompts, max_new_tokens: int, *,
                         key: jax.Array | None = None, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, stop_token: int | None = None):
    """Yield (tokens_B, logits_BV) per step, as `generate_stream` yields tokens_B, with the
    logits each was sampled from. A host loop, one jitted decode step per token: slow, kept as
    the second code path that tests hold the compiled loop to."""
    prompts, sampling, key, stop = _request(cfg, prompts, max_new_tokens, key, temperature,
                                            top_k, top_p, stop_token)
    return _generation_loop(params, cfg, *_pad(prompts, cfg), max_new_tokens, key, stop, sampling)


def _generation_loop(params, cfg, tokens_BP, lengths_B, max_new_tokens, key, stop, sampling):
    if max_new_tokens == 0:
        return
    logits_BV, cache = _prefill_jit(params, tokens_BP, lengths_B, cfg=cfg)
    done_B = jnp.zeros(len(lengths_B), bool)
    for step in range(max_new_tokens):
        if step:
            if bool(done_B.all()):
                return
            logits_BV, cache = _decode_step_jit(params, cache, token_B, lengths_B + step - 1,
                                                cfg=cfg)
        token_B, done_B = _choose(logits_BV, key, step, done_B, stop, sampling=sampling)
        yield np.asarray(token_B), logits_BV


def generate_stream_sliding(params: dict, cfg: ModelConfig, prompt: list[int],
                            max_new_tokens: int, *, key: jax.Array | None = None,
                            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            stop_token: int | None = None) -> Iterator[int]:
    """One prompt, any number of new tokens: when the cache is full, prefill again from the
    newest half of the context and go on (the model then sees at least context_length / 2
    tokens). Prompts longer than the context are cropped to their last context_length tokens."""
    tokens = list(prompt)[-cfg.context_length:]
    _, sampling, key, stop = _request(cfg, [tokens], min(max_new_tokens, 1), key, temperature,
                                      top_k, top_p, stop_token)
    return _slide(params, cfg, tokens, max_new_tokens, key, stop, sampling)


def _slide(params, cfg, tokens, max_new_tokens, key, stop, sampling):
    """Every window is padded to the whole context, so every round shares one compiled prefill
    and one block loop. Padded to their own lengths, the default run's 200-token sample took
    12 compiles (12.7 s cold) for its three rounds."""
    C, left, round_, stop_id = cfg.context_length, max_new_tokens, 0, int(stop)
    window = list(tokens)
    while left > 0:
        n = min(left, C + 1 - len(window))
        padded_1C = np.zeros((1, C), np.int32)
        padded_1C[0, :len(window)] = window
        for token_B in _stream(params, cfg, jnp.asarray(padded_1C), jnp.asarray([len(window)]),
                               n, jax.random.fold_in(key, round_), stop, sampling, block=16):
            if token_B[0] < 0:
                return
            tokens.append(int(token_B[0]))
            yield int(token_B[0])
            if token_B[0] == stop_id:
                return
        left, round_ = left - n, round_ + 1
        window = tokens[-max(1, C // 2):]
