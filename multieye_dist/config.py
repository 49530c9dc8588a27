"""Run configuration: dataclass defaults <- YAML diff (optional ``base:``) <- dotted CLI overrides.

The defaults live in ONE place, the dataclasses below; YAML files under ``configs/`` only state
what differs. Every section is a *frozen* dataclass (like :class:`multieye_dist.model.ModelConfig`,
which is reused as the ``model`` section): a resolved config cannot drift during a run, and code
that needs a variant makes one with :func:`dataclasses.replace`. Functions elsewhere take one
section (``cfg.loss``, ``cfg.optim``), never the whole :class:`Config`.

Loading (:func:`load_config`):

* A YAML file is a mapping of sections to mappings of fields. ``base: other.yaml`` (relative to
  the file) names one file it is a diff over; that file may have a ``base:`` of its own.
* An override is ``section.field=value``; the value is parsed with ``yaml.safe_load`` (``3e-4``,
  ``true``, ``[1, 2]``, ``null``). Dotted keys reach into dict fields (``deepspeed.extra.a.b=1``).
* Every value is checked against its field's type (an int is fine for a float; YAML 1.1 reads
  ``3e-4`` as a string, which is accepted for a float field); choices and ranges are checked in
  ``__post_init__``. Errors are :class:`ConfigError` and name the dotted key, and for unknown
  keys the file and line (or the override) and the closest valid key.
* Secrets (W&B API keys, tokens, passwords) are never configuration: keys that look like one are
  rejected; set them in the environment (``WANDB_API_KEY``).

:func:`save_resolved` writes the resolved config to ``run_dir/config.yaml`` (atomically); loading
that file back gives an equal :class:`Config`. Only ``yaml.safe_load``/``safe_dump``, no pickle.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from multieye_dist.atomic import write_text
from multieye_dist.model import ModelConfig

__all__ = [
    "Config",
    "ConceptsConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PerfConfig",
    "TeacherConfig",
    "TrainConfig",
    "WandbConfig",
    "load_config",
    "parse_override",
    "save_resolved",
    "to_dict",
]

_SECRET_PARTS = ("api_key", "apikey", "token", "password", "secret")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key (and where it came from)."""


# ----------------------------------------------------------------------------- type checking


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (list -> tuple, int ->
    float, "3e-4" -> float). Literal choices pass through: ``__post_init__`` reports them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any or origin is Literal:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise bad()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            items = [
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            items = [
                _coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)
            ]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class _Section:
    """Base of the sections owned here: coerces field types, checks Literal choices, then
    :meth:`_validate` checks ranges. ``_key`` is the section's name in :class:`Config`."""

    _key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            key, value = f"{self._key}.{f.name}", getattr(self, f.name)
            value = _coerce(value, hints[f.name], key)
            object.__setattr__(self, f.name, value)
            choices = _choices(hints[f.name])
            if choices is not None and not any(
                value == c and type(value) is type(c) for c in choices
            ):
                raise ConfigError(
                    f"{key}={value!r}: choose one of {', '.join(str(c) for c in choices)}"
                )
        self._validate()

    def _validate(self) -> None:
        pass

    def _check(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key}.{name}={getattr(self, name)!r}: must be {rule}")


@dataclass(frozen=True)
class DataConfig(_Section):
    _key: ClassVar[str] = "data"
    shards: str = "runs/demo/shards"  # directory of WebDataset shards
    image_size: int = 512
    batch_size: int = 64  # per rank
    samples_per_epoch: int = 36000  # class-balanced draws per epoch (all ranks together)
    num_workers: int = 8
    pool_size: int = 32  # per-class pool for balanced sampling and OCT partners
    resampled: bool = False
    seed: int = 0
    max_bad_fraction: float = 0.01  # corrupt samples tolerated before the run stops
    # The release's training augmentation (random resized crop, flip, RandAugment, erasing);
    # false = evaluation transform only (tiny CPU runs on position-coded synthetic data).
    augment: bool = True

    def _validate(self) -> None:
        for name in ("image_size", "batch_size", "samples_per_epoch", "pool_size"):
            self._check(getattr(self, name) >= 1, name, ">= 1")
        self._check(self.num_workers >= 0, "num_workers", ">= 0")
        self._check(self.seed >= 0, "seed", ">= 0")
        self._check(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "in [0, 1]")


@dataclass(frozen=True)
class ConceptsConfig(_Section):
    _key: ClassVar[str] = "concepts"
    bank: str = "configs/concepts/minilm-l6.safetensors"  # concept bank (concepts.save_bank)


@dataclass(frozen=True)
class TeacherConfig(_Section):
    _key: ClassVar[str] = "teacher"
    checkpoint: str | None = None  # the teacher's inference .safetensors (distill stage)
    # False (default) = the release: the teacher's level-2 projection W_4 stays at its random
    # init (strict=False load). True = train W_4 with the teacher's CE in the teacher stage.
    train_level2: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # the frozen teacher's weights


@dataclass(frozen=True)
class LossConfig(_Section):
    """As in the release: ``alpha`` scales the contrastive term, ``beta`` the prototype term."""

    _key: ClassVar[str] = "loss"
    name: Literal["octcoda", "fundus-only"] = "octcoda"  # fundus-only = CE on fundus, no teacher
    variant: Literal["paper", "official"] = "paper"  # METHOD.md "Where the released code differs"
    alpha: float = 0.6
    beta: float = 0.05
    temperature: float = 10.0
    contrastive_scope: Literal["local", "global"] = "local"  # global: anchors from all ranks
    impl: Literal["auto", "triton", "torch"] = "auto"

    def _validate(self) -> None:
        self._check(self.alpha >= 0.0, "alpha", ">= 0")
        self._check(self.beta >= 0.0, "beta", ">= 0")
        self._check(self.temperature > 0.0, "temperature", "> 0")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW; linear warm-up for ``warmup_epochs``, then cosine to ``min_lr``, per iteration."""

    _key: ClassVar[str] = "optim"
    lr: float = 1e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    grad_accum: int = 1
    max_nonfinite_in_row: int = 20  # stop after this many non-finite losses in a row

    def _validate(self) -> None:
        self._check(self.lr > 0.0, "lr", "> 0")
        self._check(self.weight_decay >= 0.0, "weight_decay", ">= 0")
        self._check(all(0.0 <= b < 1.0 for b in self.betas), "betas", "in [0, 1)")
        self._check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        self._check(0.0 <= self.min_lr <= self.lr, "min_lr", f"in [0, optim.lr={self.lr}]")
        self._check(self.grad_accum >= 1, "grad_accum", ">= 1")
        self._check(self.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", ">= 1")


@dataclass(frozen=True)
class TrainConfig(_Section):
    _key: ClassVar[str] = "train"
    stage: Literal["distill", "teacher"] = "distill"  # teacher: OCT, cross-entropy only
    epochs: int = 100
    out_dir: str = "runs/default"
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 500
    resume: str = "auto"  # "auto" (latest in out_dir), "never", or a checkpoint path
    log_every_steps: int = 10
    seed: int = 0
    # Mixed precision (multieye_dist/engine.py): DeepSpeed's torch-autocast mode with bf16, its
    # bf16 mode (bf16 weights, fp32 master copies), or none. See BENCHMARKS.md, "Precision".
    precision: Literal["autocast-bf16", "bf16", "fp32"] = "autocast-bf16"
    # Stop (after a checkpoint) once this process has made this many optimizer steps: time-boxed
    # jobs, and tests of resumption. None = run to the last epoch.
    stop_after_steps: int | None = None
    progress: bool = True  # progress bars on rank 0

    def _validate(self) -> None:
        for name in ("epochs", "eval_every_epochs", "checkpoint_every_steps", "log_every_steps"):
            self._check(getattr(self, name) >= 1, name, ">= 1")
        if self.stop_after_steps is not None:
            self._check(self.stop_after_steps >= 1, "stop_after_steps", ">= 1 or null")
        self._check(self.seed >= 0, "seed", ">= 0")
        self._check(bool(self.out_dir), "out_dir", "a non-empty path")
        self._check(bool(self.resume), "resume", '"auto", "never" or a checkpoint path')


@dataclass(frozen=True)
class PerfConfig(_Section):
    """The fast path of the step (BENCHMARKS.md, "The distillation step"); each switch is
    measured by benchmarks/step.py. Off switches give the plain eager step."""

    _key: ClassVar[str] = "perf"
    channels_last: bool = True  # NHWC activations: tensor-core convolutions without transposes
    compile: bool = False  # torch.compile of the student (DeepSpeed's engine.compile) and teacher
    teacher_inference_mode: bool = True  # teacher under inference_mode (outputs cloned out)
    prefetch: bool = True  # copy the next batch to the GPU on a side stream during the step


@dataclass(frozen=True)
class DeepSpeedConfig(_Section):
    _key: ClassVar[str] = "deepspeed"
    zero_stage: Literal[0, 1, 2] = 1
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON config


@dataclass(frozen=True)
class WandbConfig(_Section):
    """The API key is never configuration: W&B reads ``WANDB_API_KEY`` from the environment."""

    _key: ClassVar[str] = "wandb"
    project: str = "multieye-dist"
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None

    def _validate(self) -> None:
        self._check(bool(self.project), "project", "a non-empty name")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), _SECTIONS[f.name]):
                raise ConfigError(f"{f.name}: expected {_SECTIONS[f.name].__name__}")
        if self.optim.warmup_epochs > self.train.epochs:
            raise ConfigError(
                f"optim.warmup_epochs={self.optim.warmup_epochs}: must be <= "
                f"train.epochs={self.train.epochs}"
            )


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "concepts": ConceptsConfig,
    "teacher": TeacherConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "wandb": WandbConfig,
    "perf": PerfConfig,
}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _SECTIONS.items()}
_FIELDS = {name: [f.name for f in fields(cls)] for name, cls in _SECTIONS.items()}
_ALL_KEYS = [f"{s}.{f}" for s, names in _FIELDS.items() for f in names]


# ----------------------------------------------------------------------------- loading


def _is_dict_field(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _suggest(dotted: str) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in _ALL_KEYS if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(dotted, _ALL_KEYS + list(_SECTIONS), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _check_secret(dotted: str, where: str) -> None:
    leaf = dotted.rsplit(".", 1)[-1].lower().replace("-", "_")
    if any(part in leaf for part in _SECRET_PARTS):
        raise ConfigError(
            f"{dotted} ({where}): secrets are not configuration; set them in the environment "
            "(e.g. WANDB_API_KEY), never in a YAML file or override"
        )


def _check_tree(tree: dict, where: Any) -> None:
    """Reject secret-like and unknown keys in one layer; ``where(path)`` names a key's origin."""

    def walk_secrets(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                _check_secret(".".join((*path, str(k))), where((*path, k)))
                walk_secrets(v, (*path, k))

    walk_secrets(tree, ())
    for sec, body in tree.items():
        if sec not in _SECTIONS:
            kind = "section" if isinstance(body, dict) else "key"
            raise ConfigError(f"unknown {kind} {sec!r} ({where((sec,))}){_suggest(str(sec))}")
        if not isinstance(body, dict):
            raise ConfigError(f"{sec} ({where((sec,))}): expected a mapping of its fields")
        for key, value in body.items():
            dotted = f"{sec}.{key}"
            if key not in _FIELDS[sec]:
                raise ConfigError(f"unknown key {dotted!r} ({where((sec, key))}){_suggest(dotted)}")
            if isinstance(value, dict) and not _is_dict_field(_HINTS[sec][key]):
                raise ConfigError(
                    f"{dotted} ({where((sec, key))}): expected a value, not a mapping"
                )


def merge_dicts(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_dicts(out[k], v) if both else v
    return out


def _key_lines(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = (*path, key_node.value)
            lines[sub] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, sub))
    return lines


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Load one YAML file over its ``base:`` chain; return (tree, dotted section.field -> where)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base:' cycle through {', '.join(map(str, seen))}")
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")

    def where(p: tuple) -> str:
        return f"{path}:{lines[p]}" if p in lines else str(path)

    base_tree, sources = {}, {}
    if "base" in tree:
        base = tree.pop("base")
        if not isinstance(base, str):
            raise ConfigError(f"base ({where(('base',))}): expected a file name, got {base!r}")
        base_tree, sources = _read_yaml(path.parent / base, (*seen, path))
    _check_tree(tree, where)
    for sec, body in tree.items():
        sources.update({f"{sec}.{k}": where((sec, k)) for k in body})
    return merge_dicts(base_tree, tree), sources


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], "3e-4")``; the value via ``yaml.safe_load``
    (strings such as "3e-4" are made floats later, against the field's type)."""
    key, eq, raw = text.partition("=")
    path = key.strip().split(".")
    if not eq or not all(path):
        raise ConfigError(f"override {text!r}: expected section.field=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {e}") from None
    return path, value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults <- YAML file at ``path`` (with its ``base:`` chain) <- ``overrides``."""
    tree, sources = _read_yaml(Path(path)) if path is not None else ({}, {})
    for text in overrides:
        keys, value = parse_override(text)
        layer: Any = value
        for k in reversed(keys):
            layer = {k: layer}
        _check_tree(layer, lambda _p, text=text: f"override {text!r}")
        tree = merge_dicts(tree, layer)
        sources.update({f"{keys[0]}.{k}": f"override {text!r}" for k in layer[keys[0]]})

    sections = {}
    for sec, cls in _SECTIONS.items():
        body = tree.get(sec, {})
        kwargs = {}
        for k, v in body.items():
            try:
                kwargs[k] = _coerce(v, _HINTS[sec][k], f"{sec}.{k}")
            except ConfigError as e:
                raise ConfigError(f"{e} ({sources.get(f'{sec}.{k}', 'defaults')})") from None
        try:
            sections[sec] = cls(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # ModelConfig's own checks
            raise ConfigError(f"{sec}: {e}") from None
    return Config(**sections)


# ----------------------------------------------------------------------------- saving


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists): JSON- and ``yaml.safe_dump``-serialisable."""
    out = {}
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        out[f.name] = {g.name: _plain(getattr(section, g.name)) for g in fields(section)}
    return out


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``run_dir/config.yaml`` atomically (temp file in run_dir + ``os.replace``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    text = "# resolved config (multieye_dist.config)\n" + yaml.safe_dump(
        to_dict(cfg), sort_keys=False
    )
    write_text(target, text)
    return target
