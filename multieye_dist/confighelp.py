"""``multieye-dist config show``: every config key with its type, value, default and help.

The help text has one source, the comments the config's owners already write next to the
dataclass fields (:mod:`multieye_dist.config`, and the sections it reuses from
:mod:`multieye_dist.model.concept_model` and :mod:`multieye_dist.track.tracking`):
:func:`field_help` reads them from the classes' source once (:mod:`ast` for where each field is,
:mod:`tokenize` for the comments), so nothing is written twice and the sections need no extra
metadata. A field's help is its trailing comment, else the comment block right above it, else the
sentence of the class docstring that names it in double backquotes; its first sentence is the one
line shown.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import logging
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from multieye_dist.core.sections import is_section

__all__ = ["KeyInfo", "describe", "field_help", "render", "type_name"]

logger = logging.getLogger(__name__)

# A sentence ends at . ! or ? before a space, except in "e.g." and "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+")
MAX_HELP = 150  # characters of help per key: one terminal line with the key and its value


@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``config show`` prints it."""

    key: str  # dotted: section.field, or section.nested.field
    type: str
    value: Any  # resolved
    default: Any  # the dataclass default
    help: str  # one line; "" when the field has no comment


def _plain(text: str) -> str:
    """Docstring markup out (``x``, :mod:`x`) and whitespace collapsed: text for a terminal."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return " ".join(text.split())


def _one_line(comment_lines: list[str]) -> str:
    return " ".join(line.strip().lstrip("#").strip() for line in comment_lines)


def _first_sentence(text: str) -> str:
    """The first sentence, cut at a word boundary to ``MAX_HELP`` characters (with "...")."""
    first = _SENTENCE_END.split(text, maxsplit=1)[0]
    if len(first) <= MAX_HELP:
        return first
    return first[: MAX_HELP - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _docstring_help(cls: type, name: str) -> str:
    """The first sentence of ``cls``'s docstring that names ``name`` as ````name````."""
    doc = " ".join((inspect.getdoc(cls) or "").split())
    for sentence in _SENTENCE_END.split(doc):
        if f"``{name}``" in sentence:
            return sentence
    return ""


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """``{field name: one line of help}`` for the dataclass ``cls``, from its source's comments
    (see the module docstring); {} when the source is not available (a .pyc-only install)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        logger.debug("no source for %s: config show prints no help for it", cls.__qualname__)
        return {}
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    cdef = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    comments = {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    src_lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for node in cdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name not in names:  # a ClassVar (_key, _moved)
            continue
        span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        block = [comments[n] for n in span if n in comments]
        if not block:  # the comment lines right above the field, up to a blank or code line
            n = node.lineno - 1
            while n >= 1 and src_lines[n - 1].lstrip().startswith("#"):
                block.insert(0, src_lines[n - 1])
                n -= 1
        text = _one_line(block) if block else _docstring_help(cls, name)
        out[name] = _first_sentence(_plain(text))
    return out


def type_name(tp: Any) -> str:
    """A field's type as a user writes its value: ``int``, ``str | None``, ``auto|device|cpu``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _section_keys(cls: type, value: Any, prefix: str) -> list[KeyInfo]:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if is_section(tp):  # a nested section (tracking.wandb): its own fields
            rows += _section_keys(tp, getattr(value, f.name), key)
            continue
        rows.append(
            KeyInfo(key, type_name(tp), getattr(value, f.name), _default(f), helps.get(f.name, ""))
        )
    return rows


def describe(cfg: Any) -> list[KeyInfo]:
    """Every leaf key of the resolved config ``cfg`` (a :class:`multieye_dist.config.Config`),
    in the order of the dataclasses."""
    hints = typing.get_type_hints(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        rows += _section_keys(hints[f.name], getattr(cfg, f.name), f.name)
    return rows


def _text(value: Any) -> str:
    """A value as it is written in YAML or an override (tuples as lists)."""
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def render(rows: list[KeyInfo]) -> str:
    """One aligned line per key: ``key  type  value  [default X]  # help``; the default is
    shown where the value differs from it."""
    cells = []
    for r in rows:
        value, default = _text(r.value), _text(r.default)
        note = f"(default {default})" if value != default else ""
        cells.append((r.key, r.type, value, note, f"# {r.help}" if r.help else ""))
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    head = ("KEY", "TYPE", "VALUE", "")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for c in cells:
        line = "  ".join(x.ljust(w) for x, w in zip(c[:4], widths, strict=True))
        lines.append(f"{line}  {c[4]}".rstrip())
    return "\n".join(lines)
