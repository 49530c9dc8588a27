"""benchmarks/efficacy.py --smoke: the study's machinery (pool-aligned inits, a teacher per
family and bank, paired arms over seeds, the oracle controls, scipy intervals, resume) on a tiny
model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_study_statistics():
    study = load_script("efficacy.py", "efficacy_study", "benchmarks")
    assert study.parse_seeds("0-2,10,20-21") == [0, 1, 2, 10, 20, 21]
    # the t interval: mean +- t_{0.975, n-1} * sd / sqrt(n), t_{0.975,4} = 2.776
    m, lo, hi = study.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and hi - m == pytest.approx(2.776 * (2.5**0.5) / 5**0.5, rel=1e-3)
    assert study.interval([2.0, 2.0]) == (2.0, 2.0, 2.0)
    # paired-t power: the figures (sd 3.2: 5 seeds see 5.4 points, 2 points need 23)
    assert study.seeds_for_power(3.2, 5.4) == 5 and study.seeds_for_power(3.2, 2.0) == 23
    assert study.seeds_for_power(1.0, 1.0) < study.seeds_for_power(1.0, 0.5)


@pytest.mark.slow
def test_efficacy_smoke_pairs_arms_controls_and_resumes(tmp_path):
    out = tmp_path / "study"
    arms = "fundus-only,gate-never,oracle"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), "--smoke", "--out", str(out),
        "--seeds", "0-1", "--arms", arms, "--weights", "release,strong", "--jobs", "2",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = json.loads((out / "efficacy.json").read_text())
    results = study["results"]
    assert set(results) == {"fam0/K8/release/b3", "fam0/K8/strong/b3"}
    cell = results["fam0/K8/release/b3"]
    # gate-never computes every term but trains on cross-entropy alone, from the same init,
    # on the same fundus batches: it must train exactly as the fundus-only arm does.
    for seed in ("0", "1"):
        never, only = cell["gate-never"][seed], cell["fundus-only"][seed]
        assert never["test/best/f1"] == only["test/best/f1"]
        assert never["test/best/concept_auc"] == only["test/best/concept_auc"]
        assert never["gate_open"] == 0.0 and only["gate_open"] is None
        assert 0.0 <= cell["oracle"][seed]["test/best/concept_auc"] <= 1.0
    # the weightless arms ran once per seed and serve both weights levels
    assert results["fam0/K8/strong/b3"]["fundus-only"] == cell["fundus-only"]
    runs = sorted(p.name for p in (out / "fam0" / "K8" / "b3" / "any").iterdir())
    assert runs == sorted(f"{a}-seed{s}" for a in ("fundus-only", "gate-never") for s in (0, 1))
    table = (out / "efficacy.md").read_text()
    assert "| fam0/K8/release/b3 | gate-never - fundus-only | f1 | 2 | +0.00 |" in table
    assert "| fam0/K8/strong/b3 | oracle - fundus-only | cauc | 2 |" in table

    # the arms of a seed differ in the arm's own overrides only; the init was aligned on the pool
    def config(name, level="release"):
        return (out / "fam0" / "K8" / "b3" / level / name / "config.yaml").read_text()

    a = (out / "fam0" / "K8" / "b3" / "any" / "fundus-only-seed1" / "config.yaml").read_text()
    b = config("oracle-seed1")
    differ = {x.split(":")[0].strip() for x in set(a.splitlines()) ^ set(b.splitlines())}
    assert differ <= {"name", "out_dir", "kind"}, differ
    align = (out / "fam0" / "K8" / "align-fundus" / "config.yaml").read_text()
    assert f"shards: {out / 'fam0' / 'pool' / 'shards'}" in align
    assert "weights: " + str(out / "fam0" / "K8" / "align-fundus" / "best.safetensors") in b

    # --resume reads every finished run (and the data and pre-training) instead of redoing it
    done = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "efficacy.json"}
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300,
                           env=env, cwd=ROOT)  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "efficacy.json").read_text())["results"] == results
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert "[data] synthetic" not in again.stdout
