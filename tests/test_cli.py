from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from multieye_dist import __version__
from multieye_dist.cli import main, parse_size


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, wandb_home):
    """The main command, shrunk (tiny model, a few steps), as a user runs it: a subprocess."""
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "multieye_dist.cli", "demo", "--out", str(out),
        "--per-class", "4", "--fundus-per-class", "2", "--image-size", "32",
        "model.backbone=test_resnet",
        "tracking.backend=local",
        "data.samples_per_epoch=64", "train.epochs=2", "data.batch_size=8",
        "train.plots=false",  # tests/test_plots.py checks the pictures
    ]  # fmt: skip
    env = {**os.environ, **wandb_home}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout
    assert "verify: OK" in printed
    manifest = json.loads((out / "shards" / "fundus-train.manifest.json").read_text())
    assert manifest["num_samples"] == 18  # scarce fundus labels: 2 per class
    table = printed[printed.index("Test split") :]
    for row in ("teacher (OCT)", "fundus-only", "OCT-CoDA", "oracle teacher"):
        assert row in table
    assert "OCT-CoDA - fundus-only" in table and "oracle - fundus-only" in table
    assert "One seed shows the pipeline" in printed and "benchmarks/efficacy.py" in printed
    assert "concepts for" in printed and "weight x similarity" in printed
    comparison = json.loads((out / "comparison.json").read_text())
    assert {s["step"] for s in comparison.values()} == {16}  # same steps for every run
    for run in ("align-oct", "align-fundus", "teacher", "fundus-only", "octcoda", "oracle"):
        assert (out / run / "best.safetensors").is_file()
    # the students start from the fundus init aligned on the pool, the teacher from the OCT
    # one; no pool image is a student's (nor any name: the pool's are pool-*)
    for run, init in (("teacher", "align-oct"), ("octcoda", "align-fundus")):
        config = (out / run / "config.yaml").read_text()
        assert f"weights: {out / init / 'best.safetensors'}" in config
    for name in ("align-oct", "align-fundus"):
        assert f"shards: {out / 'pool' / 'shards'}" in (out / name / "config.yaml").read_text()
    pool = {p.name for p in (out / "pool" / "raw").rglob("*.png")}
    data = {p.name for p in (out / "raw").rglob("*.png")}
    assert pool and data and not pool & data and all(n.startswith("pool-") for n in pool)
    # the new columns: concept AUC everywhere, gate and contrastive for the distilled students
    for name in ("fundus-only", "OCT-CoDA", "oracle teacher"):
        assert 0 <= comparison[name]["test/best/concept_auc"] <= 1
    assert comparison["oracle teacher"]["gate_open"] is not None
    assert comparison["fundus-only"]["gate_open"] is None
    diff = next(line for line in table.splitlines() if line.startswith("OCT-CoDA - fundus-only"))
    f1 = {n: 100 * comparison[n]["test/best/f1"] for n in ("OCT-CoDA", "fundus-only")}
    assert float(diff.split()[-3]) == pytest.approx(f1["OCT-CoDA"] - f1["fundus-only"], abs=0.006)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,value", [("512", 512), ("64k", 65536), ("100MB", 100 * 2**20), ("1GiB", 2**30)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_convert_help_names_the_size_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["shards", "convert", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-size PX" in text and "--image-size PX" in text
    assert "keep each image's size, never upscale" in text
    assert "not with --image-size" in text
