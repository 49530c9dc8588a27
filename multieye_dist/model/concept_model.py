"""The OCT-CoDA concept model (docs/method.md, "The model"): one class serves teacher and student.

::

    h      = backbone(x)                      global-pooled feature, width backbone.num_features
    v      = normalize(W_p h)                 W_p: Linear(F -> D, bias=False)       (``proj``)
    s      = v C^T                            level 1, [B, K]
    s'     = (W_4 h + b_4) C^T                level 2, [B, K], not normalised       (``level2``)
    logits = W_c s + b_c                      Linear(K -> num_classes)              (``classifier``)
    sims   = stack([s, s'], dim=1)            [B, 2, K]

``C`` is the fixed concept bank ([K, D] text embeddings), used exactly as given (not
re-normalised here), stored as a persistent buffer (it travels with checkpoints) and never
trained. Both levels read the same pooled feature, as in the release. ``drop_rate`` is a dropout
on ``h`` (shared by both levels), applied by this module rather than by timm so that it means the
same thing for every backbone.

Imports only torch and timm (``safetensors`` -- a timm dependency -- lazily, for ``.safetensors``
weight files). Backbones are always built with ``pretrained=False``; weights come only from a
local file (:func:`load_backbone_weights`): a backbone's own state dict, or a whole-model init (an
inference export, an alignment run's export, ``multieye-dist import flair``), whose projection
and heads are then loaded too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NUM_LEVELS = 2
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_STRIP_PREFIXES = ("module.", "backbone.")
_TEACHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name
    # Local file: .safetensors, or a torch .pt/.pth state dict (read with weights_only=True).
    # None = random init. A backbone state dict loads into the backbone; a whole-model file
    # (backbone.* and proj.weight keys: an export of this model, or an `import flair` init)
    # also loads the projection W_p and whichever of level2/classifier it has.
    weights: str | None = None
    num_classes: int = 9  # classifier outputs (MultiEYE's 9 classes)
    concept_dim: int | None = None  # D; None = taken from the concept bank
    drop_rate: float = 0.0  # dropout on the pooled feature h
    # L2-normalise the level-2 embedding u as level 1 does (s' = normalize(W_4 h + b_4) C^T):
    # keeps s' in [-1, 1] when distillation alone trains W_4. False = the release.
    level2_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise TypeError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.concept_dim is not None and (
            isinstance(self.concept_dim, bool)
            or not isinstance(self.concept_dim, int)
            or self.concept_dim < 1
        ):
            raise ValueError(f"concept_dim must be None or an int >= 1, got {self.concept_dim!r}")
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")


def _validate_concepts(concepts: Any, concept_dim: int | None) -> None:
    if not isinstance(concepts, torch.Tensor):
        raise TypeError(
            f"concepts must be a torch.Tensor of shape [K, D], got {type(concepts).__name__}"
        )
    desc = f"shape {tuple(concepts.shape)}, dtype {concepts.dtype}"
    if not concepts.is_floating_point():
        raise TypeError(f"concepts must be a floating tensor of shape [K, D], got {desc}")
    if concepts.ndim != 2:
        raise ValueError(f"concepts must be 2-D [K, D] (K concepts of dim D), got {desc}")
    if concepts.shape[0] < 1 or concepts.shape[1] < 1:
        raise ValueError(f"concepts must have K >= 1 and D >= 1, got {desc}")
    if concept_dim is not None and concepts.shape[1] != concept_dim:
        raise ValueError(
            f"concept bank has D={concepts.shape[1]} but ModelConfig.concept_dim={concept_dim}"
        )
    if not bool(torch.isfinite(concepts).all()):
        raise ValueError(f"concepts contain NaN or Inf ({desc})")


class ConceptModel(nn.Module):
    """One class for teacher and student (docs/method.md, "The model").

    ``forward(x) -> (logits [B, num_classes], sims [B, 2, K])``.

    If ``cfg.weights`` is set, the backbone is loaded from that local file at construction; pass
    ``load_weights=False`` to skip it when a full checkpoint is loaded right afterwards.
    """

    def __init__(self, cfg: ModelConfig, concepts: Tensor, *, load_weights: bool = True):
        super().__init__()
        _validate_concepts(concepts, cfg.concept_dim)
        self.cfg = cfg
        k, d = concepts.shape
        if not timm.is_model(cfg.backbone):
            raise ValueError(f"unknown timm model name {cfg.backbone!r}")
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        nf = int(self.backbone.num_features)
        self.num_features = nf
        self.num_concepts = int(k)
        self.concept_dim = int(d)
        self.num_classes = cfg.num_classes
        self.dropout = nn.Dropout(float(cfg.drop_rate))
        self.proj = nn.Linear(nf, d, bias=False)  # W_p
        self.level2 = nn.Linear(nf, d, bias=True)  # W_4, b_4
        self.classifier = nn.Linear(k, cfg.num_classes)  # W_c, b_c
        # Persistent buffer: saved in state_dict, moved by .to(), never a parameter.
        bank = concepts.detach().to(dtype=torch.get_default_dtype()).clone().contiguous()
        self.register_buffer("concepts", bank, persistent=True)
        if load_weights and cfg.weights is not None:
            load_backbone_weights(self, cfg.weights)

    # The pieces, so that FrozenTeacher composes exactly the same computation.
    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone feature h, [B, num_features] (dropout applied in train mode)."""
        return self.dropout(self.backbone(x))

    def level1_sims(self, h: Tensor) -> Tensor:
        """s = normalize(W_p h) C^T, [B, K]."""
        v = F.normalize(self.proj(h), dim=-1)
        return v @ self.concepts.to(v.dtype).t()

    def _level2(self, h: Tensor) -> Tensor:
        u = self.level2(h)
        return F.normalize(u, dim=-1) if self.cfg.level2_norm else u

    def level2_sims(self, h: Tensor) -> Tensor:
        """s' = (W_4 h + b_4) C^T, [B, K] (the embedding normalised with ``level2_norm``)."""
        u = self._level2(h)
        return u @ self.concepts.to(u.dtype).t()

    def embeddings(self, h: Tensor) -> Tensor:
        """[v, u] = [normalize(W_p h), W_4 h + b_4], [B, 2, D]: what the fused loss kernel
        (``loss.impl=triton``) takes instead of the similarities (sims = emb C^T)."""
        v = F.normalize(self.proj(h), dim=-1)
        u = self._level2(h)
        return torch.stack([v, u.to(v.dtype)], dim=1)

    def forward(self, x: Tensor, return_embeddings: bool = False) -> tuple[Tensor, Tensor]:
        """(logits, sims [B, 2, K]), or (logits, embeddings [B, 2, D]) when asked."""
        h = self.features(x)
        if return_embeddings:
            emb = self.embeddings(h)
            logits = self.classifier(emb[:, 0] @ self.concepts.to(emb.dtype).t())
            return logits, emb
        s = self.level1_sims(h)
        s2 = self.level2_sims(h)
        logits = self.classifier(s)
        return logits, torch.stack([s, s2], dim=1)

    def contributions(self, sims_level1: Tensor) -> Tensor:
        """Per-concept class evidence W_c[c, k] * s_k: [B, K] -> [B, num_classes, K].

        ``contributions(s).sum(-1) + classifier.bias == logits``.
        """
        if (
            not isinstance(sims_level1, torch.Tensor)
            or sims_level1.ndim != 2
            or sims_level1.shape[1] != self.num_concepts
        ):
            got = tuple(sims_level1.shape) if isinstance(sims_level1, torch.Tensor) else None
            raise ValueError(
                f"sims_level1 must be [B, K={self.num_concepts}] (sims[:, 0]), got shape {got}"
            )
        w = self.classifier.weight
        return w.unsqueeze(0) * sims_level1.to(w.dtype).unsqueeze(1)


def build_model(cfg: ModelConfig, concepts: Tensor, *, load_weights: bool = True) -> ConceptModel:
    """Build a :class:`ConceptModel`; loads ``cfg.weights`` into the backbone unless told not to."""
    model = ConceptModel(cfg, concepts, load_weights=load_weights)
    logger.info(
        "ConceptModel: backbone=%s (F=%d) K=%d D=%d classes=%d weights=%s",
        cfg.backbone,
        model.num_features,
        model.num_concepts,
        model.concept_dim,
        cfg.num_classes,
        cfg.weights if (load_weights and cfg.weights) else "random init",
    )
    return model


# ----------------------------------------------------------------------------- weight loading


class LoadResult(NamedTuple):
    loaded: list[str]  # backbone keys taken from the file
    missing: list[str]  # backbone keys the file did not provide (left as initialised)
    unexpected: list[str]  # file keys (after prefix stripping) the backbone does not have


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"cannot read weights file {path} as safetensors: {e}") from e
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"cannot read weights file {path} as a torch checkpoint (weights_only=True): {e}"
            ) from e
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {path} does not hold a state dict (got {type(obj)})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


_HEADS = ("proj", "level2", "classifier")


def _whole_model_state(raw: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The state of a whole-model file (``backbone.*`` and ``proj.weight``, after an optional
    ``module.`` prefix), else None."""
    sd = {k.removeprefix("module."): v for k, v in raw.items()}
    if "proj.weight" in sd and any(k.startswith("backbone.") for k in sd):
        return sd
    return None


def _load_whole_model(model: ConceptModel, path: Path, sd: dict[str, Tensor]) -> LoadResult:
    """Backbone, projection and the heads the file has; every backbone key must be there, any
    key the model does not know (or a bank of another shape) is an error naming it."""
    own = model.state_dict()
    unknown = sorted(k for k in sd if k not in own)
    if unknown:
        raise ValueError(f"weights file {path}: keys the model does not have: {unknown[:10]}")
    missing = sorted(k for k in own if k.startswith("backbone.") and k not in sd)
    if missing:
        raise ValueError(
            f"weights file {path}: backbone keys missing (another architecture than "
            f"model.backbone={model.cfg.backbone}?): {missing[:10]}"
        )
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if v.shape != own[k].shape]  # fmt: skip
    if bad:
        raise ValueError(
            f"weights file {path}: {len(bad)} tensors have the wrong shape (another backbone, "
            f"or a concept bank of another size D or K?): {bad[:5]}"
        )
    bank = sd.pop("concepts", None)
    if bank is not None and not torch.allclose(bank.float(), model.concepts.float(), atol=1e-6):
        logger.warning(
            "weights %s: trained against another concept bank of the same shape; its "
            "projection is loaded, the run's bank (concepts.bank) is kept",
            path,
        )
    model.load_state_dict(sd, strict=False)
    heads = sorted({k.split(".")[0] for k in sd if k.split(".")[0] in _HEADS})
    logger.info("weights %s: loaded the backbone and %s", path, ", ".join(heads))
    return LoadResult(loaded=sorted(sd), missing=[], unexpected=[])


def load_backbone_weights(model: nn.Module, path: str | Path) -> LoadResult:
    """Load a local weights file into ``model.backbone`` (or into ``model`` if it has none).

    A whole-model file for a :class:`ConceptModel` (``backbone.*`` and ``proj.weight`` keys)
    loads into the whole model (:func:`_load_whole_model`): strict for the backbone, and the
    projection and heads it has. Otherwise:
    Accepts a raw state dict or one wrapped as ``{"state_dict"|"model"|"model_state_dict": ...}``;
    ``module.`` / ``backbone.`` prefixes are stripped. Loading is non-strict, but missing and
    unexpected keys are logged, and it raises ``ValueError`` (naming the file) when no key matches
    or a matching key has the wrong shape, so a wrong file never silently yields a random model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    target = model.backbone if isinstance(model, ConceptModel) else model
    raw = _read_state_dict(path)
    whole = _whole_model_state(raw) if isinstance(model, ConceptModel) else None
    if whole is not None:
        return _load_whole_model(model, path, whole)
    sd: dict[str, Tensor] = {}
    for k, v in raw.items():
        sd.setdefault(_strip(k), v)
    own = target.state_dict()
    matched = [k for k in sd if k in own]
    if not matched:
        raise ValueError(
            f"weights file {path}: none of its {len(sd)} keys match the backbone "
            f"({type(target).__name__}, {len(own)} keys); e.g. file has {sorted(sd)[:5]}, "
            f"backbone expects {sorted(own)[:5]}"
        )
    bad = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in matched
        if sd[k].shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"weights file {path}: {len(bad)} tensors have the wrong shape for the backbone "
            f"(wrong architecture?): {bad[:5]}"
        )
    result = target.load_state_dict({k: sd[k] for k in matched}, strict=False)
    missing = list(result.missing_keys)
    unexpected = sorted(k for k in sd if k not in own)
    if missing:
        logger.warning(
            "weights %s: %d backbone keys missing (left as initialised): %s",
            path,
            len(missing),
            missing[:10],
        )
    if unexpected:
        logger.warning(
            "weights %s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected[:10]
        )
    logger.info("weights %s: loaded %d/%d backbone tensors", path, len(matched), len(own))
    return LoadResult(loaded=matched, missing=missing, unexpected=unexpected)


# ----------------------------------------------------------------------------- teacher


class FrozenTeacher(nn.Module):
    """Wraps a ConceptModel as the frozen OCT teacher.

    * All parameters get ``requires_grad=False`` (this mutates the wrapped model) and the module
      stays in eval mode whatever ``.train(mode)`` is called with (BatchNorm statistics never
      move, dropout is off).
    * Level 2 is frozen with the rest, as in the release, which loads the teacher with
      ``strict=False`` so that its W_4 stays at its random initialisation unless the teacher
      stage trained it (``teacher.train_level2``, which trains the ConceptModel itself, not
      through this wrapper).
    * ``dtype``: optional autocast dtype (e.g. ``torch.bfloat16``) for the teacher's forward, on
      the input's device type; ``torch.float32`` disables autocast; ``None`` follows the ambient
      autocast state.

    Outputs are constants for the loss: the frozen part runs under ``torch.no_grad()`` and is
    returned detached.
    """

    def __init__(
        self,
        model: ConceptModel,
        *,
        dtype: torch.dtype | None = None,
        inference_mode: bool = False,
    ):
        super().__init__()
        if not isinstance(model, ConceptModel):
            raise TypeError(f"FrozenTeacher wraps a ConceptModel, got {type(model).__name__}")
        if dtype is not None and dtype not in _TEACHER_DTYPES:
            raise ValueError(f"teacher dtype must be one of {_TEACHER_DTYPES} or None, got {dtype}")
        self.model = model
        self.dtype = dtype
        # inference_mode skips autograd's bookkeeping entirely (faster than no_grad); its
        # outputs are cloned out of it so the loss may save them for backward.
        self.inference_mode = bool(inference_mode)
        for p in model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Always eval: frozen BatchNorm statistics and no dropout, whatever the trainer asks.
        return super().train(False)

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        if self.dtype == torch.float32:
            return torch.autocast(device_type=x.device.type, enabled=False)
        return torch.autocast(device_type=x.device.type, dtype=self.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.inference_mode:
            with torch.inference_mode(), self._autocast(x):
                logits, sims = self.model(x)
            return logits.clone(), sims.clone()
        # no_grad, not inference_mode: tensors made under inference_mode are "inference
        # tensors", which autograd refuses to save for backward, so any loss op that saves a
        # teacher output (e.g. a product with student sims) would raise at forward time.
        with self._autocast(x), torch.no_grad():
            return self.model(x)

    @torch.no_grad()
    def embeddings(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, [v, u] [B, 2, D]) for the fused loss; always constants."""
        if self.inference_mode:
            with torch.inference_mode(), self._autocast(x):
                logits, emb = self.model(x, return_embeddings=True)
            return logits.clone(), emb.clone()
        with self._autocast(x):
            return self.model(x, return_embeddings=True)


# ----------------------------------------------------------------------------- optimiser


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's weights (bf16 under DeepSpeed's bf16 mode): inputs are cast to it.
    Wrappers that keep the model as ``.module`` (the DeepSpeed engine) share its parameters."""
    return next(model.parameters()).dtype


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups, timm style: no decay for biases, 1-D params (norm weights/scales) and names a
    module lists in ``no_weight_decay()``; frozen parameters are left out; empty groups dropped.
    ``lr_scale`` maps a top-level module (``backbone``, ``proj``, ``level2``, ``classifier``) to
    a learning-rate multiplier: its parameters get groups of their own at ``lr * scale`` (the
    schedule scales every group alike). An unknown module name is an error.
    """
    scales = dict(lr_scale or {})
    top = {name.split(".")[0] for name, _ in model.named_parameters()}
    unknown = sorted(set(scales) - top)
    if unknown:
        raise ValueError(
            f"optim.lr_scale: no module {unknown} in the model; choose from {sorted(top)}"
        )
    skip = _no_weight_decay_names(model)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = float(scales.get(name.split(".")[0], 1.0))
        groups.setdefault((scale, decays), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": float(weight_decay) if decays else 0.0,
            **({"lr": lr * scale} if scale != 1.0 and lr is not None else {}),
        }
        for (scale, decays), params in sorted(groups.items(), key=lambda kv: kv[0])
    ]
