"""Shards read from a URL prefix (``data.shards``, multieye_dist/data/remote.py): the project's
own shards served by a local HTTP server, and the file: and pipe: forms, against the same shards
read from their directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import spawn_single, tiny_overrides

from multieye_dist.config import ConfigError, DataConfig, load_config
from multieye_dist.data import remote
from multieye_dist.data.batch import DataError
from multieye_dist.data.stream import (
    EvalStream,
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
)

SIZE = 32
CFG = StreamConfig.from_data(
    DataConfig(),
    samples_per_epoch=48,
    batch_size=8,
    image_size=SIZE,
    pool_size=8,
    augment=False,
)


class _Handler(SimpleHTTPRequestHandler):
    requested: list[str] = []  # every path asked for, for the tests to check

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def site(shards, tmp_path_factory) -> Path:
    """What the server serves: ``shards/`` (a copy of the training shards), ``partial/`` (its
    fundus-dev shard deleted, manifest kept) and ``evil/`` (a manifest with a shell in a name)."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(shards, root / "shards")
    shutil.copytree(shards, root / "partial")
    (root / "partial" / "fundus-dev-000000.tar").unlink()
    (root / "evil").mkdir()
    m = json.loads((shards / "fundus-dev.manifest.json").read_text())
    m["shards"][0]["name"] = "x.tar; touch pwned"
    (root / "evil" / "fundus-dev.manifest.json").write_text(json.dumps(m))
    return root


@pytest.fixture(scope="module")
def server(site) -> Iterator[str]:
    """http://127.0.0.1:<port>, serving `site` from a thread of this process."""
    handler = functools.partial(_Handler, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _same(a, b, where: str = "batch") -> None:
    """Equal field by field; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _train_batches(location: str | Path, workers: int = 0) -> list:
    ds = PairedTrainStream(
        ShardSet.from_manifest(location, "fundus", "train"),
        ShardSet.from_manifest(location, "oct", "train"),
        CFG,
        rank=0,
        world=1,
    )
    ds.set_epoch(1)
    return list(make_loader(ds, workers))


# ---------------------------------------------------------------- the accepted forms


def _locations(server: str, site: Path) -> dict[str, str]:
    d = site / "shards"
    return {
        "http": f"{server}/shards/",
        "pipe": f"pipe:cat {d}/{{name}}",
        "file": f"file:{d}",
        "file-3-slashes": f"file://{d}",
    }


@pytest.mark.parametrize("kind", ["http", "pipe", "file", "file-3-slashes"])
def test_a_remote_location_streams_what_the_directory_streams(server, site, kind):
    location = _locations(server, site)[kind]
    local = ShardSet.from_manifest(site / "shards", "fundus", "train")
    there = ShardSet.from_manifest(location, "fundus", "train")
    assert dataclasses.replace(there, urls=local.urls) == local  # same counts, same order
    names = [Path(u).name for u in local.urls]
    if kind == "http":
        assert there.urls == tuple(f"{server}/shards/{n}" for n in names)
    elif kind == "pipe":
        assert there.urls == tuple(f"pipe:cat {site / 'shards' / n}" for n in names)
    else:  # file: is the directory itself
        assert there.urls == local.urls

    _Handler.requested.clear()
    expected = _train_batches(site / "shards")
    got = _train_batches(location, workers=1 if kind == "http" else 0)
    assert len(got) == len(expected) == CFG.samples_per_epoch // CFG.batch_size
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        _same(a, b, f"batch {i}")
    if kind == "http":  # really read through the server, manifests and shards
        assert "/shards/fundus-train.manifest.json" in _Handler.requested
        assert {f"/shards/{n}" for n in names} <= set(_Handler.requested)


def test_evaluation_from_a_url_matches_the_directory(server, site, teacher_ckpt, tmp_path):
    """`multieye-dist eval --shards <url>` (the CLI keeps the URL a string) scores what the
    directory gives."""
    from multieye_dist.cli import main
    from multieye_dist.model.checkpoint import load_inference
    from multieye_dist.train.evaluation import evaluate_split

    model, _ = load_inference(teacher_ckpt)
    kw = dict(image_size=SIZE, batch_size=8, num_workers=0, device=torch.device("cpu"))
    local = evaluate_split(model, site / "shards", "oct", "dev", **kw)
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(teacher_ckpt), "--shards", f"{server}/shards", "--split", "dev"]
    assert main(["eval", *args, "--modality", "oct", "--batch-size", "8", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(local))


def test_resolve_shards_keeps_urls_and_resolves_paths(tmp_path, monkeypatch):
    for url in ("http://h/p", "https://h/p/", "file:///x", "pipe:cat /x/{name}"):
        assert remote.resolve_shards(url) == url
    monkeypatch.chdir(tmp_path)
    shipped = Path(__file__).resolve().parents[1] / "configs"
    assert remote.resolve_shards("configs") == shipped  # else the package's data of that path
    (tmp_path / "configs").mkdir()
    assert remote.resolve_shards("configs") == Path("configs")  # the working directory first


# ---------------------------------------------------------------- errors name the URL


def test_a_missing_manifest_names_the_url(server, site):
    url = f"{server}/nowhere/fundus-train.manifest.json"
    with pytest.raises(FileNotFoundError, match=rf"cannot read {url}: HTTP 404"):
        ShardSet.from_manifest(f"{server}/nowhere", "fundus", "train")
    cmd = f"pipe:cat {site}/nowhere/{{name}}"
    with pytest.raises(FileNotFoundError, match=r"pipe:cat \S+/nowhere/fundus-train\.manifest"):
        ShardSet.from_manifest(cmd, "fundus", "train")
    with pytest.raises(FileNotFoundError, match="exit status 1: cat: "):
        ShardSet.from_manifest(cmd, "fundus", "train")
    # A server that is not there: connection refused, named.
    with pytest.raises(FileNotFoundError, match=r"cannot read http://127\.0\.0\.1:9/x/oct"):
        ShardSet.from_manifest("http://127.0.0.1:9/x", "oct", "dev")


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_a_shard_the_server_lacks_is_a_data_error_naming_its_url(server, site, kind):
    location = f"{server}/partial" if kind == "http" else f"pipe:cat {site}/partial/{{name}}"
    shards = ShardSet.from_manifest(location, "fundus", "dev")  # no existence check: remote
    url = shards.urls[0]
    assert url.endswith("fundus-dev-000000.tar")
    with pytest.raises(DataError, match=rf"cannot read shard {url}"):
        list(make_loader(EvalStream(shards, SIZE, 4, rank=0, world=1), 0))
    with pytest.raises(FileNotFoundError, match="fundus-dev-000000.tar listed in"):
        ShardSet.from_manifest(site / "partial", "fundus", "dev")  # a directory: checked now


def test_a_manifest_cannot_inject_a_command(server, site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for location in (f"{server}/evil", f"pipe:cat {site}/evil/{{name}}"):
        with pytest.raises(ValueError, match="is not a plain file name"):
            ShardSet.from_manifest(location, "fundus", "dev")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("s3://bucket/shards", r"s3: is not supported; .*pipe:aws s3 cp"),
        ("pipe:cat /data/shards", r"needs a \{name\} placeholder"),
        ("file:data/shards", "absolute path"),
        ("https://host/shards?token=1", "no query"),
    ],
)
def test_unsupported_locations_are_config_errors(location, why):
    with pytest.raises(ConfigError, match=rf"data\.shards='{re.escape(location)}'.*{why}"):
        load_config(None, [f"data.shards={location}"])
    with pytest.raises(ValueError, match=why):
        ShardSet.from_manifest(location, "fundus", "dev")


# ---------------------------------------------------------------- training from the server


def _train(rank: int, world: int, overrides: list[str]) -> None:
    from multieye_dist.train.loop import run

    run(load_config(None, overrides))


@pytest.mark.slow
def test_two_training_steps_from_the_server(server, teacher_ckpt, tmp_path):
    """OCT-CoDA (fundus and OCT partners, both over HTTP, one loader worker) in a spawned
    process of its own, as `multieye-dist train` runs; the server is this process's thread."""

    from multieye_dist.track.records import read_metrics

    out = tmp_path / "run"
    overrides = tiny_overrides(
        f"{server}/shards",
        out,
        f"data.image_size={SIZE}",
        "data.num_workers=1",
        "train.stop_after_steps=2",
        f"teacher.checkpoint={teacher_ckpt}",
        "tracking.backend=local",
    )
    _Handler.requested.clear()
    spawn_single(_train, overrides)
    steps = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    assert f"{server}/shards" in (out / "config.yaml").read_text()  # kept as given
    asked = set(_Handler.requested)
    assert {"/shards/fundus-train.manifest.json", "/shards/oct-train.manifest.json"} <= asked
    assert any(p.startswith("/shards/fundus-train-") for p in asked)
    assert any(p.startswith("/shards/oct-train-") for p in asked)
