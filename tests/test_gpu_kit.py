"""benchmarks/gpu/run.sh, the one-command GPU run, cannot rot: its --dry-run runs every part on
the CPU (tiny shapes, Triton under its interpreter) and each must produce its log and exit 0;
and a failing part makes the whole run fail, with the others still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "gpu" / "run.sh"
PARTS = ["install", "env", "tests", "kernel", "step", "precision", "loader", "global"]
LOGS = {"install": "env.txt"}  # install heads env.txt (at most 8 files come back from the GPU)


def run_kit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        ["bash", str(RUN), *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=full
    )


def summary(tmp_path: Path) -> dict[str, str]:
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    rows = {}
    for line in lines[2:]:  # title, header
        part, rest = line.split(maxsplit=1)
        rows[part] = rest.rsplit(maxsplit=1)[0].strip()
    return rows


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path: Path) -> None:
    proc = run_kit(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = summary(tmp_path)
    assert list(rows) == [*PARTS, "total"], rows
    assert all(status == "ok" for status in rows.values()), rows
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted({LOGS.get(p, f"{p}.txt") for p in PARTS} | {"summary.txt"})
    assert len(files) <= 8
    text = {p: (out / LOGS.get(p, f"{p}.txt")).read_text() for p in PARTS}
    assert "torch " in text["env"] and "deepspeed " in text["env"]
    assert "-m gpu" in text["tests"] and "test_cuda_compiled_kernels" in text["tests"]
    assert text["kernel"].count("| N | anchors/level |") == 3
    # the step benchmark's CPU smoke run (benchmarks/step.py --smoke): every row of its table
    step = text["step"][text["step"].index("pairs/s") :]
    for row in (
        "release-style baseline",
        "ours (all on)",
        "- fused loss (torch)",
        "- channels-last",
        "- teacher inference_mode",
        "ours, real loader",
    ):
        assert row in step, row
    assert "autocast-bf16" in text["precision"] and "shards (ours)" in text["loader"]
    assert "| fused | ok |" in text["global"] and "| eager |" in text["global"]
    assert proc.stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())


def test_a_failing_part_fails_the_run_and_the_rest_still_runs(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho broken python >&2\nexit 3\n")
    fake.chmod(0o755)
    proc = run_kit(tmp_path, "--dry-run", "--only", "env,tests", PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary(tmp_path)
    assert rows["install"] == "ok"  # nothing to install in a dry run
    assert rows["env"].startswith("failed") and rows["tests"].startswith("failed"), rows
    assert rows["total"] == "FAILED"
    assert "broken python" in (tmp_path / "out" / "tests.txt").read_text()


def test_unknown_part_or_argument_is_refused(tmp_path: Path) -> None:
    assert run_kit(tmp_path, "--dry-run", "--only", "kernels").returncode == 2
    assert run_kit(tmp_path, "--bogus").returncode == 2


def test_timeouts_are_enforced_per_part(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    proc = run_kit(tmp_path, "--dry-run", "--only", "precision", PYTHON=str(fake), T_PRECISION="2")
    assert proc.returncode == 1
    assert summary(tmp_path)["precision"] == "timeout (2s)"
