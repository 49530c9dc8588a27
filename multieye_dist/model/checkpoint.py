"""Inference checkpoints: one safetensors file with the weights, the concept bank (a buffer of the
model) and, in its metadata, everything needed to rebuild the model without DeepSpeed."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from multieye_dist.core.atomic import write_bytes
from multieye_dist.data.classes import DEFAULT_CLASS_NAMES
from multieye_dist.model.concept_model import ConceptModel, ModelConfig

logger = logging.getLogger(__name__)

FORMAT = "multieye-dist inference/1"


def export_inference(
    path: Path,
    model: ConceptModel,
    cfg: ModelConfig,
    *,
    concept_sentences: list[str],
    image_size: int,
    extra: dict | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
) -> None:
    """Write atomically (:mod:`multieye_dist.core.atomic`): a reader never sees half a checkpoint.
    `class_names`: the training data's (its manifest's), one per classifier output; None:
    MultiEYE's 9."""
    from safetensors.torch import save

    path = Path(path)
    names = list(DEFAULT_CLASS_NAMES if class_names is None else class_names)
    if len(names) != cfg.num_classes:
        raise ValueError(
            f"{path}: {len(names)} class names for a model of {cfg.num_classes} classes ({names})"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model_config": json.dumps(asdict(cfg)),
        "concept_sentences": json.dumps(concept_sentences),
        "class_names": json.dumps(names),
        "image_size": str(image_size),
        "extra": json.dumps(extra or {}),
    }
    # To bytes, then one atomic write: safetensors' save_file makes its own mkstemp file (mode
    # 0600). The copy costs one model's size of host memory, once, at export.
    write_bytes(path, save(state, metadata=meta))


def load_inference(path: Path) -> tuple[ConceptModel, dict]:
    """Rebuild the model (eval mode, CPU) and return it with the decoded metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not an inference .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Unreadable (permission, I/O error): the OS error itself, not "not a safetensors file".
    with path.open("rb") as fh:
        fh.read(1)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a safetensors checkpoint ({exc})") from exc
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "image_size")}
    meta["image_size"] = int(raw["image_size"])
    cfg = ModelConfig(**{**meta["model_config"], "weights": None})
    concepts = state.get("concepts")
    if concepts is None:
        raise ValueError(f"{path}: no 'concepts' tensor (the concept bank) in the checkpoint")
    model = ConceptModel(cfg, concepts, load_weights=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta
