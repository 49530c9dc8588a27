"""Tracker: real wandb in offline mode (no mocks), the local metrics log, ids across resumes.

The offline ``run-<id>.wandb`` files are read back with a small reader below: wandb 0.31 has no
Python reader any more (the LevelDB-log ``DataStore`` moved into the Go core), but the format is
simple (a 7-byte ``:W&B`` header, then LevelDB log blocks of CRC32-checked chunks) and every
record is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multieye_dist.config import Config, WandbConfig, to_dict
from multieye_dist.metrics import evaluate
from multieye_dist.tracking import (
    METRICS_FILE,
    RUN_ID_FILE,
    SUMMARY_FILE,
    Tracker,
    TrackerError,
    read_metrics,
)

FAKE_KEY = "fake-wandb-key-0123456789abcdef0123456789abcdef"

OFFLINE = WandbConfig(mode="offline", project="multieye-test", tags=["ci"], run_name="t")
DISABLED = WandbConfig(mode="disabled")


@pytest.fixture(autouse=True, scope="module")
def _wandb_env(tmp_path_factory):
    """wandb's own dirs (artifact staging, cache, settings) outside the home directory and
    outside run_dir; no WANDB_* variable of the caller's shell changes what is tested. Module
    scope: wandb reads its environment once per process and warns about later changes."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_DATA_DIR", str(home / "data"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        yield


# ----------------------------------------------------------------------------- .wandb reader

_BLOCK = 32 * 1024  # LevelDB log block size
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """Every protobuf ``Record`` of an offline ``run-<id>.wandb`` file, CRCs checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer too small for a chunk header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad CRC at {pos}"
        chunks += payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _keys(items) -> set[str]:
    return {"/".join(item.nested_key) if item.nested_key else item.key for item in items}


def wandb_contents(path: Path) -> dict[str, Any]:
    """The run record, history keys and summary keys of an offline run file."""
    runs, history, summary = [], set(), set()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            history |= _keys(record.history.item)
        elif kind == "summary":
            summary |= _keys(record.summary.update)
    assert len(runs) == 1, f"{path}: {len(runs)} run records"
    return {"run": runs[0], "history": history, "summary": summary}


def offline_runs(run_dir: Path, run_id: str) -> list[Path]:
    # A second part started within the same second gets a "-1" suffix on its directory.
    return sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))


def _eval_result() -> dict:
    """Class "c" is absent: its AUC/AP are None, which the W&B table must carry too."""
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array(
        [[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]]
    )
    return evaluate(labels, probs, ["a", "b", "c"])


# ----------------------------------------------------------------------------- tests


def test_import_and_inactive_paths_never_load_wandb(tmp_path):
    """A fresh interpreter: importing the module, a rank-1 offline Tracker and a rank-0
    disabled Tracker all leave wandb unimported. The config section is a plain namespace here
    because importing multieye_dist.config imports timm, and timm imports wandb itself."""
    code = f"""
import sys
from types import SimpleNamespace
from multieye_dist.tracking import Tracker, read_metrics
assert "wandb" not in sys.modules, "import"
cfg = SimpleNamespace(project="p", mode="offline", entity=None, tags=[], run_name=None)
t = Tracker(cfg, {str(tmp_path / "r1")!r}, rank=1)
t.log({{"a": 1.0}}, step=0); t.summary({{"b": 1}}); t.finish()
assert "wandb" not in sys.modules, "rank 1"
cfg.mode = "disabled"
t = Tracker(cfg, {str(tmp_path / "r0")!r}, rank=0)
t.log({{"a": 1.0}}, step=0); t.summary({{"b": 1}}); t.finish()
assert read_metrics({str(tmp_path / "r0")!r})[0]["a"] == 1.0
assert "wandb" not in sys.modules, "disabled"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r0" / "wandb").exists()


def test_offline_run_writes_history_tables_summary(tmp_path):
    run_dir = tmp_path / "run"
    cfg = Config()
    with Tracker(OFFLINE, run_dir, rank=0, config=to_dict(cfg), job_type="distill") as tracker:
        tracker.log({"train/loss": 1.5, "train/lr": np.float32(1e-4)}, step=1)
        tracker.log_eval(_eval_result(), prefix="dev/", step=2)
        tracker.summary({"test/best/f1": 0.75})
    run_id = tracker.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id

    files = offline_runs(run_dir, run_id)
    assert len(files) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    got = wandb_contents(files[0])
    run = got["run"]
    assert (run.run_id, run.project, run.job_type) == (run_id, "multieye-test", "distill")
    assert run.display_name == "t" and list(run.tags) == ["ci"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["optim"]["lr"] == cfg.optim.lr and config["wandb"]["mode"] == "offline"

    assert {"train/loss", "train/lr", "dev/f1", "dev/auc", "dev/f1/a", "dev/kappa"} <= got[
        "history"
    ]
    assert "dev/auc/c" not in got["history"]  # undefined for the absent class
    for table in ("dev/per_class", "dev/confusion_matrix_table", "dev/confusion_counts"):
        assert f"{table}/_type" in got["history"], table
    assert "test/best/f1" in got["summary"]

    media = run_dir.glob("wandb/offline-run-*/files/media/table/dev/per_class_*.table.json")
    per_class = json.loads(next(media).read_text())
    assert per_class["columns"] == [
        "class",
        "precision",
        "recall",
        "specificity",
        "f1",
        "auc",
        "ap",
        "support",
    ]
    assert per_class["data"][2][0] == "c" and per_class["data"][2][5] is None

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 1.5
    assert records[1]["dev/f1"] == pytest.approx(_eval_result()["f1"])
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"test/best/f1": 0.75}


def test_resume_keeps_run_id_and_explicit_id_wins(tmp_path):
    run_dir = tmp_path / "run"
    first = Tracker(OFFLINE, run_dir, rank=0)
    first.log({"train/loss": 2.0}, step=10)
    first.summary({"best": 1})
    first.finish()
    second = Tracker(OFFLINE, run_dir, rank=0)  # the restarted job
    second.log({"train/loss": 1.0}, step=20)
    second.summary({"last": 2})
    second.finish()
    assert second.run_id == first.run_id
    files = offline_runs(run_dir, first.run_id)
    assert len(files) == 2  # wandb cannot resume offline: one directory per part, same id
    assert {wandb_contents(f)["run"].run_id for f in files} == {first.run_id}
    assert [r["step"] for r in read_metrics(run_dir)] == [10, 20]
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"best": 1, "last": 2}

    # An id from a checkpoint beats the persisted one and becomes the persisted one.
    forced = Tracker(DISABLED, run_dir, rank=0, run_id="from-ckpt_1")
    forced.finish()
    assert (run_dir / RUN_ID_FILE).read_text().strip() == "from-ckpt_1"
    assert Tracker(DISABLED, run_dir, rank=0).run_id == "from-ckpt_1"
    with pytest.raises(ValueError, match="run id must match"):
        Tracker(DISABLED, run_dir, rank=0, run_id="a/b")


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(OFFLINE, run_dir, rank=3, config={"x": 1})
    assert not tracker.active and tracker.run_id is None
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.log_eval(_eval_result(), step=1)
    tracker.summary({"x": 1})
    tracker.finish()
    assert not run_dir.exists()
    assert Tracker(OFFLINE, run_dir, rank=1, run_id="given").run_id == "given"


def test_disabled_mode_keeps_local_log_only(tmp_path):
    run_dir = tmp_path / "run"
    with Tracker(DISABLED, run_dir, rank=0, config=to_dict(Config())) as tracker:
        tracker.log({"train/loss": 0.5}, step=0)
        tracker.log_eval(_eval_result(), prefix="test/", step=0)
        tracker.summary({"test/f1": 0.4})
    assert not (run_dir / "wandb").exists()
    assert {p.name for p in run_dir.iterdir()} == {RUN_ID_FILE, METRICS_FILE, SUMMARY_FILE}
    records = read_metrics(run_dir)
    assert records[0]["train/loss"] == 0.5 and "test/accuracy" in records[1]


def test_metrics_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    values = {"f": 0.125, "i": 7, "np": np.float64(2.5), "arr": np.array(3), "b": True}
    with Tracker(DISABLED, run_dir, rank=0) as tracker:
        tracker.log(values, step=0)
        tracker.log({"nan": float("nan"), "inf": float("inf")}, step=1)
    first, second = read_metrics(run_dir / METRICS_FILE)  # the file itself works too
    assert {k: first[k] for k in values} == {"f": 0.125, "i": 7, "np": 2.5, "arr": 3, "b": 1}
    assert isinstance(first["time"], float) and first["step"] == 0
    assert math.isnan(second["nan"]) and second["inf"] == math.inf


def test_torn_last_line_is_skipped_then_repaired(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with Tracker(DISABLED, run_dir, rank=0) as tracker:
        tracker.log({"a": 1.0}, step=1)
        tracker.log({"a": 2.0}, step=2)
    path = run_dir / METRICS_FILE
    with path.open("a") as fh:
        fh.write('{"step": 3, "time": 1.0, "a": 3.')  # the job died mid-write
    with caplog.at_level(logging.WARNING, logger="multieye_dist.tracking"):
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert "skipped 1 torn last line" in caplog.text

    # The restarted job cuts the fragment instead of gluing its first record onto it.
    with Tracker(DISABLED, run_dir, rank=0) as tracker:
        tracker.log({"a": 3.5}, step=3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multieye_dist.tracking"):
        assert [r["a"] for r in read_metrics(run_dir)] == [1.0, 2.0, 3.5]
    assert caplog.text == ""

    # A complete record that only lost its newline is kept.
    path.write_text(path.read_text() + '{"step": 4, "a": 4.0}')
    with Tracker(DISABLED, run_dir, rank=0) as tracker:
        tracker.log({"a": 5.0}, step=5)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]

    # A bad line that is not the last one is corruption, not a crash: an error naming it.
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}:2: not a metrics record"):
        read_metrics(run_dir)


def test_api_key_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    with Tracker(OFFLINE, run_dir, rank=0, config=to_dict(Config()), job_type="distill") as t:
        t.log({"train/loss": 1.0}, step=1)
        t.log_eval(_eval_result(), step=1)
        t.summary({"test/best/f1": 0.5})
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 5 and offline_runs(run_dir, t.run_id)  # the check looked somewhere
    leaked = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []

    with pytest.raises(ValueError, match="optim.api_key"):
        Tracker(DISABLED, tmp_path / "other", rank=0, config={"optim": {"api_key": "x"}})
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_bad_run_dir_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackerError, match=str(blocker / "run")):
        Tracker(DISABLED, blocker / "run", rank=0)
    with pytest.raises(TrackerError, match=str(blocker)):
        Tracker(DISABLED, blocker, rank=0)
    with pytest.raises(TrackerError, match="empty"):
        Tracker(DISABLED, "", rank=0)


def test_bad_values_are_caller_errors(tmp_path):
    tracker = Tracker(DISABLED, tmp_path / "run", rank=0)
    with pytest.raises(ValueError, match="step"):
        tracker.log({"a": 1.0}, step=-1)
    with pytest.raises(TypeError, match="'a'"):
        tracker.log({"a": "high"}, step=1)
    with pytest.raises(ValueError, match="reserved"):
        tracker.log({"time": 1.0}, step=1)
    with pytest.raises(TypeError, match="'obj'"):
        tracker.summary({"obj": object()})
    tracker.finish()
    tracker.finish()  # idempotent
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"a": 1.0}, step=2)
    assert read_metrics(tmp_path / "run") == []
