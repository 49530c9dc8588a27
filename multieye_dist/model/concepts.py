"""The concept bank: fixed text embeddings of the K concept sentences (docs/method.md, "The model").

``C`` is a ``[K, D]`` float32 tensor of L2-normalised text embeddings, one row per concept
sentence, each sentence wrapped in a prompt ("A fundus photograph of {}" in the release). The
model only reads ``C`` (``s = v C^T``); it is never trained.

Three pieces:

* :func:`load_sentences` reads the sentence list (one per line; the release's is package data,
  ``configs/multieye_concepts.txt``).
* :func:`encode` runs a Hugging Face text encoder from a **local** directory (``transformers`` is an
  optional extra, imported lazily; nothing is ever downloaded: ``local_files_only=True``).
* :func:`save_bank` / :func:`load_bank` store the bank as a safetensors file (tensor key
  ``"concepts"``; sentences, prompt, encoder, pooling, D and K in its string metadata). No pickle.

:func:`run_encode` / :func:`encode_main` are the ``multieye-dist concepts encode`` command.

Duplicates: the release list (:data:`DEFAULT_SENTENCES`) repeats two sentences (lines 16 =
86 and 33 = 58), and its K = 98 counts them: release checkpoints have 98 concept columns. So a
duplicate is an error by default, except for that exact list (recognised by content), which is
kept as released with a warning; ``allow_duplicates=True`` keeps them for any list and
``allow_duplicates=False`` refuses them even there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multieye_dist.core.atomic import write_bytes
from multieye_dist.core.resources import packaged

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI builds its parser without it
    import torch

logger = logging.getLogger(__name__)

BANK_KEY = "concepts"
BANK_FORMAT = "multieye-concepts/1"
DEFAULT_PROMPT = "A fundus photograph of {}"
# The release list, shipped as package data (found wherever the package is installed).
DEFAULT_SENTENCES = packaged("configs/multieye_concepts.txt")
POOLINGS: tuple[str, ...] = ("auto", "mean", "cls")
# sha256 of the release list's sentences joined by "\n" (see module docstring on duplicates).
RELEASE_SENTENCES_SHA256 = "37092de7c777d289975cf48f6dea4ff39aea3b54cc03c2fe490c50466301499b"
# Metadata keys written by save_bank itself; a caller's meta may not set them.
_RESERVED = frozenset({"format", "sentences", "num_concepts", "dim"})


class ConceptBankError(ValueError):
    """A concept sentence list or bank file is unusable; the message names the file."""


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------


def sentences_sha256(sentences: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()


def load_sentences(path: str | os.PathLike, *, allow_duplicates: bool | None = None) -> list[str]:
    """Concept sentences, one per line; surrounding whitespace stripped, blank lines ignored.

    Errors (:class:`ConceptBankError`, naming the file): missing file, no sentence, a duplicated
    sentence (naming both line numbers). ``allow_duplicates``: ``None`` (default) = an error except
    for the release list, whose two duplicates are kept with a warning (see module docstring);
    ``True`` = keep them for any list (with a warning); ``False`` = always an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptBankError(f"{path}: concept sentence file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConceptBankError(f"{path}: not UTF-8 text ({e})") from e
    sentences: list[str] = []
    first_line: dict[str, int] = {}
    duplicates: list[tuple[int, int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s:
            continue
        if s in first_line:
            duplicates.append((first_line[s], lineno, s))
        else:
            first_line[s] = lineno
        sentences.append(s)
    if not sentences:
        raise ConceptBankError(f"{path}: no concept sentences (empty or only blank lines)")
    if duplicates:
        where = "; ".join(f"line {b} repeats line {a} ({s!r})" for a, b, s in duplicates)
        allow = allow_duplicates
        if allow is None:
            allow = sentences_sha256(sentences) == RELEASE_SENTENCES_SHA256
        if not allow:
            raise ConceptBankError(
                f"{path}: duplicated concept sentence: {where} "
                "(pass allow_duplicates=True / --allow-duplicates to keep them)"
            )
        warnings.warn(f"{path}: keeping duplicated concept sentences: {where}", stacklevel=2)
    return sentences


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def resolve_encoder_dir(text_encoder_dir: str | os.PathLike) -> Path:
    """The directory holding the transformer's ``config.json``.

    Accepts a plain ``save_pretrained`` directory or a sentence-transformers layout whose
    ``modules.json`` names a ``Transformer`` module at the root (``"path": ""``) or in a subfolder.
    """
    root = Path(text_encoder_dir)
    if not root.is_dir():
        raise ConceptBankError(f"{root}: text encoder directory not found")
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConceptBankError(f"{modules}: not valid JSON ({e})") from e
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
                sub = root / str(entry.get("path", ""))
                if (sub / "config.json").is_file():
                    return sub
                raise ConceptBankError(f"{modules}: Transformer module at {sub} has no config.json")
    if (root / "config.json").is_file():
        return root
    raise ConceptBankError(
        f"{root}: no config.json (expected a transformers save_pretrained directory or a "
        "sentence-transformers directory with modules.json)"
    )


def _sentence_transformers_config(root: Path, model_dir: Path) -> tuple[str | None, int | None]:
    """(pooling, max_seq_length) from a sentence-transformers layout, when present."""
    pooling = None
    max_len = None
    for cfg in sorted(root.glob("*_Pooling/config.json")):
        try:
            pc = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if pc.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif pc.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        break
    for d in (model_dir, root):
        sb = d / "sentence_bert_config.json"
        if sb.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, ValueError):
                v = json.loads(sb.read_text(encoding="utf-8")).get("max_seq_length")
                max_len = int(v) if v else None
            break
    return pooling, max_len


def _check_prompt(prompt: str) -> None:
    if prompt.count("{}") != 1:
        raise ConceptBankError(
            f"prompt {prompt!r} must contain exactly one '{{}}' where the concept goes"
        )


def _pool(last_hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return last_hidden[:, 0]
    m = mask.to(last_hidden.dtype).unsqueeze(-1)
    return (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the weight-loading progress bar and info logs, restoring the previous state."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def encode(
    sentences: Sequence[str],
    text_encoder_dir: str | os.PathLike,
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 32,
    pooling: str = "auto",
    device: str | torch.device = "cpu",
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, str]]:
    """Encode ``prompt.format(s)`` for every sentence: ``[K, D]`` float32, rows L2-normalised.

    ``text_encoder_dir``: a local transformers directory (``save_pretrained``: config.json,
    tokenizer files, ``*.safetensors`` weights) or a sentence-transformers directory. Loaded with
    ``local_files_only=True`` and ``use_safetensors=True`` (no pickle, no download).

    ``pooling``: ``"mean"`` (average of the last hidden states over the attention mask, as
    sentence-transformers does), ``"cls"`` (the first token's last hidden state) or ``"auto"``
    (the sentence-transformers Pooling config when the directory has one, else ``"mean"``).
    Inputs longer than the model's limit are truncated.

    With ``return_info=True`` also returns ``{"pooling": ..., "max_length": ...}`` as resolved.
    """
    import torch

    if pooling not in POOLINGS:
        raise ConceptBankError(f"pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
    _check_prompt(prompt)
    if not sentences:
        raise ConceptBankError("no sentences to encode")
    if batch_size < 1:
        raise ConceptBankError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(text_encoder_dir)
    model_dir = resolve_encoder_dir(root)
    if not any(model_dir.glob("*.safetensors")):
        raise ConceptBankError(
            f"{model_dir}: no *.safetensors weights (re-save the model with "
            "model.save_pretrained(dir), which writes model.safetensors)"
        )
    st_pooling, st_max_len = _sentence_transformers_config(root, model_dir)
    resolved = pooling if pooling != "auto" else (st_pooling or "mean")

    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "encoding concepts needs transformers: pip install 'multieye-dist[text]'"
        ) from e

    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:
            raise ConceptBankError(f"{model_dir}: cannot load the tokenizer ({e})") from e
        try:
            model = AutoModel.from_pretrained(
                model_dir, local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
        except Exception as e:
            raise ConceptBankError(f"{model_dir}: cannot load the model ({e})") from e
    model = model.to(device=device, dtype=torch.float32).eval()

    limits = [getattr(model.config, "max_position_embeddings", None), st_max_len]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max is not None and tok_max < 1_000_000:
        limits.append(tok_max)
    max_length = min(int(x) for x in limits if x) if any(limits) else 512

    texts = [prompt.format(s) for s in sentences]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()
            out.append(_pool(hidden, batch["attention_mask"], resolved).cpu())
    emb = torch.nn.functional.normalize(torch.cat(out), dim=-1).contiguous()
    if not torch.isfinite(emb).all():
        raise ConceptBankError(f"{model_dir}: the encoder produced non-finite embeddings")
    if return_info:
        return emb, {"pooling": resolved, "max_length": str(max_length)}
    return emb


# --------------------------------------------------------------------------------------------
# Bank file
# --------------------------------------------------------------------------------------------


def save_bank(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    sentences: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the bank atomically (:mod:`multieye_dist.core.atomic`).

    ``meta``: extra string metadata (e.g. ``prompt``, ``encoder``, ``pooling``); non-string values
    are JSON-encoded. ``format``, ``sentences`` (JSON list), ``num_concepts`` and ``dim`` are
    written by this function.
    """
    import torch
    from safetensors.torch import save

    path = Path(path)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ConceptBankError(f"{path}: embeddings must be a 2-D tensor [K, D]")
    sentences = [str(s) for s in sentences]
    if embeddings.shape[0] != len(sentences):
        raise ConceptBankError(
            f"{path}: {embeddings.shape[0]} embedding rows but {len(sentences)} sentences"
        )
    if not embeddings.is_floating_point() or not torch.isfinite(embeddings).all():
        raise ConceptBankError(f"{path}: embeddings must be finite floating point values")
    meta = dict(meta or {})
    clash = _RESERVED.intersection(meta)
    if clash:
        raise ConceptBankError(f"{path}: metadata keys {sorted(clash)} are set by save_bank")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    metadata.update(
        format=BANK_FORMAT,
        sentences=json.dumps(sentences, ensure_ascii=False),
        num_concepts=str(embeddings.shape[0]),
        dim=str(embeddings.shape[1]),
    )
    tensor = embeddings.detach().to("cpu", torch.float32).contiguous()

    # Bytes (the bank is small), not save_file: that makes its own mkstemp file (mode 0600).
    return write_bytes(path, save({BANK_KEY: tensor}, metadata=metadata))


def load_bank(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """``(C [K, D] float32, sentences, meta)``; ``meta`` is the file's metadata minus sentences.

    Validates: a readable safetensors file, the ``"concepts"`` key, 2-D floating point finite
    values, a JSON sentence list of K strings, ``dim``/``num_concepts`` consistent.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptBankError(f"{path}: concept bank file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            if BANK_KEY not in keys:
                raise ConceptBankError(
                    f"{path}: no {BANK_KEY!r} tensor in this safetensors file (keys: {keys})"
                )
            tensor = f.get_tensor(BANK_KEY)
    except ConceptBankError:
        raise
    except Exception as e:
        raise ConceptBankError(f"{path}: not a readable safetensors file ({e})") from e
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ConceptBankError(
            f"{path}: {BANK_KEY!r} must be a 2-D float tensor, got {tuple(tensor.shape)} "
            f"{tensor.dtype}"
        )
    if "sentences" not in metadata:
        raise ConceptBankError(f"{path}: metadata has no 'sentences' list")
    try:
        sentences = json.loads(metadata.pop("sentences"))
    except json.JSONDecodeError as e:
        raise ConceptBankError(f"{path}: metadata 'sentences' is not JSON ({e})") from e
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ConceptBankError(f"{path}: metadata 'sentences' must be a JSON list of strings")
    k, d = tensor.shape
    if k != len(sentences):
        raise ConceptBankError(f"{path}: {k} embedding rows but {len(sentences)} sentences")
    for key, want in (("num_concepts", k), ("dim", d)):
        if key in metadata and metadata[key] != str(want):
            raise ConceptBankError(f"{path}: metadata {key}={metadata[key]} but tensor has {want}")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ConceptBankError(f"{path}: concept embeddings contain non-finite values")
    return tensor, sentences, metadata


def concept_findings(
    meta: dict[str, str], k: int, num_findings: int | None = None, where: str = "concept bank"
) -> list[int] | None:
    """The finding each of the bank's K rows describes (indices into the data's findings), or
    None when not known. A bank's ``concept_findings`` metadata (a JSON list of K ints: the
    paraphrase bank, several rows per finding) says it; without it, row k is finding k when
    the bank has exactly one row per finding (``num_findings == k``: the 8-caption bank)."""
    raw = meta.get("concept_findings")
    if raw is None:
        return list(range(k)) if num_findings == k else None
    try:
        rows = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise ConceptBankError(f"{where}: metadata 'concept_findings' is not JSON ({e})") from e
    ok = isinstance(rows, list) and len(rows) == k
    ok = ok and all(type(f) is int and f >= 0 for f in rows)
    if not ok:
        raise ConceptBankError(
            f"{where}: metadata 'concept_findings' must be a list of {k} non-negative ints (one "
            "finding index per row)"
        )
    if num_findings is not None and max(rows) >= num_findings:
        raise ConceptBankError(
            f"{where}: 'concept_findings' names finding {max(rows)}, but the data has "
            f"{num_findings} findings"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Bank statistics
# --------------------------------------------------------------------------------------------


def bank_stats(C) -> dict[str, float | int]:
    """How spread out a bank ``C`` [K, D] (tensor or array) is.

    ``mean_cosine``: mean cosine similarity over the K(K-1) ordered pairs of distinct rows (rows
    normalised first). ``participation_ratio``: ``(sum l)^2 / sum l^2`` over the eigenvalues l of
    the Gram matrix ``C C^T`` (as given, not re-normalised): 1 when every row points the same way,
    K when the rows are orthogonal and of equal norm; the effective number of directions the
    concept similarities ``s = v C^T`` can vary in. ``K``, ``D``: the shape.
    """
    import numpy as np

    c = np.asarray(C.detach().cpu() if hasattr(C, "detach") else C, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ConceptBankError(f"bank_stats: expected a [K, D] matrix, got shape {c.shape}")
    k, d = c.shape
    gram = c @ c.T
    unit = c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)
    cos = unit @ unit.T
    mean_cos = float((cos.sum() - np.trace(cos)) / (k * (k - 1))) if k > 1 else float("nan")
    # Eigenvalues of a symmetric PSD matrix: sum l = trace, sum l^2 = squared Frobenius norm.
    pr = float(np.trace(gram) ** 2 / (gram**2).sum())
    return {"K": k, "D": d, "mean_cosine": mean_cos, "participation_ratio": pr}


def stats_main(args: argparse.Namespace) -> int:
    """``multieye-dist concepts stats BANK``."""
    C, sentences, meta = load_bank(args.bank)
    st = bank_stats(C)
    print(
        f"{args.bank}: K {st['K']}, D {st['D']}, mean off-diagonal cosine "
        f"{st['mean_cosine']:.3f}, participation ratio {st['participation_ratio']:.2f} "
        f"(encoder {meta.get('encoder', '?')})"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Command line: multieye-dist concepts encode
# --------------------------------------------------------------------------------------------


def _weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run_encode(
    text_encoder: str | os.PathLike,
    out: str | os.PathLike,
    sentences_path: str | os.PathLike = DEFAULT_SENTENCES,
    prompt: str = DEFAULT_PROMPT,
    pooling: str = "auto",
    *,
    encoder_name: str | None = None,
    allow_duplicates: bool | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    extra_meta: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Read sentences, encode them, save the bank to ``out`` and print a one-line summary.

    ``encoder_name`` (recorded in the metadata) defaults to the encoder directory's name.
    ``extra_meta``: more metadata keys (non-strings JSON-encoded), none of those written here.
    Returns what :func:`load_bank` would return.
    """
    model_dir = resolve_encoder_dir(text_encoder)  # fail fast, before reading sentences
    _check_prompt(prompt)
    sentences = load_sentences(sentences_path, allow_duplicates=allow_duplicates)
    emb, info = encode(
        sentences,
        text_encoder,
        prompt=prompt,
        batch_size=batch_size,
        pooling=pooling,
        device=device,
        return_info=True,
    )
    import torch
    import transformers  # present: encode() needed it

    name = encoder_name or Path(text_encoder).resolve().name
    meta = {
        "encoder": name,
        "prompt": prompt,
        "pooling": info["pooling"],
        "normalized": "l2",
        "max_length": info["max_length"],
        "encoder_weights_sha256": _weights_sha256(model_dir),
        "sentences_sha256": sentences_sha256(sentences),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    clash = set(meta).intersection(extra_meta or {})
    if clash:
        raise ConceptBankError(f"{out}: extra metadata keys {sorted(clash)} are set by run_encode")
    for key, value in (extra_meta or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_bank(out, emb, sentences, meta)
    k, d = emb.shape
    print(f"concept bank {k} x {d} (encoder {name}, pooling {info['pooling']}) -> {out}")
    return emb, sentences, {**meta, "format": BANK_FORMAT, "num_concepts": str(k), "dim": str(d)}


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``concepts encode`` (for the CLI to put on its sub-parser)."""
    p.add_argument("--text-encoder", type=Path, required=True, help="local text encoder directory")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES, help="one per line")
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="must contain {} (default: %(default)r)"
    )
    p.add_argument("--pooling", choices=POOLINGS, default="auto")
    p.add_argument("--encoder-name", default=None, help="name recorded in the file's metadata")
    p.add_argument(
        "--allow-duplicates",
        action="store_true",
        default=None,
        help="keep duplicated sentences (the release list's two are always kept)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")


def run_from_args(args: argparse.Namespace) -> int:
    run_encode(
        args.text_encoder,
        args.out,
        args.sentences,
        args.prompt,
        args.pooling,
        encoder_name=args.encoder_name,
        allow_duplicates=args.allow_duplicates,
        batch_size=args.batch_size,
        device=args.device,
    )
    return 0


def encode_main(argv: Sequence[str] | None = None) -> int:
    """``multieye-dist concepts encode ...`` as a standalone entry point."""
    p = argparse.ArgumentParser(
        prog="multieye-dist concepts encode",
        description="encode the concept sentences with a local text encoder into a bank file",
    )
    add_encode_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ConceptBankError as e:
        p.exit(2, f"error: {e}\n")
