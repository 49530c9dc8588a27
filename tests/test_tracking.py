"""Tracker: real wandb in offline mode (no mocks), the local backend (metrics log, summary),
ids across resumes, the backend interface, and failed runs.

The offline ``run-<id>.wandb`` files are read back with helpers.wandb_records: wandb 0.31 has no
Python reader any more (the LevelDB-log ``DataStore`` moved into the Go core), but the format is
simple (a 7-byte ``:W&B`` header, then LevelDB log blocks of CRC32-checked chunks) and every
record is a ``wandb.proto.wandb_internal_pb2.Record``. wandb-core may still be writing the file
when ``run.finish()`` returns (measured: sometimes empty right after, complete within a second),
so the reader waits for the run's exit record.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import offline_runs, wandb_contents, wandb_exit_code

from multieye_dist.config import Config, to_dict
from multieye_dist.track.metrics import evaluate
from multieye_dist.track.records import (
    METRICS_FILE,
    RUN_ID_FILE,
    SUMMARY_FILE,
    read_metrics,
    read_run_id,
    write_run_id,
)
from multieye_dist.track.tracking import Tracker, TrackerError, TrackingConfig, WandbConfig

FAKE_KEY = "fake-wandb-key-0123456789abcdef0123456789abcdef"

OFFLINE = TrackingConfig(
    backend="wandb",
    project="multieye-test",
    tags=["ci"],
    run_name="t",
    wandb=WandbConfig(mode="offline"),
)
DISABLED = TrackingConfig(wandb=WandbConfig(mode="disabled"))
LOCAL = TrackingConfig(backend="local")


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


def _eval_result() -> dict:
    """Class "c" is absent: its AUC/AP are None, which the W&B table must carry too."""
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array(
        [[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]]
    )
    return evaluate(labels, probs, ["a", "b", "c"])


# ----------------------------------------------------------------------------- tests


def test_import_and_inactive_paths_never_load_wandb(tmp_path):
    """A fresh interpreter: importing the module, a rank-1 W&B Tracker, a rank-0 Tracker with
    W&B disabled and one with the local backend all leave wandb unimported. The config section
    comes from multieye_dist.track.tracking itself, not multieye_dist.config, because importing the
    config imports timm, and timm imports wandb itself."""
    code = f"""
import sys
from multieye_dist.track.tracking import Tracker, TrackingConfig, WandbConfig
from multieye_dist.track.records import read_metrics
assert "wandb" not in sys.modules, "import"
t = Tracker(TrackingConfig(), {str(tmp_path / "r1")!r}, rank=1)
t.log({{"a": 1.0}}, step=0); t.summary({{"b": 1}}); t.finish()
assert "wandb" not in sys.modules, "rank 1"
for name, cfg in [
    ("disabled", TrackingConfig(wandb=WandbConfig(mode="disabled"))),
    ("local", TrackingConfig(backend="local", wandb=WandbConfig(mode="online"))),
]:
    t = Tracker(cfg, {str(tmp_path)!r} + "/" + name, rank=0)
    assert [b.name for b in t.backends] == ["local"], name
    t.log({{"a": 1.0}}, step=0); t.summary({{"b": 1}}); t.finish(exit_code=1)
    assert read_metrics({str(tmp_path)!r} + "/" + name)[0]["a"] == 1.0
    assert "wandb" not in sys.modules, name
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r1").exists()
    for name in ("disabled", "local"):
        run_dir = tmp_path / name
        assert {p.name for p in run_dir.iterdir()} == {RUN_ID_FILE, METRICS_FILE, SUMMARY_FILE}
        assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"b": 1, "exit_code": 1}


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
    assert config["optim"]["lr"] == cfg.optim.lr
    assert config["tracking"]["wandb"]["mode"] == "offline"
    assert wandb_exit_code(files[0]) == 0

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
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {
        "test/best/f1": 0.75,
        "dev/best_f1": pytest.approx(_eval_result()["f1"]),  # the only dev result, the best
    }


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
    with caplog.at_level(logging.WARNING, logger="multieye_dist.track.tracking"):
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert "skipped 1 torn last line" in caplog.text

    # The restarted job cuts the fragment instead of gluing its first record onto it.
    with Tracker(DISABLED, run_dir, rank=0) as tracker:
        tracker.log({"a": 3.5}, step=3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multieye_dist.track.tracking"):
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


def test_a_run_that_raises_is_marked_failed(tmp_path):
    """An exception inside the Tracker (as in train.run) finishes every backend with exit code
    1: W&B's exit record holds it, summary.json says so, and metrics.jsonl is whole. A later
    part that ends normally (a resumed job) sets the local exit code back to 0."""
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError), Tracker(OFFLINE, run_dir, rank=0) as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        raise FloatingPointError("loss is nan")
    assert not tracker.active
    (path,) = offline_runs(run_dir, tracker.run_id)
    assert wandb_exit_code(path) == 1
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"exit_code": 1}
    assert [r["step"] for r in read_metrics(run_dir)] == [1]

    with Tracker(DISABLED, run_dir, rank=0) as again:
        again.log({"train/loss": 0.5}, step=2)
        again.summary({"step": 2})
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"exit_code": 0, "step": 2}


class Recorder:
    """A backend that records its calls (the Backend protocol, nothing more)."""

    name = "recorder"

    def __init__(self, fail_finish: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_finish = fail_finish

    def log(self, metrics, step):
        self.calls.append(("log", dict(metrics), step))

    def log_eval(self, result, scalars, prefix, step):
        self.calls.append(("log_eval", result["class_names"], dict(scalars), prefix, step))

    def log_predictions(self, prefix, labels, probs, class_names, step):
        self.calls.append(("log_predictions", prefix, labels.tolist(), probs.shape, step))

    def log_model(self, paths):
        self.calls.append(("log_model", [p.name for p in paths]))

    def summary(self, values):
        self.calls.append(("summary", dict(values)))

    def finish(self, exit_code):
        self.calls.append(("finish", exit_code))
        if self.fail_finish:
            raise OSError("backend gone")


def test_tracker_fans_out_checked_values_to_every_backend(tmp_path):
    first, second = Recorder(fail_finish=True), Recorder()
    tracker = Tracker(LOCAL, tmp_path / "run", rank=0, backends=[first, second])
    assert [b.name for b in tracker.backends] == ["local", "recorder", "recorder"]
    tracker.log({"a": np.float32(0.5), "b": True}, step=3)
    tracker.log_eval(_eval_result(), prefix="test/", step=4)
    tracker.summary({"f1": np.float64(0.25)})
    with pytest.raises(OSError, match="backend gone"):  # the first error, after all finished
        tracker.finish(exit_code=1)
    for rec in (first, second):
        log, log_eval, summary, finish = rec.calls
        assert log == ("log", {"a": 0.5, "b": 1}, 3) and type(log[1]["a"]) is float
        assert log_eval[:2] == ("log_eval", ["a", "b", "c"]) and log_eval[3:] == ("test/", 4)
        assert log_eval[2]["test/f1"] == pytest.approx(_eval_result()["f1"])
        assert summary == ("summary", {"f1": 0.25}) and finish == ("finish", 1)
    records = read_metrics(tmp_path / "run")  # the local backend got the same values
    assert records[0]["a"] == 0.5 and records[1]["test/f1"] == log_eval[2]["test/f1"]
    assert json.loads((tmp_path / "run" / SUMMARY_FILE).read_text()) == {"f1": 0.25, "exit_code": 1}

    other = Recorder()
    Tracker(LOCAL, tmp_path / "r1", rank=1, backends=[other]).log({"a": 1.0}, step=0)
    assert other.calls == [] and not (tmp_path / "r1").exists()


def test_run_id_file_is_written_atomically_and_the_old_name_is_read(tmp_path):
    run_dir = tmp_path / "run"
    assert read_run_id(run_dir) is None
    write_run_id(run_dir, "abc123")  # what the sweep hand-off does before training starts
    assert (run_dir / RUN_ID_FILE).read_text() == "abc123\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_ID_FILE]  # no temp file left
    assert Tracker(LOCAL, run_dir, rank=0).run_id == "abc123"
    with pytest.raises(ValueError, match="run id must match"):
        write_run_id(run_dir, "../x")

    old = tmp_path / "old"  # a run directory from before the rename
    old.mkdir()
    (old / "wandb_run_id.txt").write_text("legacy9\n")
    tracker = Tracker(LOCAL, old, rank=0)
    tracker.finish()
    assert tracker.run_id == "legacy9" and read_run_id(old) == "legacy9"
    assert (old / RUN_ID_FILE).read_text() == "legacy9\n"


def test_log_outputs_hands_records_and_existing_exports_to_backends(tmp_path):
    """What train.finish leaves in run_dir reaches every backend: each eval/*.records.json
    under its name as a prefix, and only the exports that exist (no best model: none)."""
    from multieye_dist.track.records import write_records

    run_dir = tmp_path / "run"
    rows = [
        {"key": "k0", "label": 1, "probs": [0.2, 0.8]},
        {"key": "k1", "label": 0, "probs": [1, 0]},
    ]
    for name in ("test_last", "dev_last"):
        write_records(
            run_dir / "eval" / f"{name}.records.json",
            rows,
            split=name.split("_")[0],
            modality="fundus",
            class_names=["x", "y"],
        )
    (run_dir / "last.safetensors").write_bytes(b"w")
    rec = Recorder()
    with Tracker(LOCAL, run_dir, rank=0, backends=[rec]) as tracker:
        tracker.log_outputs(step=7)
    assert rec.calls == [
        ("log_predictions", "dev/last/", [1, 0], (2, 2), 7),
        ("log_predictions", "test/last/", [1, 0], (2, 2), 7),
        ("log_model", ["last.safetensors"]),
        ("finish", None),
    ]
