"""The machinery of a config section, apart from the sections themselves.

A section is a frozen dataclass whose fields are type-checked and coerced on construction
(:class:`Section`). It lives here, not in :mod:`multieye_dist.config`, so that a module can define
its own section without importing the whole config: :mod:`multieye_dist.track.tracking` defines the
``tracking`` section next to the backends it configures, and config.py imports it, as it imports
``ModelConfig`` from model.py. config.py re-exports :class:`ConfigError`.

A field whose type is itself a section (a tracking backend's settings, ``tracking.<backend>``)
is a nested section: it is written as a nested mapping in YAML and reached with a longer dotted
key (``tracking.<backend>.<field>=value``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

__all__ = ["SECRET_PARTS", "ConfigError", "Section", "coerce", "is_section"]

# A key containing one of these names a secret: never configuration, never logged.
SECRET_PARTS = ("api_key", "apikey", "token", "password", "secret")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key (and where it came from)."""


def is_section(tp: Any) -> bool:
    """True for a section class (a dataclass type: ours, or ``ModelConfig``)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def choices(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (list -> tuple, int ->
    float, "3e-4" -> float, a mapping -> the nested section). Literal choices pass through:
    ``__post_init__`` reports them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any or origin is Literal:
        return value
    if is_section(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(tp)})
            if unknown:
                raise ConfigError(f"unknown key {key}.{unknown[0]!r}")
            return tp(**value)
        raise ConfigError(f"{key}: expected a mapping of its fields, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], key)
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
                coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            items = [
                coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)
            ]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in the section


@dataclass(frozen=True)
class Section:
    """Base of the sections: coerces field types, checks Literal choices, then
    :meth:`_validate` checks ranges. ``_key`` is the section's dotted name in the config
    (``"optim"``, or ``"tracking.<backend>"`` for a nested one); errors start with it.

    ``_moved`` maps keys that no longer exist to where they went (``{"old.key": "new.key"}``,
    a whole old section too): the loader names the new key instead of guessing a close one.
    """

    _key: ClassVar[str] = ""
    _moved: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            key, value = f"{self._key}.{f.name}", getattr(self, f.name)
            value = coerce(value, hints[f.name], key)
            object.__setattr__(self, f.name, value)
            options = choices(hints[f.name])
            if options is not None and not any(
                value == c and type(value) is type(c) for c in options
            ):
                raise ConfigError(
                    f"{key}={value!r}: choose one of {', '.join(str(c) for c in options)}"
                )
        self._validate()

    def _validate(self) -> None:
        pass

    def _check(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key}.{name}={getattr(self, name)!r}: must be {rule}")
