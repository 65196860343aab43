"""GPT-2 weights in and out of the Hugging Face layout (config.json + model.safetensors), no pickle."""
import json
import pathlib

import jax
import numpy as np

from headwise.model import ModelConfig, param_axes, param_shapes

from . import checkpoint
from .config import RunConfig, to_dict, write_config
from .data import DataConfig, HFTokenizer, tokenizer_from_json
from .optim import make_optimizer
from .step import init_state
from .tokenizers import import_tokenizers_library

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# HF activation names -> ours; the first HF name of each of ours is what export writes.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# Buffers (the causal mask) some transformers versions save: not weights.
_BUFFERS = ("attn.bias", "attn.masked_bias")
# Config switches GPT-2 has that this model does not: (key, the value we can read).
_UNSUPPORTED = (("add_cross_attention", False), ("scale_attn_weights", True),
                ("scale_attn_by_inverse_layer_idx", False))


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as error:
        raise ValueError("reading or writing Hugging Face weights needs the `safetensors` package: "
                         "pip install safetensors (or pip install -e '.[interop]')") from error
    return safetensors.numpy


# ---------------------------------------------------------------- config


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save it with "
                         f"save_pretrained, or download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _int(hf: dict, key: str, where) -> int:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    return value


def config_from_hf(hf: dict, where="config.json") -> ModelConfig:
    """A GPT-2 config.json as a ModelConfig; ValueError naming what GPT-2-ness it lacks."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}; only 'gpt2' "
                         f"checkpoints can be imported")
    for key, wanted in _UNSUPPORTED:
        if hf.get(key, wanted) != wanted:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (headwise reads "
                             f"{key}={wanted!r} only)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation_function={act!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    if hf.get("tie_word_embeddings", True) is not True:
        raise ValueError(f"{where}: tie_word_embeddings=false is not supported (GPT-2 ties "
                         f"the unembedding to the token embedding)")
    D, N = _int(hf, "n_embd", where), _int(hf, "n_head", where)
    if D % N:
        raise ValueError(f"{where}: n_embd={D} is not divisible by n_head={N}")
    inner = hf.get("n_inner")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{where}: layer_norm_epsilon must be a positive number, got {eps!r}")
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size", where), context_length=_int(hf, "n_positions", where),
        d_model=D, n_heads=N, d_head=D // N, n_layers=_int(hf, "n_layer", where),
        d_mlp=4 * D if inner is None else _int(hf, "n_inner", where), norm="layernorm",
        position="learned", tie_embeddings=True, bias=True, activation=_ACTIVATIONS[act],
        norm_eps=float(eps))


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError naming each field GPT-2's architecture cannot express."""
    wanted = {"norm": "layernorm", "position": "learned", "tie_embeddings": True, "bias": True}
    problems = [f"{k}={getattr(cfg, k)!r} (GPT-2 has {v!r})" for k, v in wanted.items()
                if getattr(cfg, k) != v]
    if cfg.activation not in _EXPORT_ACTIVATIONS:
        problems.append(f"activation={cfg.activation!r} (GPT-2 has one of "
                        f"{', '.join(_EXPORT_ACTIVATIONS)})")
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append(f"n_heads * d_head = {cfg.n_heads * cfg.d_head} != d_model={cfg.d_model} "
                        f"(GPT-2's heads tile the model width)")
    if problems:
        raise ValueError("this model cannot be written as GPT-2: " + "; ".join(problems))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json GPT2LMHeadModel reads for `cfg` (checked exportable first)."""
    check_exportable(cfg)
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.d_model,
          "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
          "n_inner": None if cfg.d_mlp == 4 * cfg.d_model else cfg.d_mlp,
          "activation_function": _EXPORT_ACTIVATIONS[cfg.activation],
          "layer_norm_epsilon": cfg.norm_eps, "initializer_range": 0.02,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
          "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
          "torch_dtype": "float32"}
    if cfg.vocab_size == 50257:  # GPT-2's own vocabulary: <|endoftext|> begins and ends
        hf.update(bos_token_id=50256, eos_token_id=50256)
    return hf


# ---------------------------------------------------------------- tensors


def _read_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    st = _safetensors()
    if (hf_dir / WEIGHTS).is_file():
        files = [hf_dir / WEIGHTS]
    else:  # a sharded save: the index names the files
        index = _read_json(hf_dir / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{hf_dir / INDEX}: no `weight_map` object")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    tensors = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; download the whole model folder again")
        try:
            tensors.update(st.load_file(str(path)))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file ({error}); note "
                             f"bfloat16 files need saving as float32 or float16") from None
    return tensors


def _prefix(tensors: dict) -> str:
    """GPT2LMHeadModel saves 'transformer.h.0...', GPT2Model 'h.0...'."""
    for prefix in ("transformer.", ""):
        if f"{prefix}wte.weight" in tensors:
            return prefix
    raise ValueError("model.safetensors has no `wte.weight` (nor `transformer.wte.weight`): "
                     "is this a GPT-2 checkpoint?")


class _Taker:
    """Hands out tensors by name, checking each shape; remembers which were used."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix, self.used = tensors, prefix, set()

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        key = self.prefix + name
        if key not in self.tensors:
            raise ValueError(f"model.safetensors lacks tensor `{key}`")
        value = self.tensors[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"model.safetensors: `{key}` has shape {tuple(value.shape)}, "
                             f"config.json implies {tuple(shape)}")
        self.used.add(key)
        return np.asarray(value, np.float32)


def _layer(take: _Taker, i: int, cfg: ModelConfig) -> dict:
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    h = f"h.{i}."
    # Conv1D stores [in, out]: x @ W as written. c_attn's outputs are q | k | v, heads in order.
    w, b = take(h + "attn.c_attn.weight", (D, 3 * D)), take(h + "attn.c_attn.bias", (3 * D,))
    qkv_w, qkv_b = np.split(w.reshape(D, 3, N, H), 3, axis=1), b.reshape(3, N, H)
    attention = {name: qkv_w[j][:, 0] for j, name in enumerate(("query", "key", "value_down"))}
    attention |= {f"{name}_bias": qkv_b[j] for j, name in enumerate(("query", "key", "value_down"))}
    attention["value_up"] = take(h + "attn.c_proj.weight", (D, D)).reshape(N, H, D)
    attention["output_bias"] = take(h + "attn.c_proj.bias", (D,))
    norm = lambda n: {"scale": take(f"{h}{n}.weight", (D,)), "bias": take(f"{h}{n}.bias", (D,))}
    mlp = {"up": take(h + "mlp.c_fc.weight", (D, F)), "up_bias": take(h + "mlp.c_fc.bias", (F,)),
           "down": take(h + "mlp.c_proj.weight", (F, D)), "down_bias": take(h + "mlp.c_proj.bias", (D,))}
    return {"attention_norm": norm("ln_1"), "attention": attention, "mlp_norm": norm("ln_2"),
            "mlp": mlp}


def params_from_tensors(tensors: dict, cfg: ModelConfig) -> dict:
    """GPT-2's named tensors as headwise's parameter tree (numpy float32, layers stacked)."""
    take = _Taker(tensors, _prefix(tensors))
    D = cfg.d_model
    layers = [_layer(take, i, cfg) for i in range(cfg.n_layers)]
    params = {"embed": {"token": take("wte.weight", (cfg.vocab_size, D)),
                        "position": take("wpe.weight", (cfg.context_length, D))},
              "blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers),
              "final_norm": {"scale": take("ln_f.weight", (D,)), "bias": take("ln_f.bias", (D,))}}
    _check_rest(tensors, take, params["embed"]["token"])
    expected = param_shapes(cfg)
    got = jax.tree.map(lambda a: a.shape, params)
    assert got == expected, (got, expected)  # the mapping itself, not the user's file
    return params


def _check_rest(tensors: dict, take: _Taker, wte: np.ndarray) -> None:
    """lm_head must be the tied embedding; anything else left over is a tensor we cannot place."""
    rest = {k for k in tensors if k not in take.used and not k.endswith(_BUFFERS)}
    if "lm_head.weight" in rest:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"], np.float32), wte):
            raise ValueError("model.safetensors: `lm_head.weight` differs from the token "
                             "embedding; only tied GPT-2 unembeddings are supported")
        rest.discard("lm_head.weight")
    if rest:
        shown = ", ".join(sorted(rest)[:5]) + (" ..." if len(rest) > 5 else "")
        raise ValueError(f"model.safetensors has tensors GPT-2 does not: {shown}")


def tensors_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_tensors`: GPT2LMHeadModel's names and Conv1D layouts."""
    check_exportable(cfg)
    p = _numpy(params)
    D, L = cfg.d_model, cfg.n_layers
    out = {"transformer.wte.weight": p["embed"]["token"],
           "transformer.wpe.weight": p["embed"]["position"],
           "transformer.ln_f.weight": p["final_norm"]["scale"],
           "transformer.ln_f.bias": p["final_norm"]["bias"]}
    b = p["blocks"]
    a, m = b["attention"], b["mlp"]
    for i in range(L):
        h = f"transformer.h.{i}."
        qkv = [a[n][i].reshape(D, D) for n in ("query", "key", "value_down")]
        out[h + "attn.c_attn.weight"] = np.concatenate(qkv, axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate(
            [a[f"{n}_bias"][i].reshape(D) for n in ("query", "key", "value_down")])
        out[h + "attn.c_proj.weight"] = a["value_up"][i].reshape(D, D)
        out[h + "attn.c_proj.bias"] = a["output_bias"][i]
        for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{h}{theirs}.weight"], out[f"{h}{theirs}.bias"] = b[ours]["scale"][i], b[ours]["bias"][i]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = m["up"][i], m["up_bias"][i]
        out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = m["down"][i], m["down_bias"][i]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _numpy(params: dict) -> dict:
    """Host copies; bfloat16 (which safetensors' numpy side cannot write) widens to float32."""

    def host(x):
        x = np.asarray(jax.device_get(x))
        return x if x.dtype in (np.float32, np.float16) else x.astype(np.float32)
    return jax.tree.map(host, params)


# ---------------------------------------------------------------- the two directions


def _need_dir(hf_dir: pathlib.Path) -> None:
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory; point --gpt2 at a local folder "
                                f"holding config.json and model.safetensors (e.g. one written "
                                f"by save_pretrained(..., safe_serialization=True))")
    if not (hf_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{hf_dir / CONFIG} is missing; the folder must hold the "
                                f"model's config.json next to its weights")
    if not (hf_dir / WEIGHTS).is_file() and not (hf_dir / INDEX).is_file():
        raise FileNotFoundError(f"{hf_dir / WEIGHTS} is missing; only safetensors weights are "
                                f"read (never pytorch_model.bin): re-save the model with "
                                f"save_pretrained(..., safe_serialization=True)")


def import_gpt2(hf_dir) -> tuple[dict, ModelConfig]:
    """(params as numpy float32, ModelConfig) from a local GPT-2 folder in Hugging Face's layout."""
    hf_dir = pathlib.Path(hf_dir)
    _need_dir(hf_dir)
    cfg = config_from_hf(_read_json(hf_dir / CONFIG), hf_dir / CONFIG)
    return params_from_tensors(_read_tensors(hf_dir), cfg), cfg


def export_gpt2(params: dict, cfg: ModelConfig, out_dir) -> pathlib.Path:
    """Write `out_dir`/config.json and model.safetensors, loadable by GPT2LMHeadModel."""
    hf = config_to_hf(cfg)  # refuses before anything is written
    tensors = tensors_from_params(params, cfg)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    return out_dir


# ---------------------------------------------------------------- tokenizers and run dirs


def tokenizer_spec(hf_dir) -> str | None:
    """The folder's tokenizer as tokenizer.json text: its own, or a byte-level BPE built from
    vocab.json + merges.txt; None when it has neither."""
    hf_dir = pathlib.Path(hf_dir)
    if (hf_dir / "tokenizer.json").is_file():
        return (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    bpe = import_tokenizers_library().implementations.ByteLevelBPETokenizer.from_file(str(vocab), str(merges))
    if "<|endoftext|>" in bpe.get_vocab():
        bpe.add_special_tokens(["<|endoftext|>"])
    return bpe.to_str()


def import_run(hf_dir, run_dir, *, seed: int = 0) -> dict:
    """A run directory from a GPT-2 folder: a step-0 checkpoint (params + a fresh AdamW state
    for the default optimizer config), config.toml, and the tokenizer if the folder has one.
    `headwise train --run-dir RUN_DIR` fine-tunes from it."""
    params, cfg = import_gpt2(hf_dir)
    run_dir = pathlib.Path(run_dir).absolute()
    if (run_dir / checkpoint.SUBDIR).exists():
        raise ValueError(f"{run_dir} already holds checkpoints; import into a fresh --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    data = DataConfig()
    spec = tokenizer_spec(hf_dir)
    if spec is not None:
        tok = HFTokenizer(spec)
        (run_dir / "tokenizer.json").write_text(tok.to_json())  # what `sample` decodes with
        (run_dir / "hf_tokenizer.json").write_text(spec)  # what `train` encodes with
        data = DataConfig(tokenizer=str(run_dir / "hf_tokenizer.json"))
    run = RunConfig(model=cfg, data=data)
    write_config(run, run_dir / "config.toml")
    optimizer = make_optimizer(run.optim, run.train.steps, param_axes(cfg))
    key = jax.random.split(jax.random.key(seed))[0]  # what a fresh `train` would start from
    state = init_state(jax.tree.map(jax.numpy.asarray, params), optimizer, key)
    with checkpoint.open_manager(run_dir, async_save=False) as manager:
        checkpoint.save(manager, 0, state, to_dict(run), force=True)
    return {"run_dir": run_dir, "model": cfg, "tokenizer": spec is not None}


def export_run(run_dir, out_dir) -> pathlib.Path:
    """A run's newest params as a GPT-2 folder (+ tokenizer.json when the run has a HF one)."""
    params, cfg = checkpoint.load_model(run_dir)
    out_dir = export_gpt2(params, cfg, out_dir)
    saved = pathlib.Path(run_dir) / "tokenizer.json"
    if saved.is_file():
        tok = tokenizer_from_json(saved.read_text())
        if isinstance(tok, HFTokenizer):
            (out_dir / "tokenizer.json").write_text(tok.spec)
    return out_dir


__all__ = ["import_gpt2", "export_gpt2", "import_run", "export_run", "config_from_hf",
           "config_to_hf", "check_exportable", "tokenizer_spec"]
