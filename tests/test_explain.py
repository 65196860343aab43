"""run_with_cache against forward and its own sums, on every path and a mesh; the readers; a planted head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise import parallel
from headwise.explain import (head_scores, logit_contributions, logit_lens, rank_heads,
                              run_with_cache)
from headwise.model import ModelConfig, forward, init_params
from headwise.model.attention import attention_layer
from headwise.model.transformer import norm
from headwise.train.config import MeshConfig
from tolerances import f32_error, f32_gap, forward_steps, norm_steps

PATHS = ("reference", "fused", "chunked", "dot_product")
_run = jax.jit(run_with_cache, static_argnums=1)
_forward = jax.jit(forward, static_argnums=(2, 3))


def _model(path="fused", **overrides):
    cfg = ModelConfig.preset("tiny", attention=path, attention_chunk=5, n_heads=4, d_model=32,
                             d_mlp=64, vocab_size=64, **overrides)
    # Larger weights than at init, and random biases, so every part of the sums matters.
    params = jax.tree.map(lambda a: 3 * a + 0.05, init_params(cfg, jax.random.key(0)))
    return cfg, params, jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)


def _heads_terms(cfg, params, cache, l):
    """Σ_n,h |out_nh| |value_up_nhd| of layer l's output matrix: what its rounding scales with."""
    layer = jax.tree.map(lambda a: a[l], params["blocks"])
    _, _, seen = attention_layer(layer["attention"], norm(layer["attention_norm"],
                                 cache["residual"][:, l], cfg), cfg, inspect=True)
    return jnp.einsum("BTNH,NHD->BTD", jnp.abs(seen["head_outputs"]),
                      jnp.abs(layer["attention"]["value_up"]))


@pytest.mark.parametrize("path", PATHS)
def test_cache_equals_forward_and_its_sums_hold(path):
    cfg, params, tokens = _model(path, position="rope")
    logits, cache = _run(params, cfg, tokens)
    want_logits, want_patterns = _forward(params, tokens, cfg, True)
    gap = f32_gap(forward_steps(cfg, 16), 2 * float(np.abs(want_logits).max()))
    np.testing.assert_allclose(logits, want_logits, atol=gap, rtol=0)
    np.testing.assert_allclose(cache["patterns"], want_patterns, atol=1e-6, rtol=0)
    B, L, N, T, D = 2, cfg.n_layers, cfg.n_heads, 16, cfg.d_model
    assert cache["residual"].shape == (B, L + 1, T, D)
    assert cache["head_deltas"].shape == (B, L, N, T, D)
    r, a, m = (np.asarray(cache[k], np.float64) for k in ("residual", "attention_deltas",
                                                          "mlp_deltas"))
    # residual[l+1] = (residual[l] + attention) + mlp: two float32 additions.
    np.testing.assert_allclose(r[:, 1:], r[:, :-1] + a + m, rtol=0,
                               atol=f32_error(2, float(np.abs(r[:, :-1]).max() + np.abs(a).max()
                                                       + np.abs(m).max())))
    bias = np.asarray(params["blocks"]["attention"]["output_bias"], np.float64)
    for l in range(L):  # every head's change + the bias: the layer's (N*H terms each way)
        heads_sum = np.asarray(cache["head_deltas"][:, l], np.float64).sum(1) + bias[l]
        terms = float(_heads_terms(cfg, params, cache, l).max()) + float(np.abs(bias[l]).max())
        np.testing.assert_allclose(heads_sum, a[:, l], rtol=0,
                                   atol=f32_gap(N * cfg.d_head + N + 1, terms))


def test_cache_on_a_mesh_equals_one_device():
    cfg, params, tokens = _model("fused")
    mesh_cfg = MeshConfig(data=2, fsdp=1, tensor=4)
    mesh = parallel.make_mesh(mesh_cfg)
    rules, _ = parallel.resolve(mesh_cfg, mesh)
    sharded = jax.device_put(params, parallel.param_shardings(cfg, mesh, rules))
    run = jax.jit(parallel.under_rules(run_with_cache, mesh, rules), static_argnums=1)
    logits, cache = run(sharded, cfg, tokens)
    assert cache["head_deltas"].sharding.spec[0] is not None or mesh.shape["data"] == 1
    want_logits, want = _run(params, cfg, tokens)
    for name in want:  # the same numbers, whatever the layout (sums split over devices)
        scale = float(np.abs(want[name]).max()) + 1.0
        np.testing.assert_allclose(cache[name], want[name], rtol=0,
                                   atol=f32_gap(forward_steps(cfg, 16), scale))


def test_logit_lens_ends_at_the_logits_and_contributions_add_up():
    for norm_kind in ("layernorm", "rmsnorm"):
        cfg, params, tokens = _model("fused", norm=norm_kind)
        logits, cache = _run(params, cfg, tokens)
        lens = logit_lens(params, cfg, cache["residual"])
        assert lens.shape == (2, cfg.n_layers + 1, 16, cfg.vocab_size)
        # The same unembedding, on a [B, L+1, T, D] array: only its rounding may differ.
        terms = jnp.abs(norm(params["final_norm"], cache["residual"][:, -1], cfg)) @ jnp.abs(
            params["embed"]["token"].T)
        np.testing.assert_allclose(lens[:, -1], logits, rtol=0, atol=f32_gap(
            norm_steps(cfg.d_model) + cfg.d_model, float(terms.max())))
        token = int(jnp.argmax(logits[0, -1]))
        parts = logit_contributions(params, cfg, cache, token)
        assert parts["heads"].shape == (2, cfg.n_layers, cfg.n_heads)
        total = sum(np.asarray(p, np.float64).reshape(2, -1).sum(1) for p in parts.values())
        gap = f32_gap(forward_steps(cfg, 16), 2 * float(np.abs(logits).max()))
        np.testing.assert_allclose(total, logits[:, -1, token], atol=gap, rtol=0)


WORDS = ["a", "fluffy", "blue", "creature", "roamed", "the", "verdant", "forest"]
NOUNS, ADJECTIVES = ("creature", "forest"), ("fluffy", "blue", "verdant")


def _planted_model():
    """One layer, four heads; head 2 is planted: a noun's query points where every adjective's
    key points ("a fluffy blue creature roamed the verdant forest"), so nouns attend to the
    adjectives before them. Embeddings are one-hot words; the other heads are random."""
    V = len(WORDS)
    cfg = ModelConfig(vocab_size=V, context_length=8, d_model=16, n_heads=4, d_head=4,
                      n_layers=1, d_mlp=16, bias=False, norm="rmsnorm", position="rope",
                      attention="fused")
    params = init_params(cfg, jax.random.key(3))
    params["embed"]["token"] = jnp.eye(V, cfg.d_model) * 4.0  # rmsnorm -> one-hot * sqrt(D)
    query = params["blocks"]["attention"]["query"]
    key = params["blocks"]["attention"]["key"]
    is_noun = jnp.array([w in NOUNS for w in WORDS] + [False] * (cfg.d_model - V), jnp.float32)
    is_adj = jnp.array([w in ADJECTIVES for w in WORDS] + [False] * (cfg.d_model - V), jnp.float32)
    planted_q = jnp.zeros((cfg.d_model, cfg.d_head)).at[:, 0].set(5.0 * is_noun)
    planted_k = jnp.zeros((cfg.d_model, cfg.d_head)).at[:, 0].set(5.0 * is_adj)
    params["blocks"]["attention"]["query"] = query.at[0, :, 2].set(planted_q)
    params["blocks"]["attention"]["key"] = key.at[0, :, 2].set(planted_k)
    return cfg, params


def test_the_planted_adjective_head_is_found():
    cfg, params = _planted_model()
    tokens = jnp.arange(len(WORDS))[None]  # the sentence, word by word
    _, cache = _run(params, cfg, tokens)
    nouns = [WORDS.index(w) for w in NOUNS]
    adjectives = [WORDS.index(w) for w in ADJECTIVES]
    scores = head_scores(cache["patterns"], nouns, adjectives)
    ranking = rank_heads(scores)
    assert ranking[0][:2] == (0, 2), ranking
    assert ranking[0][2] > 0.9 and ranking[1][2] < 0.6, ranking
    # "forest" attends to all three adjectives before it, "creature" to the two before it.
    pattern = np.asarray(cache["patterns"][0, 0, 2])
    assert pattern[WORDS.index("forest"), adjectives].sum() > 0.9
    assert pattern[WORDS.index("creature"), [1, 2]].sum() > 0.9


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A run folder holding a random byte-level model: a checkpoint and its tokenizer."""
    from headwise.train import checkpoint
    from headwise.train.config import RunConfig, to_dict
    from headwise.train.data import ByteTokenizer
    run_dir = tmp_path_factory.mktemp("run")
    cfg = ModelConfig.preset("tiny", vocab_size=256, context_length=16)
    params = jax.tree.map(lambda a: 5 * a, init_params(cfg, jax.random.key(4)))
    with checkpoint.open_manager(run_dir, async_save=False) as manager:
        checkpoint.save(manager, 1, {"params": params, "key": jax.random.key(0)},
                        to_dict(RunConfig(model=cfg)), force=True)
    (run_dir / "tokenizer.json").write_text(ByteTokenizer().to_json())
    return run_dir, cfg, params


def test_predict_prints_the_model_probabilities(byte_run, capsys):
    import json
    from headwise.train.cli import main
    run_dir, cfg, params = byte_run
    assert main(["predict", "--run-dir", str(run_dir), "--prompt", "mole", "--top-k", "4",
                 "--json", "--lens"]) == 0
    out = json.loads(capsys.readouterr().out)
    probs = np.asarray(jax.nn.softmax(forward(params, jnp.asarray([list(b"mole")]), cfg)[0, -1]))
    want = np.argsort(-probs)[:4]
    assert [c["id"] for c in out["next"]] == want.tolist()
    assert [c["token"] for c in out["next"]] == [bytes([i]).decode("utf-8", "replace")
                                                 for i in want]
    np.testing.assert_allclose([c["probability"] for c in out["next"]], probs[want], atol=1e-6)
    assert len(out["lens"]) == cfg.n_layers + 1 and out["lens"][-1] == out["next"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x" * 17], "context is 16"),
    (["--prompt", "x", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_predict_bad_input_is_one_line(byte_run, capsys, argv, message):
    from headwise.train.cli import main
    assert main(["predict", "--run-dir", str(byte_run[0]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
