"""GPT-2 in and out of the Hugging Face layout: logits parity with transformers, bitwise round trips."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from headwise.model import ModelConfig, forward, init_params  # noqa: E402
from headwise.train import checkpoint, cli  # noqa: E402
from headwise.train.config import load_config  # noqa: E402
from headwise.train.data import tokenizer_from_json  # noqa: E402
from headwise.train.hf import export_gpt2, export_run, import_gpt2, import_run  # noqa: E402
from headwise.train.loop import train  # noqa: E402
from tolerances import f32_gap, forward_steps  # noqa: E402

TINY_HF = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=97)


def _hf_model(path: pathlib.Path, seed: int = 0, **overrides) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_HF, **overrides})).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _assert_logits_match(ours, expected: np.ndarray, cfg) -> None:
    """Two float32 forward passes of one model (XLA's, torch's) round differently: each is within
    forward_steps(cfg, T) roundings of exact, each at most u times a logit's Σ|terms| (0.70 at
    most here, about the largest logit: 2x that covers it), so they are within f32_gap of each
    other (1.7e-4 for TINY_HF; 1.5e-7 seen). Import bugs stand above it: query heads in reverse
    order 1.0e-3, key heads and features transposed 1.2e-3, a norm eps of 1e-6 4.9e-3. (GELU's
    erf form for gelu_new moves these small-weight logits by only 2e-6, under any f32 bound: the
    import's activation is asserted by name instead.)"""
    atol = f32_gap(forward_steps(cfg, expected.shape[1]), 2 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(ours), expected, atol=atol, rtol=0)


def _tokens(vocab: int, shape=(3, 32)) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, shape)


@pytest.fixture
def gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    return path, _hf_model(path)


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["mole", "shrew", "carbon", "biopsy", "tower", "head", "key", "query"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 6)) + "." for _ in range(400)))
    return str(path)


@pytest.mark.parametrize("attention", ["reference", "dot_product"])
def test_imported_logits_match_transformers(gpt2_dir, attention):
    path, model = gpt2_dir
    params, cfg = import_gpt2(path)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size,
            cfg.context_length, cfg.activation) == (2, 32, 4, 8, 128, 97, 32, "gelu_tanh")
    assert params["blocks"]["attention"]["query"].shape == (2, 32, 4, 8)
    assert params["blocks"]["attention"]["value_up"].shape == (2, 4, 8, 32)
    tokens = _tokens(97)
    ours = forward(params, jnp.asarray(tokens), dataclasses.replace(cfg, attention=attention))
    _assert_logits_match(ours, _hf_logits(model, tokens), cfg)


def test_gpt2model_prefix_and_n_inner(tmp_path):
    torch.manual_seed(2)
    config = transformers.GPT2Config(**TINY_HF, n_inner=48, activation_function="gelu")
    base = transformers.GPT2Model(config).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)  # keys 'h.0...', no lm_head
    params, cfg = import_gpt2(tmp_path / "base")
    assert cfg.d_mlp == 48 and cfg.activation == "gelu"
    tokens = _tokens(97)
    with torch.no_grad():
        hidden = base(torch.tensor(tokens)).last_hidden_state.numpy()
    expected = hidden @ base.wte.weight.detach().numpy().T
    _assert_logits_match(forward(params, jnp.asarray(tokens), cfg), expected, cfg)


def test_export_then_import_is_bitwise(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    params, cfg = import_gpt2(path)
    export_gpt2(params, cfg, tmp_path / "out1")
    again, cfg2 = import_gpt2(tmp_path / "out1")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, again)
    assert jax.tree.structure(params) == jax.tree.structure(again)
    export_gpt2(again, cfg2, tmp_path / "out2")
    assert (json.loads((tmp_path / "out1" / "config.json").read_text())
            == json.loads((tmp_path / "out2" / "config.json").read_text()))
    assert ((tmp_path / "out1" / "model.safetensors").read_bytes()
            == (tmp_path / "out2" / "model.safetensors").read_bytes())


def test_headwise_trained_model_loads_in_transformers(corpus, tmp_path):
    cfg = load_config(None, [
        f"data.path={corpus}", "data.tokenizer='char'", "model.vocab_size=64",
        "model.context_length=32", "model.d_model=32", "model.n_heads=4", "model.d_head=8",
        "model.n_layers=2", "model.d_mlp=48", "model.position='learned'", "model.norm='layernorm'",
        "model.attention='fused'", "train.steps=4", "train.batch_size=8", "train.eval_steps=1",
        "train.sample_tokens=0", "optim.warmup_steps=1"])
    train(cfg, tmp_path / "run", progress=False)
    params, model_cfg = checkpoint.load_model(tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "hf")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = _tokens(64)
    _assert_logits_match(forward(params, jnp.asarray(tokens), model_cfg),
                         _hf_logits(model, tokens), model_cfg)


def test_import_hf_cli_makes_a_run_that_loads_and_fine_tunes(gpt2_dir, corpus, tmp_path):
    path, _ = gpt2_dir
    run = tmp_path / "run"
    assert cli.main(["import-hf", "--gpt2", str(path), "--out", str(run)]) == 0
    params, cfg = import_gpt2(path)
    loaded, loaded_cfg = checkpoint.load_model(run)
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    assert (run / "config.toml").is_file()
    assert cli.main(["import-hf", "--gpt2", str(path), "--out", str(run)]) == 2  # not over a run
    # Fine-tuning: the run's own config (plus data overrides) resumes from the imported step 0.
    overrides = [f"data.path={corpus}", "data.tokenizer='char'", "train.batch_size=8",
                 "train.eval_steps=1", "train.sample_tokens=0", "train.steps=3"]
    cfg_run = load_config(str(run / "config.toml"), overrides)
    untouched = train(cfg_run, run, progress=False, stop_at=0)
    jax.tree.map(np.testing.assert_array_equal, params, untouched["params"])
    tuned = train(cfg_run, run, progress=False)
    assert tuned["step"] == 3
    assert not np.array_equal(tuned["params"]["embed"]["token"], params["embed"]["token"])
    # ... and it exports back out.
    assert cli.main(["export-hf", "--run-dir", str(run), "--out", str(tmp_path / "back")]) == 0
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").config.n_layer == 2


def test_vocab_and_merges_become_the_runs_tokenizer(tmp_path, capsys):
    from tokenizers.implementations import ByteLevelBPETokenizer
    text = ["the head looks for the key, the query finds the value"] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    path = tmp_path / "gpt2"
    bpe.save_model(str(path.mkdir() or path))  # vocab.json + merges.txt only
    _hf_model(path, vocab_size=bpe.get_vocab_size())
    import_run(path, tmp_path / "run")
    tok = tokenizer_from_json((tmp_path / "run" / "tokenizer.json").read_text())
    ids = tok.encode("the query finds the key")
    assert ids == bpe.encode("the query finds the key").ids
    assert tok.decode(ids) == "the query finds the key"
    assert cli.main(["sample", "--run-dir", str(tmp_path / "run"), "--prompt", "the head",
                     "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the head")


def _write(path: pathlib.Path, config: dict | str, weights: bool = True, **hf) -> pathlib.Path:
    if weights:
        _hf_model(path, **hf)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_clear_errors(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    good = json.loads((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        import_gpt2(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        import_gpt2(tmp_path / "empty")
    _write(tmp_path / "no_weights", good, weights=False)
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing.*safe_serialization"):
        import_gpt2(tmp_path / "no_weights")
    _write(tmp_path / "bad_json", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        import_gpt2(tmp_path / "bad_json")
    cases = [({"model_type": "llama"}, "model_type is 'llama'"),
             ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
             ({"add_cross_attention": True}, "add_cross_attention"),
             ({"scale_attn_weights": False}, "scale_attn_weights"),
             ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
             ({"tie_word_embeddings": False}, "tie_word_embeddings"),
             ({"n_embd": 64}, r"`transformer.h.0.attn.c_attn.weight` has shape \(32, 96\)"),
             ({"n_layer": 3}, "lacks tensor `transformer.h.2.attn.c_attn.weight`"),
             ({"n_head": "4"}, "`n_head` must be a positive integer")]
    for i, (change, message) in enumerate(cases):
        case = _write(tmp_path / f"case{i}", {**good, **change}, weights=False)
        (case / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            import_gpt2(case)
    assert cli.main(["import-hf", "--gpt2", str(tmp_path / "empty"), "--out",
                     str(tmp_path / "r")]) == 2


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
    base = dict(vocab_size=61, context_length=16, d_model=24, n_heads=3, d_head=8, n_layers=1,
                d_mlp=40)
    for change, message in [({"position": "rope"}, "position='rope'"),
                            ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
                            ({"bias": False}, "bias=False"),
                            ({"tie_embeddings": False}, "tie_embeddings=False"),
                            ({"activation": "swiglu"}, "activation='swiglu'"),
                            ({"d_head": 6}, "n_heads \\* d_head = 18 != d_model=24")]:
        cfg = ModelConfig(**{**base, **change})
        params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
        with pytest.raises(ValueError, match=message):
            export_gpt2(params, cfg, tmp_path / "out")
        assert not (tmp_path / "out").exists()
