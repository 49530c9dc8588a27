"""Where shards live (``data.shards``, ``eval --shards``): a directory or a URL prefix.

Accepted forms:

* a directory: ``/data/shards`` or ``runs/demo/shards`` (relative: from the working directory,
  else from the project root, as every path of the config). Nothing changes for it.
* ``file:/abs/dir`` or ``file:///abs/dir``: the same as the directory ``/abs/dir`` (absolute
  paths only).
* ``http://host/path`` or ``https://host/path``: a URL prefix; the file ``NAME`` is at
  ``<prefix>/NAME``. The manifest is read with urllib, the shards are streamed by webdataset
  (through ``curl``, which must be installed).
* ``pipe:CMD``: a shell command that writes the file ``NAME`` to stdout once every ``{name}`` in
  it is replaced by ``NAME``: ``pipe:curl -fsS https://host/shards/{name}``,
  ``pipe:aws s3 cp s3://bucket/shards/{name} -``. The manifest is read by running the command
  for the manifest's name, each shard is opened as webdataset's ``pipe:`` URL for its own name.
  The command runs through the shell (as webdataset runs ``pipe:`` URLs): trusted input only.
  Prefer commands that fail on errors (``curl -f``): an HTTP error page is not a manifest.

For the URL forms, the names a manifest lists must be plain file names (letters, digits,
``._-``), so that a manifest can neither leave the prefix nor add to a command. A remote shard
is not checked when the manifest is read; a missing or damaged one is an error naming its URL
when a loader worker reads it (``DataError: cannot read shard <url> ...``).
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from multieye_dist.core.resources import user_path

SCHEMES = ("file", "http", "https", "pipe")
PLACEHOLDER = "{name}"
RULE = "a directory, or a file:, http://, https:// or pipe: location (pipe: with {name})"
MAX_TEXT_BYTES = 64 << 20  # a manifest is a few kB per thousand shards
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RemoteReadError(FileNotFoundError):
    """A file that could not be read from a shard location (a FileNotFoundError, as a missing
    local manifest is): the message names the URL and why (HTTP status, exit status, ...)."""


class _LocationError(ValueError):
    """A location that is not one of the accepted forms (ValueError, for the CLI)."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"shard location {text!r}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Location:
    """A parsed shard location: ``kind`` is ``dir`` (``path`` set: directories and ``file:``
    URLs), ``http`` (``base``: the prefix, no trailing slash) or ``pipe`` (``base``: the
    command template, without ``pipe:``)."""

    kind: str
    text: str  # as given
    path: Path | None = None
    base: str = ""

    @property
    def is_local(self) -> bool:
        return self.kind == "dir"

    def member(self, name: str) -> str:
        """The URL (for webdataset) or path of the file `name` at this location."""
        if self.kind == "dir":
            assert self.path is not None
            return str(self.path / name)
        if not _NAME_RE.match(name):
            raise ValueError(f"{self.text}: {name!r} is not a plain file name")
        if self.kind == "http":
            return f"{self.base}/{name}"
        return "pipe:" + self.base.replace(PLACEHOLDER, name)


def scheme(location: str | Path) -> str | None:
    """The URL scheme of `location` (lower case), or None for a plain path."""
    if isinstance(location, Path):
        return None
    m = _SCHEME_RE.match(location)
    if m is None:
        return None
    s = m.group(1).lower()
    # A path such as "runs/a:b" has no scheme; "x:" without "//" is a path unless it is ours.
    return s if s in SCHEMES or location[m.end() :].startswith("//") else None


def is_url(location: str | Path) -> bool:
    return scheme(location) is not None


def parse(location: str | Path) -> Location:
    """A :class:`Location`; ValueError naming the location for an unsupported or malformed one."""
    text = str(location)
    s = scheme(location)
    if s is None:
        return Location("dir", text, path=Path(location))
    u = urlsplit(text)
    if s == "file":
        path = url2pathname(u.path)
        if u.netloc not in ("", "localhost") or not path.startswith("/"):
            raise _LocationError(
                text, "a file: URL names an absolute path: file:/abs/dir or file:///abs/dir"
            )
        return Location("dir", text, path=Path(path))
    if s in ("http", "https"):
        if not u.netloc:
            raise _LocationError(text, f"expected {s}://host/path")
        if u.query or u.fragment:
            raise _LocationError(
                text,
                "a URL prefix takes no query or fragment (a pipe:curl -fsS '...{name}?...' "
                "command can)",
            )
        return Location("http", text, base=text.rstrip("/"))
    if s == "pipe":
        if PLACEHOLDER not in text:
            raise _LocationError(
                text,
                f"a pipe: command needs a {PLACEHOLDER} placeholder for the file name, e.g. "
                f"pipe:curl -fsS https://host/shards/{PLACEHOLDER}",
            )
        return Location("pipe", text, base=text[len("pipe:") :])
    raise _LocationError(
        text,
        f"{s}: is not supported; a command can read it, e.g. "
        f"pipe:aws s3 cp s3://bucket/shards/{PLACEHOLDER} -",
    )


def location_problem(location: str | Path) -> str | None:
    """None when `location` parses, else what it must be and why (for config validation)."""
    try:
        parse(location)
    except _LocationError as exc:
        return f"{RULE}; {exc.reason}"
    return None


def read_text(location: str | Path | Location, name: str, *, timeout: float = 120.0) -> str:
    """The text file `name` at `location` (a manifest). RemoteReadError naming the URL when it
    cannot be read: missing file, HTTP status, unreachable host, command exit status."""
    where = location if isinstance(location, Location) else parse(location)
    url = where.member(name)
    if where.kind == "dir":
        try:
            return Path(url).read_text()
        except OSError as exc:
            raise RemoteReadError(f"cannot read {url}: {exc.strerror or exc}") from None
    if where.kind == "http":
        data = _read_http(url, timeout)
    else:
        data = _read_pipe(url, timeout)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteReadError(f"cannot read {url}: not UTF-8 text") from None


def _read_http(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read(MAX_TEXT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise RemoteReadError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise RemoteReadError(f"cannot read {url}: {exc.reason}") from None
    except OSError as exc:  # timeouts, resets
        raise RemoteReadError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise RemoteReadError(f"cannot read {url}: larger than {MAX_TEXT_BYTES} bytes")
    return data


def _read_pipe(url: str, timeout: float) -> bytes:
    cmd = url[len("pipe:") :]
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RemoteReadError(f"cannot read {url}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        tail = f": {err[-1]}" if err else ""
        raise RemoteReadError(f"cannot read {url}: exit status {proc.returncode}{tail}")
    if len(proc.stdout) > MAX_TEXT_BYTES:
        raise RemoteReadError(f"cannot read {url}: larger than {MAX_TEXT_BYTES} bytes")
    return proc.stdout


def resolve_shards(location: str | Path) -> str | Path:
    """A ``data.shards`` value ready for :meth:`ShardSet.from_manifest`: URLs unchanged, paths
    resolved as every config path is (:func:`multieye_dist.core.resources.user_path`)."""
    if is_url(location):
        return str(location)
    return user_path(str(location))
