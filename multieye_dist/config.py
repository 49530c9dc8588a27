"""Run configuration: dataclass defaults <- YAML diff (optional ``base:``) <- dotted CLI overrides.

The defaults live in ONE place, the dataclasses below; the shipped YAML files
(``configs/``, package data) only state what differs. Every section is a *frozen*
dataclass (like :class:`multieye_dist.model.concept_model.ModelConfig`, which is reused as the
``model`` section): a resolved config cannot drift during a run, and code
that needs a variant makes one with :func:`dataclasses.replace`. Library functions take the
section they read (``cfg.loss``, ``cfg.optim``); only what spans sections takes the whole
:class:`Config`: the trainer, the objectives (stage, loss, teacher and perf together) and the
launchers.

Loading (:func:`load_config`):

* The file is a path or a packaged config's name (``demo``, ``teacher``, ``distill``: the
  stems of the shipped files; :func:`multieye_dist.core.resources.find_config`).
* A YAML file is a mapping of sections to mappings of fields. ``base: other.yaml`` (relative to
  the file; else a packaged config's name, ``base: distill``) names one file it is a diff over;
  that file may have a ``base:`` of its own.
* An override is ``section.field=value``; the value is parsed with ``yaml.safe_load`` (``3e-4``,
  ``true``, ``[1, 2]``, ``null``). Dotted keys reach into dict fields (``deepspeed.extra.a.b=1``)
  and into nested sections (a field whose type is a section, :mod:`multieye_dist.core.sections`:
  ``tracking.<backend>.<field>=...``), which YAML writes as nested mappings.
* Every value is checked against its field's type (an int is fine for a float; YAML 1.1 reads
  ``3e-4`` as a string, which is accepted for a float field); choices and ranges are checked in
  ``__post_init__``. Errors are :class:`ConfigError` and name the dotted key, and for unknown
  keys the file and line (or the override) and the closest valid key, or the new name of a key
  that moved (a section's ``_moved``).
* Secrets (API keys, tokens, passwords) are never configuration: keys that look like one are
  rejected; set them in the environment (the tracking backend reads its API key from there).

The ``tracking`` section is defined in :mod:`multieye_dist.track.tracking`, next to the backends it
configures, and the ``model`` section in :mod:`multieye_dist.model.concept_model`; this module only
assembles them. The section machinery (:class:`~multieye_dist.core.sections.Section`, type coercion,
:class:`ConfigError`) is :mod:`multieye_dist.core.sections`, so that those modules need not import
this one.

:func:`save_resolved` writes the resolved config to ``run_dir/config.yaml`` (atomically); loading
that file back gives an equal :class:`Config`. Only ``yaml.safe_load``/``safe_dump``, no pickle.
"""

from __future__ import annotations

import difflib
import functools
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from multieye_dist.core.atomic import write_text
from multieye_dist.core.resources import (
    CONFIG_DIR,
    config_names,
    find_config,
    find_packaged,
    user_path,
)
from multieye_dist.core.sections import SECRET_PARTS, ConfigError, is_section
from multieye_dist.core.sections import Section as _Section
from multieye_dist.core.sections import coerce as _coerce
from multieye_dist.data.config import DataConfig
from multieye_dist.model.concept_model import ModelConfig
from multieye_dist.track.records import CONFIG_FILE
from multieye_dist.track.tracking import TrackingConfig

__all__ = [
    "AlignConfig",
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
    "TrackingConfig",
    "check_world",
    "load_config",
    "parse_override",
    "provenance",
    "resolve_paths",
    "save_resolved",
    "to_dict",
]

# ----------------------------------------------------------------------------- sections


def _check_finite(section: _Section, names: tuple[str, ...]) -> None:
    for name in names:
        section._check(math.isfinite(getattr(section, name)), name, "a finite number")


@dataclass(frozen=True)
class ConceptsConfig(_Section):
    _key: ClassVar[str] = "concepts"
    bank: str = "configs/concepts/minilm-l6.safetensors"  # concept bank (concepts.save_bank)


TeacherKind = Literal["model", "oracle", "oracle-class", "oracle-permuted", "oracle-shuffled"]


@dataclass(frozen=True)
class TeacherConfig(_Section):
    _key: ClassVar[str] = "teacher"
    checkpoint: str | None = None  # the teacher's inference .safetensors (distill stage)
    # False (default) = the release: the teacher's level-2 projection W_4 stays at its random
    # init (strict=False load). True = train W_4 with the teacher's CE in the teacher stage.
    train_level2: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # the frozen teacher's weights
    # model: the OCT teacher of teacher.checkpoint. The oracles are controls for studies on the
    # synthetic data (multieye_dist.model.oracle): no model, each OCT partner's true findings from
    # its shard record as concept similarities (oracle), its class's finding probabilities
    # (oracle-class), classes deranged (oracle-permuted) or findings deranged (oracle-shuffled).
    kind: TeacherKind = "model"


@dataclass(frozen=True)
class LossConfig(_Section):
    """As in the release: ``alpha`` scales the contrastive term, ``beta`` the prototype term.

    ``name`` and ``variant`` choose an objective of :mod:`multieye_dist.train.objectives`
    (:data:`OBJECTIVE_CHOICES` lists them, checked with ``train.stage`` in :class:`Config`):
    ``octcoda`` (variants ``paper``, ``official``: docs/method.md, "Where the released code
    differs") or ``fundus-only`` (cross-entropy on fundus, no teacher). The teacher stage has one
    objective and does not read them."""

    _key: ClassVar[str] = "loss"
    name: str = "octcoda"
    variant: str = "paper"
    alpha: float = 0.6
    beta: float = 0.05
    temperature: float = 10.0  # divides the concept similarities in the contrastive term
    contrastive_scope: Literal["local", "global"] = "local"  # global: anchors from all ranks
    impl: Literal["auto", "triton", "torch"] = "auto"  # fused kernel, or torch (auto: per device)
    # alpha and beta ramp linearly from 0 over the first optimizer steps (0 = full from step 0,
    # the release): distillation starts once the student's classifier has found its feet.
    distill_warmup_steps: int = 0
    # Controls for studies (benchmarks/efficacy.py), octcoda only: gate-never computes
    # everything but never lets distillation in; permuted-teacher pairs each fundus class with
    # the OCT of another class (a derangement drawn from train.seed) and relabels the teacher's
    # outputs as the fundus class: a teacher as confident as the real one, about the wrong class;
    # gate-open applies distillation at every step, whatever the gate says.
    control: Literal["none", "gate-never", "gate-open", "permuted-teacher"] = "none"

    def _validate(self) -> None:
        _check_finite(self, ("alpha", "beta", "temperature"))
        self._check(self.distill_warmup_steps >= 0, "distill_warmup_steps", ">= 0")
        self._check(self.alpha >= 0.0, "alpha", ">= 0")
        self._check(self.beta >= 0.0, "beta", ">= 0")
        self._check(self.temperature > 0.0, "temperature", "> 0")


@dataclass(frozen=True)
class AlignConfig(_Section):
    """Concept-alignment pre-training (``train.stage=align``,
    :mod:`multieye_dist.train.objectives`): CLIP/FLAIR-style image-text contrastive training of the
    backbone and the projection W_p against the concept bank, one modality per run, with multiple
    positives (an image is positive with the captions of all its findings: the ``findings`` of each
    sample's shard record). Its export is a ``model.weights`` init for the teacher (oct) or the
    student (fundus)."""

    _key: ClassVar[str] = "align"
    modality: Literal["fundus", "oct"] = "fundus"  # the images this alignment run trains on
    temperature: float = 0.1  # of the image-concept cosine logits (CLIP learns it; fixed here)
    # Also train the classifier on the detached level-1 similarities (a linear probe: the
    # representation is not touched), so that dev macro-F1 measures the concept space and picks
    # the best checkpoint as in the other stages.
    probe: bool = True

    def _validate(self) -> None:
        _check_finite(self, ("temperature",))
        self._check(self.temperature > 0.0, "temperature", "> 0")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW; linear warm-up for ``warmup_epochs``, then cosine to ``min_lr``, per iteration."""

    _key: ClassVar[str] = "optim"
    lr: float = 1e-4  # peak learning rate (finite, > 0)
    weight_decay: float = 1e-3  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment coefficients
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    grad_accum: int = 1  # micro-batches per optimizer step
    # Learning-rate multipliers per top-level module of the model (backbone, proj, level2,
    # classifier), e.g. {level2: 0.1}: W_4, trained by distillation alone in the student, moves
    # slower and keeps level 2 in scale; {classifier: 30}: the concept classifier reads cosines in
    # [-1, 1] and needs large weights, which a short run at the backbone's rate never reaches.
    lr_scale: dict[str, float] = field(default_factory=dict)
    max_nonfinite_in_row: int = 20  # stop after this many non-finite losses in a row

    def _validate(self) -> None:
        # inf passes every comparison below and NaN fails them with a misleading rule: finite
        # first (optim.lr=inf would only show up as non-finite losses, far into the run).
        _check_finite(self, ("lr", "weight_decay", "min_lr"))
        self._check(self.lr > 0.0, "lr", "> 0")
        self._check(self.weight_decay >= 0.0, "weight_decay", ">= 0")
        self._check(all(0.0 <= b < 1.0 for b in self.betas), "betas", "in [0, 1)")
        self._check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        self._check(0.0 <= self.min_lr <= self.lr, "min_lr", f"in [0, optim.lr={self.lr}]")
        self._check(self.grad_accum >= 1, "grad_accum", ">= 1")
        self._check(
            all(
                isinstance(v, int | float) and math.isfinite(v) and v >= 0
                for v in self.lr_scale.values()
            ),
            "lr_scale",
            "a mapping of module name to a finite number >= 0",
        )
        self._check(self.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", ">= 1")


@dataclass(frozen=True)
class TrainConfig(_Section):
    _key: ClassVar[str] = "train"
    # align: concept-alignment pre-training (AlignConfig); teacher: OCT, cross-entropy only;
    # distill: the fundus student.
    stage: Literal["distill", "teacher", "align"] = "distill"
    epochs: int = 100  # data epochs of data.samples_per_epoch draws each
    out_dir: str = "runs/default"  # the run directory: config, checkpoints, exports, logs
    eval_every_epochs: int = 1  # dev evaluation (and best export) every N epochs
    checkpoint_every_steps: int = 500  # DeepSpeed checkpoint every N optimizer steps
    # Keep only the newest N checkpoints (0 = keep all): a ResNet-50 checkpoint is ~300 MB
    # with its optimizer state, written every checkpoint_every_steps and at every epoch end.
    # The best model is kept apart from them, as its export best.safetensors (never pruned).
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto" (latest in out_dir), "never", or a checkpoint path
    log_every_steps: int = 10  # one console line and tracker record every N optimizer steps
    seed: int = 0  # initial weights and per-step randomness (dropout)
    # Mixed precision (multieye_dist/train/engine.py): DeepSpeed's torch-autocast mode with bf16,
    # its bf16 mode (bf16 weights, fp32 master copies), or none. See BENCHMARKS.md, "Precision".
    precision: Literal["autocast-bf16", "bf16", "fp32"] = "autocast-bf16"
    # Stop (after a checkpoint) once this process has made this many optimizer steps: time-boxed
    # jobs, and tests of resumption. None = run to the last epoch.
    stop_after_steps: int | None = None
    # Stop once dev macro-F1 has not improved for this many dev evaluations in a row, then
    # export and score test as at the last epoch (a teacher trained until it stops improving).
    # 0 = off: train every epoch.
    early_stop_evals: int = 0
    progress: bool = True  # progress bars on rank 0
    # Draw the run's pictures (plots/*.png: curves, confusion, ROC/PR) when it finishes, ~3 s
    # on a CPU; false skips them (e.g. many short sweep runs): `multieye-dist plots RUN_DIR`
    # draws them later from the records the run leaves either way.
    plots: bool = True

    def _validate(self) -> None:
        for name in ("epochs", "eval_every_epochs", "checkpoint_every_steps", "log_every_steps"):
            self._check(getattr(self, name) >= 1, name, ">= 1")
        if self.stop_after_steps is not None:
            self._check(self.stop_after_steps >= 1, "stop_after_steps", ">= 1 or null")
        self._check(self.seed >= 0, "seed", ">= 0")
        self._check(self.early_stop_evals >= 0, "early_stop_evals", ">= 0 (0: off)")
        self._check(self.keep_checkpoints >= 0, "keep_checkpoints", ">= 0 (0: keep all)")
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
    zero_stage: Literal[0, 1, 2] = 1  # ZeRO partitioning: 0 off, 1 optimizer state, 2 + gradients
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON config


# ----------------------------------------------------------------------------- objectives

# The objectives a run can choose: train.stage -> loss.name -> the loss.variant values that
# objective computes differently (() = none: loss.variant does not change it). The trainer's
# objective classes (multieye_dist.train.objectives) implement these entries, and registering a
# new class adds its entry (register_objective); the table lives here so that a config is checked
# without importing the trainer.
OBJECTIVE_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "teacher": {"teacher-ce": ()},
    "distill": {"fundus-only": (), "octcoda": ("paper", "official")},
    "align": {"concept-align": ()},
}


def register_objective(stage: str, name: str, variants: tuple[str, ...]) -> None:
    """Make (``train.stage``, ``loss.name``) a choice; an entry already there must agree."""
    known = OBJECTIVE_CHOICES.setdefault(stage, {}).setdefault(name, tuple(variants))
    if known != tuple(variants):
        raise ValueError(f"objective {stage}/{name}: variants {variants} differ from {known}")


def objective_name(stage: str, loss: LossConfig) -> str:
    """The ``loss.name`` of the objective that ``train.stage`` and the ``loss`` section choose;
    ConfigError naming the option and its choices when there is none. A stage with one objective
    (the teacher's) uses it whatever ``loss.name`` says, but a name no stage knows is a typo."""
    if stage not in OBJECTIVE_CHOICES:
        raise ConfigError(
            f"train.stage={stage!r}: choose one of {', '.join(sorted(OBJECTIVE_CHOICES))}"
        )
    by_name = OBJECTIVE_CHOICES[stage]
    known = sorted({n for names in OBJECTIVE_CHOICES.values() for n in names})
    if loss.name not in known:
        raise ConfigError(f"loss.name={loss.name!r}: choose one of {', '.join(known)}")
    if len(by_name) == 1:
        name = next(iter(by_name))
    elif loss.name in by_name:
        name = loss.name
    else:
        raise ConfigError(
            f"loss.name={loss.name!r} for train.stage={stage}: choose one of "
            f"{', '.join(sorted(by_name))}"
        )
    every = sorted({v for names in OBJECTIVE_CHOICES.values() for vs in names.values() for v in vs})
    choices = by_name[name] or every
    if loss.variant not in choices:
        raise ConfigError(
            f"loss.variant={loss.variant!r} for loss.name={name}: choose one of "
            f"{', '.join(choices)}"
        )
    return name


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
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
        name = objective_name(self.train.stage, self.loss)
        if self.loss.control != "none" and name != "octcoda":
            raise ConfigError(
                f"loss.control={self.loss.control} controls the octcoda student; this run's "
                f"objective is {self.train.stage}/{name}"
            )
        if self.teacher.kind != "model":
            if name != "octcoda":
                raise ConfigError(
                    f"teacher.kind={self.teacher.kind} is a teacher of the octcoda student; this "
                    f"run's objective is {self.train.stage}/{name}"
                )
            if self.loss.impl == "triton" or self.loss.control == "permuted-teacher":
                raise ConfigError(
                    f"teacher.kind={self.teacher.kind} gives concept similarities, not "
                    "embeddings: use loss.impl=auto or torch (not triton), and "
                    "teacher.kind=oracle-permuted rather than loss.control=permuted-teacher"
                )
        _check_backbone(self.model.backbone)
        _check_deepspeed_extra(self)


def _check_backbone(name: str) -> None:
    """The same test the model applies when it is built (timm's registry), made here so that
    a misspelt backbone is refused before a run directory or a Slurm job exists."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    hint = f"; did you mean {close[0]}?" if close else " (timm.list_models() lists them)"
    raise ConfigError(f"model.backbone={name!r}: not a timm model{hint}")


# DeepSpeed JSON keys the trainer derives (engine.ds_config): deepspeed.extra, merged over them,
# may repeat them only with the same values. A different micro-batch or accumulation would make
# DeepSpeed's batch arithmetic disagree with the stream's; a ZeRO stage there would silently win
# over deepspeed.zero_stage.
_DERIVED = {
    "train_micro_batch_size_per_gpu": ("data", "batch_size"),
    "gradient_accumulation_steps": ("optim", "grad_accum"),
}


def _check_deepspeed_extra(cfg: Config) -> None:
    extra = cfg.deepspeed.extra
    for key, (sec, name) in _DERIVED.items():
        value = getattr(getattr(cfg, sec), name)
        if key in extra and extra[key] != value:
            raise ConfigError(
                f"deepspeed.extra.{key}={extra[key]!r} contradicts {sec}.{name}={value}: "
                f"drop it from deepspeed.extra (the trainer sets it from {sec}.{name})"
            )
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed.extra.zero_optimization={zero!r}: expected a mapping")
    if "stage" in zero and zero["stage"] != cfg.deepspeed.zero_stage:
        raise ConfigError(
            f"deepspeed.extra.zero_optimization.stage={zero['stage']!r} contradicts "
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: set deepspeed.zero_stage only"
        )
    total, per_rank = extra.get("train_batch_size"), cfg.data.batch_size * cfg.optim.grad_accum
    if total is not None and (
        isinstance(total, bool) or not isinstance(total, int) or total < 1 or total % per_rank
    ):
        raise ConfigError(
            f"deepspeed.extra.train_batch_size={total!r}: must be data.batch_size="
            f"{cfg.data.batch_size} x optim.grad_accum={cfg.optim.grad_accum} x the number of "
            "ranks; drop it from deepspeed.extra (the trainer derives it)"
        )


def check_world(cfg: Config, world: int) -> None:
    """What the config can only be checked against once the number of ranks is known (the
    trainer: from the launcher's environment; the Slurm launchers: nodes x tasks per node)."""
    total = cfg.deepspeed.extra.get("train_batch_size")
    per_rank = cfg.data.batch_size * cfg.optim.grad_accum
    if total is not None and total != per_rank * world:
        raise ConfigError(
            f"deepspeed.extra.train_batch_size={total} but data.batch_size={cfg.data.batch_size}"
            f" x optim.grad_accum={cfg.optim.grad_accum} x {world} rank(s) = {per_rank * world}: "
            "drop it from deepspeed.extra (the trainer derives it) or launch "
            f"{total // per_rank} rank(s)"
        )


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "concepts": ConceptsConfig,
    "teacher": TeacherConfig,
    "loss": LossConfig,
    "align": AlignConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "tracking": TrackingConfig,
    "perf": PerfConfig,
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field types of a section class (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _dotted_keys(hints: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key below ``hints``: nested sections by name and by each of their fields."""
    keys = []
    for name, tp in hints.items():
        keys.append(prefix + name)
        if is_section(tp):
            keys += _dotted_keys(_hints(tp), f"{prefix}{name}.")
    return keys


_ALL_KEYS = [k for k in _dotted_keys(_SECTIONS) if "." in k]
_MOVED = {old: new for cls in _SECTIONS.values() for old, new in getattr(cls, "_moved", {}).items()}


# ----------------------------------------------------------------------------- loading


def _is_dict_field(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _suggest(dotted: str) -> str:
    if dotted in _MOVED:
        return f"; it is now {_MOVED[dotted]}"
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in _ALL_KEYS if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(dotted, _ALL_KEYS + list(_SECTIONS), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _check_secret(dotted: str, where: str) -> None:
    leaf = dotted.rsplit(".", 1)[-1].lower().replace("-", "_")
    if any(part in leaf for part in SECRET_PARTS):
        raise ConfigError(
            f"{dotted} ({where}): secrets are not configuration; set them in the environment "
            "(where the tracking backend reads its API key), never in a YAML file or override"
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
            hint = _suggest(str(sec))
            keys = body if isinstance(body, dict) else {}
            moved = [f"{sec}.{k} -> {_MOVED[f'{sec}.{k}']}" for k in keys if f"{sec}.{k}" in _MOVED]
            if moved:  # an old section: where each of its keys went
                hint += f" ({', '.join(moved)})"
            raise ConfigError(f"unknown {kind} {sec!r} ({where((sec,))}){hint}")
        _check_body(_SECTIONS[sec], body, (sec,), where)


def _check_body(cls: type, body: Any, path: tuple[str, ...], where: Any) -> None:
    """One section's mapping: known fields only; a mapping only for a dict field or a nested
    section, whose own mapping is checked the same way."""
    dotted = ".".join(path)
    if not isinstance(body, dict):
        raise ConfigError(f"{dotted} ({where(path)}): expected a mapping of its fields")
    hints = _hints(cls)
    for key, value in body.items():
        sub = (*path, key)
        dotted = ".".join(sub)
        if key not in hints:
            raise ConfigError(f"unknown key {dotted!r} ({where(sub)}){_suggest(dotted)}")
        if is_section(hints[key]):
            _check_body(hints[key], value, sub, where)
        elif isinstance(value, dict) and not _is_dict_field(hints[key]):
            raise ConfigError(f"{dotted} ({where(sub)}): expected a value, not a mapping")


def _field_paths(hints: dict[str, Any], tree: dict, path: tuple[str, ...] = ()) -> list[tuple]:
    """The key paths of ``tree`` (already checked) that end at a field: into nested sections,
    not into dict fields (``deepspeed.extra.a.b`` is the field ``deepspeed.extra``)."""
    out = []
    for key, value in tree.items():
        tp = hints.get(key)
        if is_section(tp) and isinstance(value, dict):
            out += _field_paths(_hints(tp), value, (*path, key))
        else:
            out.append((*path, key))
    return out


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
        base_tree, sources = _read_yaml(_base_path(path, base, where), (*seen, path))
    _check_tree(tree, where)
    sources.update({".".join(p): where(p) for p in _field_paths(_SECTIONS, tree)})
    return merge_dicts(base_tree, tree), sources


def _base_path(path: Path, base: str, where: Any) -> Path:
    """A ``base:`` file: relative to the file naming it, else a packaged config's name
    (``base: distill``: a user's YAML anywhere may diff over a shipped recipe)."""
    here = path.parent / base
    if here.exists():
        return here
    shipped = find_packaged(f"{CONFIG_DIR}/{base}.yaml")
    if shipped is not None:
        return shipped
    names = config_names()
    close = difflib.get_close_matches(base, names, n=1)
    raise ConfigError(
        f"base: {base} ({where(('base',))}): no such file next to it, and no packaged config of "
        f"that name (packaged configs: {', '.join(names)})"
        + (f"; did you mean {close[0]}?" if close else "")
    )


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
    """Defaults <- YAML file at ``path`` (with its ``base:`` chain) <- ``overrides``. ``path``
    is a file, or a packaged config's name (``demo``):
    :func:`multieye_dist.core.resources.find_config`.
    """
    tree, sources = _read_yaml(find_config(path)) if path is not None else ({}, {})
    for text in overrides:
        keys, value = parse_override(text)
        layer: Any = value
        for k in reversed(keys):
            layer = {k: layer}
        _check_tree(layer, lambda _p, text=text: f"override {text!r}")
        tree = merge_dicts(tree, layer)
        sources.update({".".join(p): f"override {text!r}" for p in _field_paths(_SECTIONS, layer)})
    sections = {sec: _build(cls, tree.get(sec, {}), sec, sources) for sec, cls in _SECTIONS.items()}
    return Config(**sections)


def _build(cls: type, body: dict, dotted: str, sources: dict[str, str]) -> Any:
    """The section ``cls`` from its checked mapping; a type error names where the value came
    from (``sources``: dotted field -> file:line or override)."""
    hints, kwargs = _hints(cls), {}
    for k, v in body.items():
        key = f"{dotted}.{k}"
        if is_section(hints[k]):
            kwargs[k] = _build(hints[k], v, key, sources)
            continue
        try:
            kwargs[k] = _coerce(v, hints[k], key)
        except ConfigError as e:
            raise ConfigError(f"{e} ({sources.get(key, 'defaults')})") from None
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # ModelConfig's own checks
        raise ConfigError(f"{dotted}: {e}") from None


# ----------------------------------------------------------------------------- saving


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _section_dict(section: Any) -> dict[str, Any]:
    return {
        f.name: _section_dict(v) if is_dataclass(v) else _plain(v)
        for f in fields(section)
        for v in (getattr(section, f.name),)
    }


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists, nested sections as mappings): JSON- and
    ``yaml.safe_dump``-serialisable, and what :func:`load_config` reads back."""
    return _section_dict(cfg)


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with every file path absolute, as the run found it
    (:func:`~multieye_dist.core.resources.user_path`: the working directory, else the package's
    data): shards (URLs untouched), concept bank, teacher checkpoint, init weights, out_dir. What
    config.yaml records, so that it still names the same files from another directory."""
    import dataclasses
    import os

    from multieye_dist.data.remote import is_url

    def absolute(path: str | None) -> str | None:
        return path if not path or is_url(path) else os.path.abspath(user_path(path))

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards) or ""),
        concepts=dataclasses.replace(cfg.concepts, bank=absolute(cfg.concepts.bank)),
        teacher=dataclasses.replace(cfg.teacher, checkpoint=absolute(cfg.teacher.checkpoint)),
        model=dataclasses.replace(cfg.model, weights=absolute(cfg.model.weights)),
        train=dataclasses.replace(cfg.train, out_dir=os.path.abspath(cfg.train.out_dir)),
    )


def provenance() -> tuple[str, str | None]:
    """(the package version, the git commit of the package's checkout, or None when it is not
    one: an installed wheel, no git, a git that fails). Never raises."""
    import subprocess

    from multieye_dist import __version__

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # The package's own files must be tracked: a wheel installed into a .venv inside some other
    # checkout would otherwise report that checkout's commit.
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return __version__, None
    return __version__, git("rev-parse", "HEAD") or None


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``run_dir/config.yaml`` atomically (temp file in run_dir + ``os.replace``): the
    config with absolute paths (:func:`resolve_paths`); its header comments name the package
    version and git commit (:func:`provenance`); comments, so that it loads as a config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CONFIG_FILE
    version, commit = provenance()
    text = (
        "# resolved config (multieye_dist.config), paths absolute\n"
        f"# multieye-dist version: {version}\n"
        f"# git commit: {commit or 'none (not a git checkout)'}\n"
        + yaml.safe_dump(to_dict(resolve_paths(cfg)), sort_keys=False)
    )
    write_text(target, text)
    return target
