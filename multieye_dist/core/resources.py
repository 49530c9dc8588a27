"""The data shipped inside the package, and the project's one rule for relative paths.

The run configs (``configs/*.yaml``), the sweep files (``configs/sweeps/``), the default concept
banks (``configs/concepts/*.safetensors``) and the release's concept sentences
(``configs/multieye_concepts.txt``) live in the checkout's top-level ``configs/`` folder, and a
wheel carries them as package data (``configs/``, found through
:mod:`importlib.resources`), so they work from a wheel installed anywhere, not only from a
checkout.

A relative path a user gives (``--config``, ``concepts.bank``, ``teacher.checkpoint``,
``data.shards``) is looked up in the working directory first, then in the package's data: the
paths the shipped configs and the docs use (``configs/concepts/minilm-l6.safetensors``,
``configs/distill.yaml``) therefore name the shipped files wherever the package is installed,
unless the working directory holds a file of that name.

``--config`` also takes a packaged config's name, the stem of its file (``demo``, ``teacher``,
``distill``): :func:`find_config`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import logging
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from multieye_dist.core.sections import ConfigError

__all__ = [
    "CONFIG_DIR",
    "config_argument",
    "config_names",
    "find_config",
    "find_packaged",
    "packaged",
    "path_argument",
    "user_path",
]

logger = logging.getLogger(__name__)

PACKAGE = "multieye_dist"
CONFIG_DIR = "configs"  # configs, sweeps/, concepts/, the sentences
_CHECKOUT = Path(__file__).resolve().parents[2]  # multieye_dist/core/resources.py -> the root

# A package imported from a zip archive has no files on disk: a resource read from there is
# extracted to a temporary file that must outlive the caller (a bank is loaded by path), so the
# extractions are closed, and their files removed, when the interpreter exits.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _relative(path: str | os.PathLike) -> PurePosixPath | None:
    """``path`` as a path inside the package, or None when it cannot be one (absolute, '..')."""
    rel = PurePosixPath(Path(path).as_posix())
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    return rel


def _node(rel: PurePosixPath) -> Traversable:
    node = resources.files(PACKAGE)
    if rel.parts[0] == CONFIG_DIR and isinstance(node, Path) and not (node / CONFIG_DIR).is_dir():
        # A checkout, or an editable install of one: the configs are the top-level folder
        # beside the package. A wheel carries them inside it (pyproject.toml's package-dir).
        node = _CHECKOUT
    for part in rel.parts:
        node = node.joinpath(part)
    return node


def find_packaged(path: str | os.PathLike) -> Path | None:
    """The file or directory ``path`` (relative to the package, e.g. ``configs/demo.yaml``) on
    disk, or None when the installed package has no such entry."""
    rel = _relative(path)
    if rel is None:
        return None
    node = _node(rel)
    if isinstance(node, Path):  # an ordinary installation: a wheel, editable, a checkout
        return node if node.exists() else None
    if node.is_file():  # a zip import
        return _extracted.enter_context(resources.as_file(node))
    return None


def packaged(path: str | os.PathLike) -> Path:
    """Like :func:`find_packaged`, but a missing entry is an error naming it."""
    found = find_packaged(path)
    if found is None:
        raise FileNotFoundError(
            f"{PACKAGE}/{path}: not in the installed package (reinstall multieye-dist)"
        )
    return found


def user_path(path: str | os.PathLike) -> Path:
    """A path a user gave: absolute, or relative to the working directory if it exists there,
    else the package's entry of that relative path; else unchanged (the caller's error then
    names the path as the user wrote it)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    shipped = find_packaged(p)
    return shipped if shipped is not None else p


def config_names() -> list[str]:
    """The packaged run configs' names: the stems of ``configs/*.yaml``, sorted."""
    root = _node(PurePosixPath(CONFIG_DIR))
    return sorted(
        n.name[: -len(".yaml")] for n in root.iterdir() if n.name.endswith(".yaml") and n.is_file()
    )


def _is_name(text: str) -> bool:
    """``demo`` is a name; ``demo.yaml``, ``./demo`` and ``configs/demo`` are paths."""
    return bool(text) and "/" not in text and os.sep not in text and not Path(text).suffix


def find_config(spec: str | os.PathLike) -> Path:
    """The YAML file ``--config spec`` means: a file of that path (relative: to the working
    directory), else a packaged config of that name (``demo``) or relative path
    (``configs/demo.yaml``, ``demo.yaml``). Anything else is a :class:`ConfigError` listing the
    packaged names and suggesting the closest."""
    text = os.fspath(spec)
    p = Path(text)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {text}: a directory, not a YAML file")
    if _is_name(text):
        candidates = [f"{CONFIG_DIR}/{text}.yaml"]
    elif p.is_absolute():
        candidates = []
    else:
        candidates = [text, f"{CONFIG_DIR}/{text}"]
    for candidate in candidates:
        found = find_packaged(candidate)
        if found is not None and found.is_file():
            return found
    names = config_names()
    close = difflib.get_close_matches(p.name.removesuffix(".yaml"), names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    kind = "no packaged config of that name" if _is_name(text) else "no such file"
    raise ConfigError(
        f"config {text}: {kind} (packaged configs: {', '.join(names)}; or give a YAML path){hint}"
    )


def config_argument(text: str) -> Path:
    """An argparse ``type=`` for ``--config NAME|PATH`` (:func:`find_config`); argparse puts
    the option's name before the message."""
    try:
        return find_config(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def path_argument(text: str) -> Path:
    """An argparse ``type=`` for a file that may be package data (``--sweep
    configs/sweeps/distill.yaml``): :func:`user_path`."""
    return user_path(text)
