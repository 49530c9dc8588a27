"""Real weights in: FLAIR's retinal CLIP and the released OCT-CoDA checkpoints, mapped onto
:class:`~multieye_dist.model.concept_model.ConceptModel` (``multieye-dist import flair|release``).

What the released code (github.com/xmed-lab/MultiEYE) saves, by key (``F`` = 2048, ``D`` = 512,
``K`` = 98 concepts, 9 classes):

* FLAIR (``flair/modeling/model.py``, ``FLAIRModel``; FLAIR's own weights file is this module's
  raw ``state_dict()``):

  - ``vision_model.model.*``: a torchvision ResNet-50 whose ``fc`` is ``Identity`` (so no
    ``fc.*`` keys); timm's ``resnet50`` uses the same names (conv1, bn1, layer1.0.conv1, ...,
    layerN.0.downsample.0/1), BatchNorm buffers included.
  - ``vision_model.projection_head_vision.projection.weight`` ``[D, F]`` (no bias). FLAIR's
    ``ProjectionLayer`` L2-normalises its input, projects, L2-normalises again; the first
    normalisation does not change the direction, so this is ``normalize(W_p h)``: our ``proj``.
  - ``text_model.model.*``: BioClinicalBERT (fine-tuned by FLAIR); with transformers 4.27 (the
    release's pin) it includes the ``embeddings.position_ids`` buffer.
  - ``text_model.projection_head_text.projection.weight`` ``[D, 768]`` (no bias).
  - ``logit_scale`` ``[]``: the contrastive temperature.

  The text embedding (``TextModel.forward``): the BERT's hidden states number 1, 2 and the last
  (``hidden_states[1]``, ``[2]``, ``[-1]``) are averaged over **all** token positions -- padding
  included: the attention mask goes to the BERT but not into this mean -- then over the three
  layers, then projected as above. The tokenizer pads to the longest prompt of the batch
  (``padding=True``, truncation at 77 tokens), so a sentence's embedding depends on the batch; the
  release encodes its whole concept list as one batch (``preprocess_text(raw_concepts)``) and so
  does :func:`encode_flair_bank`.

* OCT-CoDA (``model/flair_distill.py`` ``FLAIRMultiLayer``, the student;
  ``model/flair_single.py`` ``FLAIRConceptClassifier``, the OCT teacher of ``main_single.py``):

  - ``flair_model.*``: the whole FLAIR model above, under this prefix;
  - ``concept_classifier.weight`` ``[9, K]``, ``concept_classifier.bias`` ``[9]``: our
    ``classifier``;
  - student only: ``project_4.weight`` ``[D, F]``, ``project_4.bias`` ``[D]``: the level-2 branch
    ``W_4`` (our ``level2``). The teacher class has no ``project_4``: ``main.py`` builds the
    teacher as a ``FLAIRMultiLayer`` and loads it with ``strict=False``, so its ``W_4`` is random.
  - the concept bank (``embed_concepts``) is a plain attribute computed at construction from the
    FLAIR text encoder, **not** saved: it has to come from a bank file (``--bank``).

  ``utils/eval.py`` ``save_model`` writes ``torch.save({'model': state_dict, 'optimizer': <the
  torch.optim.AdamW object>, 'epoch': int, 'args': <argparse.Namespace>})``, which
  ``torch.load(weights_only=True)`` refuses: :func:`read_checkpoint` then reads it with a
  restricted unpickler that never calls anything outside an allow-list of torch's tensor
  rebuilding functions (everything else becomes an inert :class:`StandIn`).

Every error is a :class:`CheckpointImportError` (a ``ValueError``) naming the file and the key.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import json
import logging
import os
import pickle
import re
import types
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from multieye_dist.data.shards import sha256_file

logger = logging.getLogger(__name__)

INIT_FORMAT = "multieye-dist init/1"

# FLAIR's FLAIRModel, relative to its prefix.
FLAIR_VISION = "vision_model.model."
FLAIR_VISION_PROJ = "vision_model.projection_head_vision.projection.weight"
FLAIR_TEXT = "text_model.model."
FLAIR_TEXT_PROJ = "text_model.projection_head_text.projection.weight"
FLAIR_LOGIT_SCALE = "logit_scale"
# The release's OCT-CoDA classes.
RELEASE_FLAIR = "flair_model."
RELEASE_CLASSIFIER = ("concept_classifier.weight", "concept_classifier.bias")
RELEASE_LEVEL2 = ("project_4.weight", "project_4.bias")
# Where a modified release might keep the concept bank (the official one does not save it).
RELEASE_BANK_KEYS = ("embed_concepts", "concepts")
FLAIR_MAX_TOKENS = 77  # TextModel: tokenizer.model_max_length = 77

_WRAPPERS = ("model", "state_dict", "model_state_dict")
_NOT_USED_TEXT = "not used: text encoder (FLAIR's BERT and text projection)"
_NOT_USED_SCALE = "not used: FLAIR's contrastive temperature"
_NOT_USED_FC = "not used: the backbone's classification head (fc)"


class CheckpointImportError(ValueError):
    """A checkpoint cannot be imported; the message names the file and the key."""


# --------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------


class StandIn:
    """What the restricted reader puts where a pickle names a global outside its allow-list.

    Each such global (``torch.optim.adamw.AdamW``, ``argparse.Namespace``, ``posix.system``,
    ``builtins.exec``, ...) becomes a subclass of this class with ``target`` = its dotted name.
    Constructing, calling or restoring state on it only records what the pickle passed
    (``args``, ``kwargs``, ``state``, ``items``); the original is never imported or called.
    """

    target: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the pickle's args: kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's SETITEMS
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # a list subclass's APPENDS
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> StandIn:  # a stand-in used as a callable
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stand-in for {self.target}>"

    def describe(self) -> str:
        text = f"stand-in for {self.target}"
        if isinstance(self.state, dict) and self.state:
            names = ", ".join(str(k) for k in list(self.state)[:8])
            more = ", ..." if len(self.state) > 8 else ""
            text += f" (state: {names}{more})"
        return text


def _allowed_globals() -> dict[str, Any]:
    """The only globals a restricted load may resolve: what rebuilding tensors, parameters and
    state dicts needs (storages are resolved by torch.load itself, as ``StorageType``)."""
    import torch._tensor
    import torch._utils

    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            allowed[f"torch._utils.{name}"] = fn
    fn = getattr(torch._tensor, "_rebuild_from_type_v2", None)
    if fn is not None:
        allowed["torch._tensor._rebuild_from_type_v2"] = fn
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[f"torch.{name}"] = value
    return allowed


def _restricted_pickle_module(replaced: dict[str, type[StandIn]]) -> types.ModuleType:
    """A module with ``Unpickler``/``load``/``loads`` for ``torch.load(pickle_module=...)``.

    ``Unpickler.find_class`` returns allow-listed objects, or a :class:`StandIn` subclass recorded
    in ``replaced`` for anything else. ``find_class`` is the only way a pickle reaches a global
    (GLOBAL, STACK_GLOBAL, INST, OBJ and the extension-registry opcodes all go through it), so
    nothing else can be called."""
    allowed = _allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # Python 2 names (protocol 2 writes builtins as __builtin__), as pickle maps them.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            dotted = f"{module}.{name}"
            if dotted in allowed:
                return allowed[dotted]
            cls = replaced.get(dotted)
            if cls is None:
                cls = type(f"StandIn[{dotted}]", (StandIn,), {"target": dotted})
                replaced[dotted] = cls
            return cls

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        import io

        return load(io.BytesIO(data), **kwargs)

    module = types.ModuleType("multieye_dist.model.importers.restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.loads = loads  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


class CheckpointDict(dict):
    """The tensors of a checkpoint's state dict (``key -> Tensor``), plus what else was found.

    * ``path``: the file.
    * ``loader``: ``"weights_only"`` (torch.load accepted it) or ``"restricted"`` (the
      restricted unpickler, after torch.load(weights_only=True) refused it).
    * ``wrapper``: the key the state dict was found under (``"model"`` in the release), or None.
    * ``other``: every non-tensor entry, ``dotted key -> description`` (e.g. ``optimizer``:
      ``stand-in for torch.optim.adamw.AdamW``, ``epoch``: ``int: 12``).
    * ``entries``: the other top-level entries themselves (numbers, strings, stand-ins).
    * ``replaced``: the dotted names of the globals that were replaced by stand-ins.
    """

    path: Path
    loader: str
    wrapper: str | None
    other: dict[str, str]
    entries: dict[str, Any]
    replaced: list[str]


def _describe(value: Any) -> str:
    if isinstance(value, StandIn):
        return value.describe()
    if isinstance(value, bool | int | float | str | type(None)):
        text = repr(value)
        return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, Mapping | list | tuple | set):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def read_checkpoint(path: str | os.PathLike) -> CheckpointDict:
    """Read a torch checkpoint without executing anything from it.

    First ``torch.load(weights_only=True)``; if it refuses the file (a pickled optimizer or
    argparse.Namespace, as the release saves), a restricted unpickler (see
    :func:`_restricted_pickle_module`) reads it instead. The state dict is the top-level mapping
    or the mapping under ``model``/``state_dict``/``model_state_dict``; its tensors are returned
    (as a :class:`CheckpointDict`), everything else is described in ``.other``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: checkpoint not found")
    if _is_torchscript(path):
        raise CheckpointImportError(
            f"{path}: a TorchScript archive, not a checkpoint (state dict) -- refused"
        )
    replaced: dict[str, type[StandIn]] = {}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        loader = "weights_only"
    except pickle.UnpicklingError as refused:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(refused))
        logger.info(
            "%s: torch.load(weights_only=True) refused it (%s); reading it with the restricted "
            "unpickler",
            path,
            f"unsupported global {found.group(1)}" if found else str(refused).splitlines()[0],
        )
        module = _restricted_pickle_module(replaced)
        try:
            obj = torch.load(
                str(path), map_location="cpu", weights_only=False, pickle_module=module
            )
        except Exception as e:
            raise CheckpointImportError(
                f"{path}: cannot read it even with the restricted unpickler ({type(e).__name__}: "
                f"{e})"
            ) from e
        loader = "restricted"
    except Exception as e:
        raise CheckpointImportError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from e

    if not isinstance(obj, Mapping):
        raise CheckpointImportError(
            f"{path}: holds a {_describe(obj)}, not a state dict (a mapping of tensors)"
        )
    wrapper = None
    state: Mapping = obj
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            wrapper, state = key, inner
            break
    out = CheckpointDict()
    out.path, out.loader, out.wrapper = path, loader, wrapper
    out.other, out.entries = {}, {}
    prefix = f"{wrapper}." if wrapper else ""
    for k, v in state.items():
        if isinstance(v, Tensor):
            out[str(k)] = v
        else:
            out.other[f"{prefix}{k}"] = _describe(v)
    if wrapper is not None:
        for k, v in obj.items():
            if k != wrapper:
                out.other[str(k)] = _describe(v)
                out.entries[str(k)] = v
    if not out:
        raise CheckpointImportError(
            f"{path}: no tensors found (top-level keys: {sorted(str(k) for k in obj)[:10]})"
        )
    out.replaced = sorted(replaced)
    if out.replaced:
        logger.info("%s: replaced by inert stand-ins: %s", path, ", ".join(out.replaced))
    return out


# --------------------------------------------------------------------------------------------
# The mapping summary
# --------------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import did: ``mapped`` (source key, our key, shape), ``reported`` (reason ->
    source keys: every tensor not mapped), ``other`` (non-tensor entries), ``warnings``,
    ``outputs`` (files written)."""

    source: Path
    kind: str
    loader: str
    mapped: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    reported: dict[str, list[str]] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def report(self, reason: str, key: str) -> None:
        self.reported.setdefault(reason, []).append(key)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, stacklevel=3)

    @property
    def num_reported(self) -> int:
        return sum(len(v) for v in self.reported.values())

    def text(self) -> str:
        lines = [f"{self.kind} checkpoint {self.source} (read: {self.loader})"]
        lines.append(f"  mapped   {len(self.mapped)} tensors")
        groups: dict[tuple[str, str], list[tuple[int, ...]]] = {}
        for src, dst, shape in self.mapped:
            if dst.startswith("backbone."):
                src_head = src[: len(src) - len(dst) + len("backbone.")]
                groups.setdefault((src_head + "*", "backbone.*"), []).append(shape)
            else:
                groups.setdefault((src, dst), []).append(shape)
        for (src, dst), shapes in groups.items():
            what = f"{len(shapes)} tensors" if len(shapes) > 1 else list(shapes[0])
            lines.append(f"           {src} -> {dst}  {what}")
        lines.append(f"  reported {self.num_reported} tensors")
        for reason, keys in self.reported.items():
            example = f" (e.g. {keys[0]})" if len(keys) > 1 else f" ({keys[0]})"
            lines.append(f"           {len(keys):4d} {reason}{example}")
        for key, desc in self.other.items():
            lines.append(f"  other    {key}: {desc}")
        if self.replaced:
            lines.append(f"  inert    stand-ins for: {', '.join(self.replaced)} (never called)")
        for message in self.warnings:
            lines.append(f"  warning  {message}")
        for out in self.outputs:
            lines.append(f"  wrote    {out}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Shared mapping helpers
# --------------------------------------------------------------------------------------------


def _strip_module(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DataParallel/DDP ``module.`` prefix carried by every key."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check_shape(path: Path, key: str, got: Tensor, want: tuple[int, ...], ours: str) -> None:
    if _shape(got) != tuple(want):
        raise CheckpointImportError(
            f"{path}: {key} has shape {list(_shape(got))}, but {ours} needs {list(want)}"
        )


def _name_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _backbone_reference(backbone: str) -> tuple[dict[str, Tensor], int]:
    """Our backbone's state dict (names, shapes, dtypes; meta tensors, no memory) and its
    feature width, for ``backbone`` (a timm name)."""
    import timm

    if not timm.is_model(backbone):
        raise CheckpointImportError(f"unknown timm model name {backbone!r}")
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return model.state_dict(), int(model.num_features)


def _as_ours(t: Tensor, ref: Tensor) -> Tensor:
    """The checkpoint tensor in our dtype (float32 weights; integer buffers stay integer)."""
    return t.detach().to(dtype=ref.dtype).contiguous()


def _map_flair_vision(
    sd: Mapping[str, Tensor],
    prefix: str,
    backbone: str,
    path: Path,
    summary: ImportSummary,
) -> dict[str, Tensor]:
    """``{prefix}vision_model.*`` -> ``backbone.*`` + ``proj.weight``; errors for a missing or
    unexpected vision key and a wrong shape. Returns our tensors."""
    ref, nf = _backbone_reference(backbone)
    out: dict[str, Tensor] = {}
    vision = f"{prefix}vision_model."
    body = f"{prefix}{FLAIR_VISION}"
    proj = f"{prefix}{FLAIR_VISION_PROJ}"
    present = {k for k in sd if k.startswith(vision)}
    fc = {k for k in present if k.startswith(f"{body}fc.")}
    expected = {f"{body}{k}" for k in ref} | {proj}
    missing = expected - present
    if missing:
        raise CheckpointImportError(
            f"{path}: missing {len(missing)} vision key(s) for a {backbone} backbone: "
            f"{_name_keys(missing)}"
        )
    unexpected = present - expected - fc
    if unexpected:
        raise CheckpointImportError(
            f"{path}: unexpected vision key(s), not part of a {backbone} backbone or FLAIR's "
            f"vision projection: {_name_keys(unexpected)}"
        )
    for k, r in ref.items():
        src = f"{body}{k}"
        _check_shape(path, src, sd[src], _shape(r), f"backbone.{k} ({backbone})")
        out[f"backbone.{k}"] = _as_ours(sd[src], r)
        summary.mapped.append((src, f"backbone.{k}", _shape(r)))
    for k in sorted(fc):
        summary.report(_NOT_USED_FC, k)
    w = sd[proj]
    if w.ndim != 2 or w.shape[1] != nf:
        raise CheckpointImportError(
            f"{path}: {proj} has shape {list(_shape(w))}, but proj.weight needs [D, {nf}] "
            f"({backbone} features)"
        )
    out["proj.weight"] = w.detach().float().contiguous()
    summary.mapped.append((proj, "proj.weight", _shape(w)))
    return out


def _flair_prefix(sd: Mapping[str, Tensor], path: Path) -> str:
    for prefix in ("", RELEASE_FLAIR):
        if f"{prefix}{FLAIR_VISION_PROJ}" in sd:
            return prefix
    raise CheckpointImportError(
        f"{path}: no {FLAIR_VISION_PROJ!r} (nor {RELEASE_FLAIR + FLAIR_VISION_PROJ!r}): not a "
        f"FLAIR or MultiEYE checkpoint (its keys begin: {_name_keys(list(sd), 5)})"
    )


def _report_flair_rest(
    sd: Mapping[str, Tensor], prefix: str, path: Path, summary: ImportSummary, text_reason: str
) -> None:
    """Report FLAIR's non-vision tensors under ``prefix``; any other key under it is an error."""
    unknown = []
    for k in sd:
        if not k.startswith(prefix) or k.startswith(f"{prefix}vision_model."):
            continue
        rest = k[len(prefix) :]
        if rest.startswith("text_model."):
            summary.report(text_reason, k)
        elif rest == FLAIR_LOGIT_SCALE:
            summary.report(_NOT_USED_SCALE, k)
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointImportError(
            f"{path}: unexpected key(s) in FLAIR's model: {_name_keys(unknown)}"
        )


# --------------------------------------------------------------------------------------------
# FLAIR
# --------------------------------------------------------------------------------------------


def import_flair(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str = "resnet50",
    text_encoder: str | os.PathLike | None = None,
    bank_out: str | os.PathLike | None = None,
    sentences: str | os.PathLike | None = None,
    prompt: str | None = None,
) -> ImportSummary:
    """FLAIR's vision ResNet-50 and projection -> an init file for our model.

    ``out``: safetensors with ``backbone.<timm key>`` and ``proj.weight`` ``[D, F]`` (metadata:
    format, source, backbone, D). With ``text_encoder`` (a local directory holding FLAIR's
    BERT config and tokenizer, ``save_pretrained``) and ``bank_out``, also encodes the concept
    sentences (default the release's 98, ``configs/multieye_concepts.txt``) the way FLAIR does
    into a concept bank (:func:`encode_flair_bank`); the BERT weights are the checkpoint's
    ``text_model.model.*``. The checkpoint may be FLAIR's own file or a release checkpoint (keys
    under ``flair_model.``; the OCT-CoDA head is then reported, not mapped).
    """
    from multieye_dist.core.atomic import write_bytes

    path, out = Path(ckpt), Path(out)
    if (text_encoder is None) != (bank_out is None):
        raise CheckpointImportError(
            f"{path}: --text-encoder and --bank-out go together (got text encoder "
            f"{text_encoder}, bank out {bank_out})"
        )
    sd0 = read_checkpoint(path)
    sd = _strip_module(sd0)
    summary = ImportSummary(
        source=path, kind="FLAIR", loader=sd0.loader, other=dict(sd0.other), replaced=sd0.replaced
    )
    prefix = _flair_prefix(sd, path)
    ours = _map_flair_vision(sd, prefix, backbone, path, summary)
    text_reason = _NOT_USED_TEXT if text_encoder is None else "used: concept bank (text encoder)"
    _report_flair_rest(sd, prefix, path, summary, text_reason)
    for k in sd:
        if not k.startswith(prefix):
            summary.report("not used: outside FLAIR's model (`import release` maps these)", k)

    d = int(ours["proj.weight"].shape[0])
    meta = {
        "format": INIT_FORMAT,
        "source": "FLAIR",
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        "backbone": backbone,
        "concept_dim": str(d),
        "keys": "backbone.* (timm names), proj.weight",
    }
    bank = None
    if text_encoder is not None:
        bank = encode_flair_bank(
            sd,
            prefix,
            path,
            text_encoder,
            sentences=sentences,
            prompt=prompt,
        )
        if bank[0].shape[1] != d:
            raise CheckpointImportError(
                f"{path}: {prefix}{FLAIR_TEXT_PROJ} projects to D={bank[0].shape[1]} but "
                f"{prefix}{FLAIR_VISION_PROJ} to D={d}"
            )
    _check_complete(sd, summary, path)
    from safetensors.torch import save

    write_bytes(out, save(ours, metadata=meta))
    summary.outputs.append(out)
    if bank is not None:
        from multieye_dist.model.concepts import save_bank

        emb, sents, bank_meta = bank
        save_bank(bank_out, emb, sents, {**bank_meta, "source_sha256": meta["source_sha256"]})
        summary.outputs.append(Path(bank_out))
    return summary


def _check_complete(sd: Mapping[str, Tensor], summary: ImportSummary, path: Path) -> None:
    """Every tensor is mapped or reported exactly once (a bug guard, not a user error)."""
    seen = [s for s, _, _ in summary.mapped] + [k for v in summary.reported.values() for k in v]
    if sorted(seen) != sorted(sd):
        lost = sorted(set(sd) - set(seen))
        raise CheckpointImportError(f"{path}: tensors neither mapped nor reported: {lost[:8]}")


def _flair_text_model(
    sd: Mapping[str, Tensor], prefix: str, path: Path, text_encoder: Path
) -> tuple[Any, Any, Tensor]:
    """(BERT with the checkpoint's weights, tokenizer, text projection [D, H])."""
    from multieye_dist.model.concepts import (
        ConceptBankError,
        _quiet_transformers,
        resolve_encoder_dir,
    )

    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "encoding the FLAIR bank needs transformers: pip install 'multieye-dist[text]'"
        ) from e
    try:
        model_dir = resolve_encoder_dir(text_encoder)
    except ConceptBankError as e:
        raise CheckpointImportError(str(e)) from e
    proj_key = f"{prefix}{FLAIR_TEXT_PROJ}"
    if proj_key not in sd:
        raise CheckpointImportError(f"{path}: no {proj_key} (FLAIR's text projection)")
    body = f"{prefix}{FLAIR_TEXT}"
    weights = {k[len(body) :]: v for k, v in sd.items() if k.startswith(body)}
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:
            raise CheckpointImportError(
                f"{model_dir}: cannot load the tokenizer/config ({e})"
            ) from e
        if weights:
            bert = AutoModel.from_config(config)
        else:
            try:
                bert = AutoModel.from_pretrained(
                    model_dir, local_files_only=True, use_safetensors=True
                )
            except Exception as e:
                raise CheckpointImportError(
                    f"{path}: has no {body}* weights and {model_dir} none loadable ({e})"
                ) from e
    if weights:
        own = bert.state_dict()
        missing = [k for k in own if k not in weights and not k.endswith("position_ids")]
        if missing:
            raise CheckpointImportError(
                f"{path}: the text encoder in {model_dir} needs {body}{{{_name_keys(missing)}}}, "
                "missing from the checkpoint"
            )
        unexpected = [k for k in weights if k not in own and not k.endswith("position_ids")]
        if unexpected:
            raise CheckpointImportError(
                f"{path}: unexpected text encoder key(s) for {model_dir}'s architecture: "
                + ", ".join(f"{body}{k}" for k in sorted(unexpected)[:8])
            )
        for k, v in own.items():
            if k in weights:
                _check_shape(path, f"{body}{k}", weights[k], _shape(v), f"{model_dir} {k}")
        bert.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    proj = sd[proj_key].float()
    hidden = int(bert.config.hidden_size)
    if proj.ndim != 2 or proj.shape[1] != hidden:
        raise CheckpointImportError(
            f"{path}: {proj_key} has shape {list(_shape(proj))}, but the text encoder's hidden "
            f"size is {hidden} (needs [D, {hidden}])"
        )
    return bert.float().eval(), tokenizer, proj


def flair_text_embed(bert: Any, tokenizer: Any, proj: Tensor, texts: Sequence[str]) -> Tensor:
    """FLAIR's ``TextModel`` on ``texts`` as one batch: [N, D], rows L2-normalised.

    hidden states 1, 2 and last, averaged over every token position (padding included, as
    FLAIR's ``.mean(2)`` does) and then over the three layers; normalise, project, normalise.
    """
    tokens = tokenizer(
        list(texts),
        truncation=True,
        padding=True,
        max_length=FLAIR_MAX_TOKENS,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = bert(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            output_hidden_states=True,
        )
        hs = out.hidden_states
        layers = torch.stack([hs[1], hs[2], hs[-1]])  # [3, N, T, H]
        emb = layers.permute(1, 0, 2, 3).mean(2).mean(1)  # [N, H]
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb @ proj.t()
        emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb.float().contiguous()


def encode_flair_bank(
    sd: Mapping[str, Tensor],
    prefix: str,
    path: Path,
    text_encoder: str | os.PathLike,
    *,
    sentences: str | os.PathLike | None = None,
    prompt: str | None = None,
) -> tuple[Tensor, list[str], dict[str, str]]:
    """The concept bank as FLAIR computes it: ``(C [K, D], sentences, metadata)``.

    All sentences go through as one batch (the release's ``preprocess_text(raw_concepts)``):
    the padding length, which FLAIR's token mean includes, is then the release's.
    """
    from multieye_dist.model.concepts import (
        DEFAULT_PROMPT,
        DEFAULT_SENTENCES,
        _check_prompt,
        load_sentences,
        sentences_sha256,
    )

    prompt = DEFAULT_PROMPT if prompt is None else prompt
    _check_prompt(prompt)
    sents = load_sentences(DEFAULT_SENTENCES if sentences is None else sentences)
    bert, tokenizer, proj = _flair_text_model(sd, prefix, path, Path(text_encoder))
    emb = flair_text_embed(bert, tokenizer, proj, [prompt.format(s) for s in sents])
    if not torch.isfinite(emb).all():
        raise CheckpointImportError(f"{path}: the FLAIR text encoder gave non-finite embeddings")
    meta = {
        "encoder": f"FLAIR text encoder ({path.name}, {Path(text_encoder).name})",
        "prompt": prompt,
        "pooling": "flair: hidden states 1, 2, last; mean over all tokens; projection",
        "normalized": "l2",
        "max_length": str(FLAIR_MAX_TOKENS),
        "sentences_sha256": sentences_sha256(sents),
        "source": "FLAIR",
        "source_file": path.name,
    }
    return emb, sents, meta


# --------------------------------------------------------------------------------------------
# The released OCT-CoDA checkpoints
# --------------------------------------------------------------------------------------------


def _release_bank(
    sd: Mapping[str, Tensor], path: Path, bank: str | os.PathLike | None
) -> tuple[Tensor, list[str], str | None, str]:
    """(C, sentences, key in the checkpoint or None, where from)."""
    from multieye_dist.model.concepts import load_bank

    stored_key = next((k for k in RELEASE_BANK_KEYS if k in sd), None)
    file_bank = load_bank(bank) if bank is not None else None
    if stored_key is None:
        if file_bank is None:
            raise CheckpointImportError(
                f"{path}: the checkpoint holds no concept bank (the release does not save "
                f"embed_concepts); pass --bank FILE (e.g. from `multieye-dist import flair "
                f"FLAIR.pth --out init.safetensors --text-encoder DIR --bank-out FILE`)"
            )
        return file_bank[0], file_bank[1], None, f"bank file {bank}"
    stored = sd[stored_key].detach().float()
    if stored.ndim != 2:
        raise CheckpointImportError(
            f"{path}: {stored_key} has shape {list(_shape(stored))}, expected [K, D]"
        )
    if file_bank is not None:
        c, sents = file_bank[0], file_bank[1]
        if c.shape != stored.shape or not torch.allclose(c, stored, atol=1e-5):
            raise CheckpointImportError(
                f"{path}: its {stored_key} {list(_shape(stored))} differs from the bank file "
                f"{bank} {list(_shape(c))}"
            )
        return stored, sents, stored_key, f"checkpoint {stored_key} (sentences from {bank})"
    from multieye_dist.model.concepts import DEFAULT_SENTENCES, load_sentences

    sents = [f"concept {i}" for i in range(stored.shape[0])]
    with contextlib.suppress(ValueError):
        listed = load_sentences(DEFAULT_SENTENCES)
        if len(listed) == stored.shape[0]:
            sents = listed
    return stored, sents, stored_key, f"checkpoint {stored_key}"


def _namespace_values(entry: Any) -> dict[str, Any]:
    """JSON-safe scalars of the release's pickled argparse.Namespace (a stand-in's state)."""
    state = entry.state if isinstance(entry, StandIn) else None
    if not isinstance(state, dict):
        return {}
    return {
        str(k): v for k, v in state.items() if isinstance(v, bool | int | float | str | type(None))
    }


def _read_release(path: Path, role: str) -> tuple[CheckpointDict, dict[str, Tensor], ImportSummary]:
    """(the checkpoint as read, its state dict without a ``module.`` prefix, a new summary);
    an error unless it holds ``flair_model.``'s vision projection (a release checkpoint)."""
    sd0 = read_checkpoint(path)
    sd = _strip_module(sd0)
    summary = ImportSummary(
        source=path,
        kind=f"OCT-CoDA {role}",
        loader=sd0.loader,
        other=dict(sd0.other),
        replaced=sd0.replaced,
    )
    if f"{RELEASE_FLAIR}{FLAIR_VISION_PROJ}" not in sd:
        hint = " (FLAIR's own file: use `import flair`)" if FLAIR_VISION_PROJ in sd else ""
        raise CheckpointImportError(
            f"{path}: no {RELEASE_FLAIR + FLAIR_VISION_PROJ!r}: not a released OCT-CoDA "
            f"checkpoint{hint}"
        )
    return sd0, sd, summary


def _check_release_keys(sd: Mapping[str, Tensor], path: Path, role: str) -> bool:
    """The head's keys (those outside ``flair_model.``): errors for an unexpected key, a
    missing classifier key, and a missing level-2 key in a student or in a teacher that has
    some. Returns whether the level-2 branch (``project_4.*``) is to be mapped from the
    checkpoint (a student, or a teacher that has it)."""
    head = {k for k in sd if not k.startswith(RELEASE_FLAIR)}
    known = set(RELEASE_CLASSIFIER) | set(RELEASE_LEVEL2) | set(RELEASE_BANK_KEYS)
    unexpected = head - known
    if unexpected:
        raise CheckpointImportError(
            f"{path}: unexpected key(s) for an OCT-CoDA {role}: {_name_keys(unexpected)}"
        )
    for key in RELEASE_CLASSIFIER:
        if key not in sd:
            raise CheckpointImportError(f"{path}: missing {key} (the concept classifier)")
    level2_present = [k for k in RELEASE_LEVEL2 if k in sd]
    map_level2 = role == "student" or bool(level2_present)
    if map_level2:
        for key in RELEASE_LEVEL2:
            if key not in sd:
                raise CheckpointImportError(f"{path}: missing {key} (the level-2 branch W_4)")
    return map_level2


def _check_release_dims(
    sd: Mapping[str, Tensor], path: Path, c: Tensor, bank_from: str, d_proj: int
) -> None:
    """``concept_classifier.weight`` is ``[NUM_CLASSES, K]`` with K the concept bank's, and
    FLAIR's vision projection (to ``d_proj``) matches the bank's D."""
    from multieye_dist.data.classes import NUM_CLASSES

    k, d = int(c.shape[0]), int(c.shape[1])
    w_c = sd[RELEASE_CLASSIFIER[0]]
    if w_c.ndim != 2:
        raise CheckpointImportError(
            f"{path}: {RELEASE_CLASSIFIER[0]} has shape {list(_shape(w_c))}, expected [9, K]"
        )
    if w_c.shape[1] != k:
        raise CheckpointImportError(
            f"{path}: {RELEASE_CLASSIFIER[0]} reads K={w_c.shape[1]} concepts but the concept "
            f"bank ({bank_from}) has K={k}"
        )
    if w_c.shape[0] != NUM_CLASSES:
        raise CheckpointImportError(
            f"{path}: {RELEASE_CLASSIFIER[0]} has {w_c.shape[0]} classes, expected {NUM_CLASSES}"
        )
    if d_proj != d:
        raise CheckpointImportError(
            f"{path}: {RELEASE_FLAIR + FLAIR_VISION_PROJ} projects to D={d_proj} but the concept "
            f"bank ({bank_from}) has D={d}"
        )


def _map_release_head(
    sd: Mapping[str, Tensor],
    path: Path,
    summary: ImportSummary,
    ours: dict[str, Tensor],
    level2_shape: tuple[int, int] | None,
) -> None:
    """``concept_classifier.*`` -> ``classifier.*`` and, unless ``level2_shape`` (``(D, F)``)
    is None, ``project_4.*`` -> ``level2.*``, shapes checked; adds them to ``ours``."""
    from multieye_dist.data.classes import NUM_CLASSES

    _check_shape(path, RELEASE_CLASSIFIER[1], sd[RELEASE_CLASSIFIER[1]], (NUM_CLASSES,), "bias")
    ours["classifier.weight"] = sd[RELEASE_CLASSIFIER[0]].detach().float()
    ours["classifier.bias"] = sd[RELEASE_CLASSIFIER[1]].detach().float()
    for src, dst in zip(RELEASE_CLASSIFIER, ("classifier.weight", "classifier.bias"), strict=True):
        summary.mapped.append((src, dst, _shape(sd[src])))
    if level2_shape is None:
        return
    d, nf = level2_shape
    _check_shape(path, RELEASE_LEVEL2[0], sd[RELEASE_LEVEL2[0]], (d, nf), "level2.weight")
    _check_shape(path, RELEASE_LEVEL2[1], sd[RELEASE_LEVEL2[1]], (d,), "level2.bias")
    for src, dst in zip(RELEASE_LEVEL2, ("level2.weight", "level2.bias"), strict=True):
        ours[dst] = sd[src].detach().float()
        summary.mapped.append((src, dst, _shape(sd[src])))


def _release_extra(
    path: Path,
    sd0: CheckpointDict,
    role: str,
    bank_from: str,
    level2: str,
    args: dict[str, Any],
) -> dict[str, Any]:
    """The export's ``extra`` metadata: where the weights, the bank and ``level2`` came from,
    the release's epoch and ``args``."""
    extra = {
        "modality": "oct" if role == "teacher" else "fundus",
        "source": "xmed-lab/MultiEYE release",
        "role": role,
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        "concept_bank": bank_from,
        "level2": level2,
        "release_epoch": sd0.entries.get("epoch")
        if isinstance(sd0.entries.get("epoch"), int)
        else None,
        "release_args": args,
    }
    json.dumps(extra)  # everything above is JSON-safe by construction
    return extra


def import_release(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    role: str = "student",
    bank: str | os.PathLike | None = None,
    image_size: int = 512,
    backbone: str = "resnet50",
    seed: int = 0,
) -> ImportSummary:
    """A released OCT-CoDA checkpoint (teacher or student) -> our inference export.

    ``out`` is :func:`~multieye_dist.model.checkpoint.export_inference`'s format, so
    ``multieye-dist eval --checkpoint OUT`` and ``teacher.checkpoint=OUT`` take it. The concept
    bank comes from the checkpoint if it stores one (``embed_concepts``/``concepts``), else from
    ``bank`` (a bank file); K must equal the classifier's input width. A teacher checkpoint
    without ``project_4.*`` (the release's) keeps our random ``level2`` init (seeded by
    ``seed``), with a warning naming the keys.
    """
    from multieye_dist.data.classes import NUM_CLASSES
    from multieye_dist.model.checkpoint import export_inference
    from multieye_dist.model.concept_model import ConceptModel, ModelConfig

    if role not in ("student", "teacher"):
        raise CheckpointImportError(f"role must be 'student' or 'teacher', got {role!r}")
    path, out = Path(ckpt), Path(out)
    sd0, sd, summary = _read_release(path, role)
    ours = _map_flair_vision(sd, RELEASE_FLAIR, backbone, path, summary)
    _report_flair_rest(sd, RELEASE_FLAIR, path, summary, _NOT_USED_TEXT + "; bank from --bank")
    map_level2 = _check_release_keys(sd, path, role)

    c, sents, bank_key, bank_from = _release_bank(sd, path, bank)
    if bank_key is not None:
        summary.report("used: the concept bank", bank_key)
    _check_release_dims(sd, path, c, bank_from, int(ours["proj.weight"].shape[0]))

    cfg = ModelConfig(backbone=backbone, weights=None, num_classes=NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConceptModel(cfg, c, load_weights=False)
    own = model.state_dict()
    level2_shape = (int(c.shape[1]), model.num_features) if map_level2 else None
    _map_release_head(sd, path, summary, ours, level2_shape)
    # summary.warn attributes its warning to this function's caller: warn here, not in a helper.
    if map_level2:
        level2 = "from the checkpoint (project_4)"
    else:
        level2 = f"random init (seed {seed}): project_4.weight, project_4.bias absent"
        summary.warn(
            f"{path}: no project_4.weight, project_4.bias (the level-2 W_4) in this teacher "
            f"checkpoint, as in the release (which loads its teacher with strict=False): "
            f"level2.weight, level2.bias keep a random init (seed {seed})"
        )
    ours["concepts"] = own["concepts"]
    lost = sorted(set(own) - set(ours) - {"level2.weight", "level2.bias"})
    if lost:  # _map_flair_vision covered the backbone: a bug guard
        raise CheckpointImportError(f"{path}: nothing maps onto {lost[:8]}")
    model.load_state_dict({**own, **ours}, strict=True)

    args = _namespace_values(sd0.entries.get("args"))
    if "input_size" in args and args["input_size"] != image_size:
        summary.warn(
            f"{path}: the release trained at input_size={args['input_size']} but the export "
            f"records image_size={image_size} (--image-size)"
        )
    extra = _release_extra(path, sd0, role, bank_from, level2, args)
    _check_complete(sd, summary, path)
    export_inference(
        out, model, cfg, concept_sentences=list(sents), image_size=image_size, extra=extra
    )
    summary.outputs.append(out)
    return summary
