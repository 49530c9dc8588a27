"""What the W&B backend records, read back from the offline ``run-<id>.wandb`` file (real wandb,
offline, no mocks; helpers.wandb_records parses it): system metrics, the best dev macro-F1 in the
summary (and in summary.json, and as the packaged sweep's metric), prediction charts from the
per-sample records, model artifacts only when asked, and the code version in the config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import offline_runs, wandb_records

from multieye_dist.track.metrics import evaluate
from multieye_dist.track.records import SUMMARY_FILE, read_metrics, write_records
from multieye_dist.track.tracking import (
    BEST_DEV_F1,
    CODE_KEY,
    Tracker,
    TrackingConfig,
    WandbConfig,
    code_version,
)

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "distill.yaml"
NAMES = ["a", "b", "c"]
DEV_F1S = [0.5, 0.8, 0.6]  # the best epoch is not the last one


def _offline(**wandb: object) -> TrackingConfig:
    return TrackingConfig(project="multieye-test", wandb=WandbConfig(mode="offline", **wandb))


@pytest.fixture(autouse=True, scope="module")
def _wandb_env(tmp_path_factory):
    """wandb's own dirs outside the home directory (as in test_tracking.py)."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_DATA_DIR", str(home / "data"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        yield


def _dev_result(f1: float) -> dict:
    """An evaluate() result whose macro-F1 is forced to ``f1`` (the rest is real)."""
    labels = np.array([0, 1, 2, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    return {**evaluate(labels, probs, NAMES), "f1": f1}


def _write_eval_records(run_dir: Path) -> None:
    """What train.finish leaves: the per-sample records and the two exports."""
    rng = np.random.default_rng(0)
    for name, split in (("dev_last", "dev"), ("test_best", "test"), ("test_last", "test")):
        labels = np.arange(30) % 3
        probs = rng.dirichlet(np.ones(3), size=30)
        probs[np.arange(30), labels] += 1.0  # mostly right, not always
        probs /= probs.sum(axis=1, keepdims=True)
        rows = [
            {"key": f"s{i}", "label": int(y), "probs": p.tolist()}
            for i, (y, p) in enumerate(zip(labels, probs, strict=True))
        ]
        write_records(
            run_dir / "eval" / f"{name}.records.json",
            rows,
            split=split,
            modality="fundus",
            class_names=NAMES,
        )
    for name in ("best", "last"):
        (run_dir / f"{name}.safetensors").write_bytes(f"weights of {name}".encode())


def _run_file(run_dir: Path, run_id: str) -> list:
    (path,) = offline_runs(run_dir, run_id)
    return wandb_records(path)


def _summary(records: list) -> dict:
    """The run's final summary: the last value of each (nested) key."""
    out: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                out["/".join(u.nested_key) if u.nested_key else u.key] = json.loads(u.value_json)
    return out


def _kinds(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _history_keys(records: list) -> set[str]:
    return {
        "/".join(i.nested_key) if i.nested_key else i.key
        for h in _kinds(records, "history")
        for i in h.item
    }


def _full_run(run_dir: Path, cfg: TrackingConfig) -> str:
    """Three dev epochs, then the end of training as train.finish does it."""
    with Tracker(cfg, run_dir, rank=0, config={"optim": {"lr": 0.1}}) as tracker:
        for epoch, f1 in enumerate(DEV_F1S):
            tracker.log({"train/loss": 1.0 / (epoch + 1)}, step=10 * epoch + 5)
            tracker.log_eval(_dev_result(f1), prefix="dev/", step=10 * epoch + 10)
        _write_eval_records(run_dir)
        tracker.summary({"test/best/f1": 0.7})
        tracker.log_outputs(step=30)
    return tracker.run_id


@pytest.mark.slow  # a wandb-core process per run (1.5-3 s)
def test_summary_holds_the_best_dev_f1_and_the_charts(tmp_path):
    run_dir = tmp_path / "run"
    run_id = _full_run(run_dir, _offline(log_model=True))
    records = _run_file(run_dir, run_id)

    summary = _summary(records)
    assert summary["dev/f1"] == {"max": max(DEV_F1S)}  # not the last epoch's 0.6
    assert summary[BEST_DEV_F1] == max(DEV_F1S)
    sweep_metric = yaml.safe_load(SWEEP.read_text())["metric"]
    assert sweep_metric == {"name": BEST_DEV_F1, "goal": "maximize"}  # W&B ranks by the best
    (metric,) = [m for m in _kinds(records, "metric") if m.name == "dev/f1"]
    assert metric.summary.max

    # The local backend: the same running best, per epoch and in summary.json; the offline
    # sweep summary reads its last value from metrics.jsonl, which is the best.
    best = [r[BEST_DEV_F1] for r in read_metrics(run_dir) if BEST_DEV_F1 in r]
    assert best == [0.5, 0.8, 0.8]
    assert json.loads((run_dir / SUMMARY_FILE).read_text())[BEST_DEV_F1] == 0.8

    history = _history_keys(records)
    for prefix in ("test/best/", "test/last/", "dev/last/"):
        for chart in ("per_class", "confusion_matrix_table", "roc_table", "pr_table"):
            assert f"{prefix}{chart}/_type" in history, prefix + chart
    roc = run_dir.glob("wandb/offline-run-*/files/media/table/test/best/roc_table_*.table.json")
    table = json.loads(next(roc).read_text())
    assert table["columns"] == ["class", "fpr", "tpr"] and {r[0] for r in table["data"]} == {*NAMES}
    assert all(0.0 <= r[2] <= 1.0 for r in table["data"])

    models = [a for a in _kinds(records, "artifact") if a.type == "model"]
    assert sorted(a.name for a in models) == [f"model-{run_id}"] * 2
    assert sorted(set(a.aliases) - {"latest"} for a in models) == [{"best"}, {"last"}]
    assert {m.path for a in models for m in a.manifest.contents} == {
        "best.safetensors",
        "last.safetensors",
    }

    (run,) = _kinds(records, "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config[CODE_KEY] == code_version() and config["optim"] == {"lr": 0.1}
    assert config[CODE_KEY]["version"]


@pytest.mark.slow  # a wandb-core process per run (1.5-3 s)
def test_no_artifact_unless_asked_and_stats_are_recorded(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _offline(stats_interval_s=0.2)
    with Tracker(cfg, run_dir, rank=0) as tracker:
        _write_eval_records(run_dir)
        tracker.log({"train/loss": 1.0}, step=1)
        _wait_for_stats()
        tracker.log_outputs(step=1)
    records = _run_file(run_dir, tracker.run_id)
    assert [a for a in _kinds(records, "artifact") if a.type == "model"] == []  # log_model off
    stats = _kinds(records, "stats")
    assert stats, "no system metrics sampled"
    assert {"cpu", "memory_percent"} & {i.key for s in stats for i in s.item}

    off = tmp_path / "off"
    with Tracker(_offline(stats_interval_s=0.2, system_metrics=False), off, rank=0) as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        _wait_for_stats()
    assert _kinds(_run_file(off, tracker.run_id), "stats") == []


def _wait_for_stats(seconds: float = 1.0) -> None:
    """Long enough for a sampler every 0.2 s to write several stats records (measured: one per
    interval from the start, with wandb 0.31)."""
    time.sleep(seconds)


def test_best_dev_f1_continues_across_a_resumed_part(tmp_path):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(backend="local")
    with Tracker(cfg, run_dir, rank=0) as tracker:
        tracker.log_eval(_dev_result(0.7), prefix="dev/", step=1)
    with Tracker(cfg, run_dir, rank=0) as tracker:  # the requeued job
        tracker.log_eval(_dev_result(0.4), prefix="dev/", step=2)
        tracker.log_eval(_dev_result(0.5), prefix="test/", step=2)  # not a dev result
    assert [r.get(BEST_DEV_F1) for r in read_metrics(run_dir)] == [0.7, 0.7, None]
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {BEST_DEV_F1: 0.7}


def test_unreadable_records_file_is_named(tmp_path):
    run_dir = tmp_path / "run"
    bad = run_dir / "eval" / "test_best.records.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"split": "test"')
    with Tracker(TrackingConfig(backend="local"), run_dir, rank=0) as tracker:
        with pytest.raises(ValueError, match=str(bad)):
            tracker.log_outputs(step=1)
    assert bad.read_text() == '{"split": "test"'  # nothing rewritten
