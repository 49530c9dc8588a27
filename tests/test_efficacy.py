"""benchmarks/efficacy.py, shrunk: the study's machinery (shared pre-training, paired arms over
seeds, the table with paired intervals) on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_efficacy_study_pairs_arms_and_gate_never_trains_as_fundus_only(tmp_path):
    out = tmp_path / "study"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), "--out", str(out),
        "--seeds", "2", "--settings", "scarce", "--arms", "fundus-only,gate-never",
        "--per-class", "6", "--scarce", "3", "--image-size", "32", "--jobs", "2",
        "model.backbone=test_resnet", "data.samples_per_epoch=64", "train.epochs=2",
        "data.batch_size=8",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "efficacy.json").read_text())["results"]["scarce"]
    # gate-never computes every term but trains on cross-entropy alone, from the same init,
    # on the same fundus batches: it must train exactly as the fundus-only arm does.
    assert results["gate-never"] == results["fundus-only"]
    assert set(results["gate-never"]) == {"0", "1"}
    table = (out / "efficacy.md").read_text()
    assert "| scarce | gate-never |" in table and "[+0.00, +0.00]" in table
    students = sorted(p.name for p in (out / "scarce" / "students").iterdir())
    assert students == sorted(
        f"{a}-seed{s}" for a in ("fundus-only", "gate-never") for s in (0, 1)
    )

    # the arms of a seed differ in the arm's own overrides only
    def config(name):
        return (out / "scarce" / "students" / name / "config.yaml").read_text()

    a, b = config("fundus-only-seed1").splitlines(), config("gate-never-seed1").splitlines()
    differ = {x.split(":")[0].strip() for x in set(a) ^ set(b)}
    assert differ <= {"name", "out_dir", "checkpoint", "control"}, differ
