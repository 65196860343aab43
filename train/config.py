"""Run configs: TOML sections into typed, frozen dataclasses, with checked `--set` overrides."""
import dataclasses
import importlib.util
import pathlib
import tomllib
import typing

import tomli_w

from headwise.model import ModelConfig
from headwise.parallel import AXES, RULES

from .data import DataConfig


def _check_positive(section: str, obj, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr, and global-norm clipping."""

    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1  # matrices only, never norms or biases
    grad_clip: float = 1.0  # 0 turns clipping off

    def __post_init__(self):
        _check_positive("optim", self, ("lr",))
        _check_positive("optim", self, ("min_lr", "warmup_steps", "weight_decay", "grad_clip"), True)
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}: the decay "
                             f"would rise; make min_lr <= lr")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long, how big, and how often to log, evaluate and save."""

    steps: int = 1200
    batch_size: int = 16  # global sequences per step, all micro-batches together
    grad_accum: int = 1  # micro-batches per step
    eval_every: int = 300
    eval_steps: int = 20
    log_every: int = 10
    checkpoint_every: int = 600
    keep_checkpoints: int = 2
    seed: int = 0
    peak_flops: float = 0.0  # per device, for MFU; 0 = a guess from the device kind
    sample_tokens: int = 200  # printed at the end of a run
    max_bad_steps: int = 10  # non-finite steps in a row (each skipped) before the run stops

    def __post_init__(self):
        _check_positive("train", self, ("steps", "batch_size", "grad_accum", "eval_every",
                                        "log_every", "checkpoint_every", "keep_checkpoints",
                                        "max_bad_steps"))
        _check_positive("train", self, ("eval_steps", "seed", "peak_flops", "sample_tokens"), True)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.grad_accum={self.grad_accum}: each micro-batch must be whole")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh axes (one field per name in headwise.parallel.AXES) and the sharding strategy
    (a name in headwise.parallel.RULES, or 'auto')."""

    data: int = -1  # all the devices there are: plain data parallel
    fsdp: int = 1
    tensor: int = 1
    strategy: str = "auto"  # auto: dp, fsdp, tp or a mix, by which axes are larger than 1
    # Your own table instead of a named strategy: [["batch", ["data", "fsdp"]], ["heads", "tensor"]]
    rules: tuple = ()

    def __post_init__(self):
        for name in AXES:
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ValueError(f"mesh.{name} must be positive or -1 (the remaining devices), "
                                 f"got {getattr(self, name)}")
        if self.strategy not in ("auto", *RULES):
            raise ValueError(f"unknown mesh.strategy {self.strategy!r}; choose one of: auto, "
                             f"{', '.join(RULES)}, or give mesh.rules")
        if self.rules and self.strategy != "auto":
            raise ValueError(f"mesh.rules and mesh.strategy={self.strategy!r} both choose the "
                             f"sharding; give one of them")
        object.__setattr__(self, "rules", tuple(_rule(r) for r in self.rules))


def _rule(rule) -> tuple:
    """One [logical name, mesh axis | [mesh axes] | null] pair, as a hashable tuple."""
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ValueError(f"mesh.rules entries are [logical_name, mesh_axes] pairs, got {rule!r}")
    name, target = rule
    names = [target] if isinstance(target, str) else list(target or [])
    if any(n not in AXES for n in names):
        raise ValueError(f"mesh.rules: {target!r} for {name!r} is not among the mesh axes {AXES}")
    return (name, target if isinstance(target, str) or target is None else tuple(target))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = ModelConfig.preset("byte-cpu")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _coerce(section: str, key: str, value, expected: type):
    """TOML's value, checked against the field's type (an int is a fine float)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if type(value) is not expected:
        raise ValueError(f"{section}.{key} must be {expected.__name__}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def _build_section(section: str, values: dict):
    """One section's dataclass from a dict; the model section may name a `preset`."""
    cls = SECTIONS[section]
    values = dict(values)
    base = getattr(RunConfig(), section)
    if section == "model" and "preset" in values:
        base = ModelConfig.preset(_coerce("model", "preset", values.pop("preset"), str))
    types_ = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in types_:
            allowed = ", ".join(types_) + (", preset" if section == "model" else "")
            raise ValueError(f"unknown key {section}.{key}; [{section}] takes: {allowed}")
        values[key] = _coerce(section, key, value, types_[key])
    return dataclasses.replace(base, **values)


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value). Values are TOML ('3', '1e-3', 'true',
    '"x"'); anything that is not valid TOML is taken as a bare string (data.path=my.txt)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r} in --set {text!r}; sections: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def _config_dirs() -> list[pathlib.Path]:
    """The folders of headwise.configs: configs/ in a checkout, package data when installed."""
    spec = importlib.util.find_spec("headwise.configs")
    if spec is None:
        raise FileNotFoundError("headwise.configs (the configs/ folder) is not installed: "
                                "reinstall headwise, e.g. pip install -e .")
    # A namespace package (configs/ is data, no __init__.py). Not importlib.resources: on Python
    # 3.11 it fails on an editable install's path, whose import-hook entry is not a folder.
    return [pathlib.Path(p) for p in spec.submodule_search_locations if pathlib.Path(p).is_dir()]


def find_config(name_or_path: str) -> pathlib.Path:
    """A path to a TOML file, or the name of one in configs/ (`shakespeare_char`)."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    folders = _config_dirs()
    for folder in folders:
        named = folder / f"{name_or_path.removesuffix('.toml')}.toml"
        if named.is_file():
            return named
    known = ", ".join(sorted({p.stem for d in folders for p in d.glob("*.toml")})) or "none found"
    raise FileNotFoundError(f"--config {name_or_path!r} is neither a file nor a config in "
                            f"{', '.join(map(str, folders))} (known: {known})")


def read_toml(path: pathlib.Path) -> dict:
    """A TOML file's tables; a file that is not UTF-8 or not TOML is a ValueError naming the
    file and the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x});"
                         f" save the file as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message ends "(at line L, column C)"
        raise ValueError(f"{path} is not valid TOML: {error}; fix that line") from None


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file (if any), then each `section.key=value` override in order."""
    raw: dict[str, dict] = read_toml(find_config(name_or_path)) if name_or_path else {}
    for section in raw:
        if section not in SECTIONS:
            raise ValueError(f"unknown section [{section}] in {name_or_path}; sections: {', '.join(SECTIONS)}")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return RunConfig(**{s: _build_section(s, raw.get(s, {})) for s in SECTIONS})


def to_dict(cfg: RunConfig) -> dict:
    """Every field, resolved (a preset becomes its fields): what config.toml and checkpoints hold."""
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


def config_text(cfg: RunConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def write_config(cfg: RunConfig, path: pathlib.Path) -> None:
    path.write_text(config_text(cfg))
