from __future__ import annotations

import json

import pytest

from multieye_dist import __version__
from multieye_dist.cli import main, parse_size


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-class", "3", "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "verify: OK" in printed
    manifest = json.loads((out / "shards" / "fundus-train.manifest.json").read_text())
    assert manifest["num_samples"] == 27


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,value", [("512", 512), ("64k", 65536), ("100MB", 100 * 2**20), ("1GiB", 2**30)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value
