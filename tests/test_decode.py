"""KV-cache decoding against the uncached forward pass: the host loop, the compiled loop and
the stream; one compile; stop, top-k/top-p; array prompts; errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise.model import ModelConfig, forward, init_params
from headwise.model import decode
from tolerances import f32_gap, forward_steps

PATHS = ("reference", "fused", "chunked", "dot_product")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]  # different lengths
NEW = 6


@functools.lru_cache(maxsize=None)
def _params(position):
    # Paths share parameters. Larger weights give peaked logits, so greedy tokens vary and
    # sit far from ties.
    cfg = ModelConfig.preset("tiny", position=position)
    # Jitted: one compile, rather than one per leaf.
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    return jax.tree.map(lambda a: 4 * a if a.ndim > 1 else a, params)


def _model(path="fused", position="learned"):
    # attention_chunk=4 so 'chunked' walks several key blocks of the 16-slot cache.
    cfg = ModelConfig.preset("tiny", attention=path, position=position, attention_chunk=4)
    return cfg, _params(position)


_forward = jax.jit(forward, static_argnums=2)


def _uncached_last_logits(params, cfg, seqs):
    """Recompute `forward` (same path, no cache) over each whole sequence; the logits at its
    last token, [B, V]."""
    window = np.zeros((len(seqs), cfg.context_length), np.int32)
    for b, seq in enumerate(seqs):
        window[b, :len(seq)] = seq  # causal: what follows the sequence cannot change its logits
    logits = np.asarray(_forward(params, jnp.asarray(window), cfg))
    return np.stack([logits[b, len(seq) - 1] for b, seq in enumerate(seqs)])


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("path", PATHS)
def test_cached_decoding_matches_forward(path, position):
    cfg, params = _model(path, position)
    seqs = [list(p) for p in PROMPTS]
    n_steps = 0  # prefill, then NEW - 1 cached steps: each checked against a fresh forward
    for tokens, logits in decode.generate_with_logits(params, cfg, PROMPTS, NEW, temperature=0.0):
        expected = _uncached_last_logits(params, cfg, seqs)
        gap = f32_gap(forward_steps(cfg, cfg.context_length), 2 * float(np.abs(expected).max()))
        np.testing.assert_allclose(logits, expected, atol=gap, rtol=0)
        # The same tokens on any CPU: the top two logits are further apart than two gaps.
        top2 = np.sort(expected, -1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 2 * gap), (top2, gap)
        np.testing.assert_array_equal(tokens, np.argmax(expected, -1))
        for seq, token in zip(seqs, tokens):
            seq.append(int(token))
        n_steps += 1
    assert n_steps == NEW
    # The compiled loop (prefill and every step in one program) picks the same tokens.
    assert decode.generate(params, cfg, PROMPTS, NEW, temperature=0.0) == [
        seq[len(p):] for seq, p in zip(seqs, PROMPTS)]
    if path == "chunked":  # 2 tokens need only 10 cache slots: not a whole number of chunks
        assert decode.generate(params, cfg, PROMPTS, 2, temperature=0.0) == [
            seq[len(p):len(p) + 2] for seq, p in zip(seqs, PROMPTS)]


def test_greedy_is_argmax_ties_and_nans_included():
    """`greedy` is jnp.argmax by a faster route: the first of tied maxima, the first NaN."""
    from headwise.model.sampling import greedy
    logits = jax.random.normal(jax.random.key(0), (6, 50257))
    logits = logits.at[1, jnp.array([9, 5])].set(10.0)  # a tie
    logits = logits.at[2, jnp.array([7, 3])].set(jnp.nan)
    logits = logits.at[3].set(-jnp.inf).at[4].set(0.0).at[5, -1].set(jnp.inf)
    assert greedy(logits).tolist() == jnp.argmax(logits, -1).tolist() == [
        int(jnp.argmax(logits[0])), 5, 3, 0, 0, 50256]


def test_top_k_one_and_tiny_top_p_equal_greedy():
    cfg, params = _model()
    greedy = decode.generate(params, cfg, PROMPTS, NEW, temperature=0.0)
    assert decode.generate(params, cfg, PROMPTS, NEW, temperature=1.0, top_k=1,
                           key=jax.random.key(7)) == greedy
    # A tiny top_p keeps only the likeliest token: greedy again (first step: prefill only).
    assert decode.generate(params, cfg, PROMPTS, 1, temperature=1.0, top_p=1e-6,
                           key=jax.random.key(8)) == [row[:1] for row in greedy]


def test_top_k_samples_only_from_the_k_likeliest_and_seed_reproduces():
    cfg, params = _model()
    _, logits = next(decode.generate_with_logits(params, cfg, PROMPTS, 1, temperature=0.0))
    allowed = [set(np.argsort(np.asarray(row))[-3:].tolist()) for row in logits]
    seen = [set() for _ in PROMPTS]
    for seed in range(8):
        rows = decode.generate(params, cfg, PROMPTS, 1, temperature=1.0, top_k=3,
                               key=jax.random.key(seed))
        for s, row in zip(seen, rows):
            s.add(row[0])
    assert all(s <= a for s, a in zip(seen, allowed)), (seen, allowed)
    assert sum(len(s) for s in seen) > len(PROMPTS)  # it does sample, not always the argmax
    sampled = dict(temperature=1.0, top_k=3, key=jax.random.key(2))
    again = decode.generate(params, cfg, PROMPTS, NEW, **sampled)
    assert again == decode.generate(params, cfg, PROMPTS, NEW, **sampled)
    # Each step's key is the same in the host loop, the stream and the compiled loop.
    host = [t for t, _ in decode.generate_with_logits(params, cfg, PROMPTS, NEW, **sampled)]
    assert again == np.stack(host, 1).tolist()
    assert again == np.stack(list(decode.generate_stream(params, cfg, PROMPTS, NEW, block=4,
                                                         **sampled)), 1).tolist()
    assert again != decode.generate(params, cfg, PROMPTS, NEW, **{**sampled, "key": jax.random.key(3)})


def test_stop_token_stops_its_row_only():
    cfg, params = _model()
    greedy = decode.generate(params, cfg, PROMPTS, NEW, temperature=0.0)
    stop = greedy[1][2]  # row 1 emits it at step 2 (or earlier)
    got = decode.generate(params, cfg, PROMPTS, NEW, temperature=0.0, stop_token=stop)
    for row, full in zip(got, greedy):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # the stop token is kept; nothing after it
    assert len(got[1]) <= 3 and any(len(row) == NEW for row in got)
    steps = list(decode.generate_stream(params, cfg, PROMPTS, NEW, temperature=0.0,
                                        stop_token=greedy[1][0]))
    assert steps[1][1] == -1  # a stopped row emits -1 from then on
    same = [PROMPTS[2]] * 3  # same padded shape as PROMPTS: no new compile
    assert len(list(decode.generate_stream(params, cfg, same, NEW, temperature=0.0,
                                           stop_token=greedy[2][0]))) == 1  # all stopped: ends
    # The compiled loop ends too: when every row has stopped, no further step runs.
    last = greedy[1].index(stop)  # row 1 stops here; alone in the batch, so does the loop
    tokens_BW, steps = decode._generate_jit(
        params, *decode._pad([PROMPTS[1]] * 3, cfg), jax.random.key(0), jnp.int32(stop), NEW,
        cfg=cfg, cache_length=16, width=8, sampling=(0.0, 0, 1.0))
    assert int(steps) == last + 1 and np.all(np.asarray(tokens_BW)[:, last + 1:] == -1)


def test_array_prompts_and_blocks_of_any_size():
    cfg, params = _model()
    rows = [PROMPTS[0], PROMPTS[0][::-1], [3] * 5]
    expected = decode.generate(params, cfg, rows, NEW, temperature=0.0)
    for prompts in (np.array(rows), jnp.array(rows, jnp.int32)):
        assert decode.generate(params, cfg, prompts, NEW, temperature=0.0) == expected
    for block in (1, 4, 16):
        steps = list(decode.generate_stream(params, cfg, np.array(rows), NEW, temperature=0.0,
                                            block=block))
        assert np.stack(steps, 1).tolist() == expected


@pytest.mark.parametrize("prompts, match", [
    (np.array([1, 2, 3]), r"\[batch, time\], got shape \(3,\)"),
    (np.ones((2, 3)), "integer token ids"),
    ([1, 2, 3], "wrap a single prompt"),
])
def test_bad_prompt_arrays_raise(prompts, match):
    cfg, params = _model()
    with pytest.raises(ValueError, match=match):
        decode.generate(params, cfg, prompts, 2)


@pytest.mark.parametrize("prompts, new, match", [
    ([[]], 2, "prompt 0 is empty"),
    ([], 2, "prompts is empty"),
    ([list(range(17))], 1, "context_length is 16"),
    ([[1] * 10], 8, "lower max_new_tokens to at most 7"),
    ([[1, 61]], 2, "vocab_size=61"),
    ([[-1]], 2, "vocab_size=61"),
    ([[1]], -1, "max_new_tokens"),
])
def test_bad_requests_raise_before_compiling(prompts, new, match):
    cfg, params = _model()
    with pytest.raises(ValueError, match=match):
        decode.generate(params, cfg, prompts, new)


def test_full_context_is_usable():
    cfg, params = _model()
    new = decode.generate(params, cfg, [[1] * 8] * 3, 9, temperature=0.0)  # 8 + 9 - 1 = 16
    assert [len(row) for row in new] == [9] * 3
    with pytest.raises(ValueError, match="stop_token"):
        decode.generate(params, cfg, [[1]], 2, stop_token=61)
    with pytest.raises(ValueError, match="top_p"):
        decode.generate(params, cfg, [[1]], 2, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):  # at the call, not at the first next()
        decode.generate_stream(params, cfg, [[]], 2)


def test_decode_step_compiles_once_and_sliding_goes_past_the_context():
    cfg, params = _model()
    prompt = PROMPTS[0]
    traces, real = [], decode.decode_step

    def counting(*args, **kwargs):
        traces.append(1)  # a Python side effect: runs only while tracing
        return real(*args, **kwargs)

    compiled_before = decode._steps_jit._cache_size(), decode._start_jit._cache_size()
    decode.decode_step = counting
    try:  # a batch of one is a new shape: one trace of the block loop, one compiled prefill,
        # for 25 tokens over three rounds of 12, 9 and 4 (each its own cache length before)
        new = list(decode.generate_stream_sliding(params, cfg, prompt, 25, temperature=0.0))
    finally:
        decode.decode_step = real
    assert len(new) == 25
    assert len(traces) == 1
    assert (decode._steps_jit._cache_size(), decode._start_jit._cache_size()) == tuple(
        n + 1 for n in compiled_before)
    first = 16 + 1 - len(prompt)  # the cache is full after these; then prefill the newest 8
    # Batches of 3 identical rows reuse the compiled shapes of the tests above.
    assert new[:first] == decode.generate(params, cfg, [prompt] * 3, first, temperature=0.0)[0]
    window = (prompt + new[:first])[-8:]
    assert new[first:first + 9] == decode.generate(params, cfg, [window] * 3, 9,
                                                   temperature=0.0)[0]
    window = (prompt + new[:first + 9])[-8:]
    assert new[first + 9:] == decode.generate(params, cfg, [window] * 3, 4, temperature=0.0)[0]


@pytest.mark.parametrize("mesh_axes", [dict(data=2, tensor=4), dict(fsdp=8)])
def test_sharded_generation_matches_one_device(mesh_axes):
    """Params sharded, the cache split over batch and whole heads: the same greedy tokens."""
    from headwise import parallel
    from headwise.train.config import MeshConfig
    cfg = ModelConfig.preset("tiny", n_heads=4, d_model=32, d_mlp=64, vocab_size=64,
                             attention="fused")
    mesh = parallel.make_mesh(MeshConfig(**{"data": 1, **mesh_axes}))
    rules, _ = parallel.resolve(MeshConfig(**{"data": 1, **mesh_axes}), mesh)
    params = parallel.init_sharded(cfg, jax.random.key(0), mesh, rules)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    plain = decode.generate(jax.device_get(params), cfg, prompts, 6, temperature=0.0)
    assert parallel.generate_sharded(params, cfg, prompts, 6, mesh, rules, temperature=0.0) == plain
    # The cache is laid out as the rules say for activations: batch rows and whole heads split.
    import flax.linen as nn
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        padded = prompts + prompts[:1] * (-len(prompts) % parallel.batch_devices(mesh, rules))
        _, cache = decode._prefill_jit(params, *decode._pad(padded, cfg), cfg=cfg)
    spec = tuple(cache["key"].sharding.spec) + (None,) * 5  # trailing Nones are left out
    assert spec[1] is not None  # batch
    assert spec[2] == ("tensor" if mesh_axes.get("tensor") else None)  # heads
