"""Offline Bayesian sweeps (multieye_dist.cluster.search, launch/sweep.py): the W&B parameter spec
mapped to optuna, bad specs named, the study's ask/tell and its pruning hook, which runs
--resubmit-failed picks, --max-parallel; on the real Slurm cluster, a 12-trial sweep throttled
to 3 tasks whose later trials are checked to come from the earlier ones' results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import load_script, shipped_by_value, spawn_single, tiny_overrides, until

from multieye_dist.cluster import search, sweeps
from multieye_dist.cluster.sweeps import SweepError

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
METRIC = {"name": "dev/best_f1", "goal": "maximize"}


def _spec(**params) -> dict:
    spec = {"method": "bayes", "metric": METRIC, "parameters": params}
    sweeps.validate(spec, "s.yaml")
    return spec


SPEC = _spec(
    **{
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "optim.weight_decay": {"min": 0.0, "max": 0.1},
        "train.epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
        "loss.alpha": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        "data.batch_size": {"values": [4, 8]},
        "optim.warmup_epochs": {"value": 0},
    }
)
SPEC["tpe"] = {"n_startup_trials": 2}


@pytest.fixture(scope="module")
def launcher():
    """launch/sweep.py as a module."""
    yield load_script("sweep.py", "sweep_launcher_s")
    del sys.modules["sweep_launcher_s"]


# ----------------------------------------------------------------------------- the sweep file


def test_parameters_map_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution as C
    from optuna.distributions import FloatDistribution as F
    from optuna.distributions import IntDistribution as I  # noqa: E741

    got = search.distributions(search.parse_params(SPEC))
    assert got == {
        "optim.lr": F(1e-4, 1e-2, log=True),
        "optim.weight_decay": F(0.0, 0.1),  # min/max floats: uniform, as W&B infers
        "train.epochs": I(1, 3),
        "loss.alpha": F(0.0, 1.0, step=0.25),
        "data.batch_size": C((4, 8)),
    }  # the constant is not sampled: it joins every trial's parameters
    inferred = search.parse_params(_spec(**{"train.epochs": {"min": 1, "max": 4}}))
    assert inferred[0].kind == "int_uniform"
    assert search.corner_runs(SPEC)[0]["optim.lr"] == 1e-4
    assert search.corner_runs(SPEC)[1]["optim.lr"] == 1e-2


LR = {"optim.lr": {"min": 0.1, "max": 1.0}}
HB = "hyperband"
BAD = [
    ({"optim.lr": {"distribution": "normal"}}, {}, "parameters.optim.lr: distribution 'normal'"),
    ({"optim.lr": {"min": 0.1, "max": 0.1}}, {}, "parameters.optim.lr: uniform needs numbers"),
    (
        {"optim.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}},
        {},
        "parameters.optim.lr: log_uniform_values needs min > 0",
    ),
    (
        {"loss.alpha": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.3}},
        {},
        "parameters.loss.alpha.q: 0.3 must be > 0 and divide",
    ),
    ({"optim.betas": {"values": [[0.9, 0.99]]}}, {}, "parameters.optim.betas.values: [0.9, 0.99]"),
    ({"optim.lr": {"value": 0.1}}, {}, "bayes needs at least one that varies"),
    (LR, {"metric": {"name": "dev/loss", "goal": "minimize"}}, "offline bayes maximizes"),
    (LR, {"tpe": {"n_startup": 3}}, "tpe.n_startup: unknown"),
    (LR, {"tpe": {"n_startup_trials": 0}}, "tpe.n_startup_trials=0"),
    (LR, {"early_terminate": {"type": "envelope"}}, "early_terminate: expected {type: hyperband"),
    (LR, {"early_terminate": {"type": HB, "s": 2}}, "early_terminate.s: not supported"),
    (LR, {"early_terminate": {"type": HB, "eta": 1}}, "early_terminate.eta=1"),
    (
        LR,
        {"early_terminate": {"type": HB, "min_iter": 2, "max_iter": 2}},
        "early_terminate.max_iter=2",
    ),
]


@pytest.mark.parametrize("params,extra,message", BAD)
def test_bad_specs_are_named(params, extra, message):
    spec = {**_spec(**params), **extra}
    with pytest.raises(SweepError, match="s.yaml: ") as info:
        search.check_spec(spec, "s.yaml")
    assert message in str(info.value)


def test_hyperband_maps_wandb_keys():
    spec = {
        **SPEC,
        "early_terminate": {"type": "hyperband", "min_iter": 2, "max_iter": 8, "eta": 2},
    }
    assert search.pruner_options(spec) == {
        "min_resource": 2,
        "max_resource": 8,
        "reduction_factor": 2,
    }
    pruner = search.make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert isinstance(search.make_pruner(SPEC), optuna.pruners.NopPruner)


# ----------------------------------------------------------------------------- the study


def _score(params: dict) -> float:
    return -abs(params["optim.lr"] - 3e-3) - params["optim.weight_decay"]


def test_ask_tell_is_deterministic_given_the_history(tmp_path):
    """Two studies with the same seed and the same told results propose the same trials; the
    start-up trials differ from one another (each is seeded by its number), and after them
    the proposals differ from what the same seeded sampler draws without a history."""
    runs = {}
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        got = []
        for _ in range(5):
            r = search.ask(d, SPEC, seed=7)
            search.tell(d, r["trial"], "complete", _score(r["params"]))
            got.append(r)
        runs[name] = got
    assert runs["a"] == runs["b"]
    assert [r["trial"] for r in runs["a"]] == [0, 1, 2, 3, 4]
    assert runs["a"][0]["params"] != runs["a"][1]["params"]
    assert all(r["params"]["optim.warmup_epochs"] == 0 for r in runs["a"])  # the constant
    states = search.trial_states(tmp_path / "a")
    assert [s["user_attrs"]["seen"] for s in states.values()][2] == [
        [0, "COMPLETE"],
        [1, "COMPLETE"],
    ]
    for n in (2, 3, 4):  # after the 2 start-up trials: TPE with a history
        alone = search.propose(optuna.create_study(direction="maximize"), SPEC, 7, number=n)
        assert alone.params != {
            k: v for k, v in runs["a"][n]["params"].items() if k in alone.params
        }
    search.tell(tmp_path / "a", 4, "complete", 0.5)  # already told: left as it was
    assert search.trial_states(tmp_path / "a")[4]["value"] == _score(runs["a"][4]["params"])


def test_trial_hook_reports_epochs_and_prunes_a_bad_run(tmp_path):
    spec = {
        **SPEC,
        "early_terminate": {"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 3},
    }
    for f1 in (0.8, 0.7, 0.6):  # eta 3, max/min 2: one bracket, its rung at epoch 1
        r = search.ask(tmp_path, spec, 0)
        search.TrialHook(str(tmp_path), spec, r["trial"])(1, f1)
        search.tell(tmp_path, r["trial"], "complete", f1)
    bad, good = search.ask(tmp_path, spec, 0), search.ask(tmp_path, spec, 0)
    # rung 0 keeps the top third: 0.1 is below it, 0.9 is the best so far
    assert search.TrialHook(str(tmp_path), spec, bad["trial"])(1, 0.1) is True
    assert search.TrialHook(str(tmp_path), spec, good["trial"])(1, 0.9) is False
    search.tell(tmp_path, bad["trial"], "pruned")
    states = search.trial_states(tmp_path)
    assert states[bad["trial"]]["state"] == "pruned"
    assert states[bad["trial"]]["intermediate"] == {1: 0.1}
    assert states[good["trial"]]["state"] == "running"


def test_resubmit_selection(tmp_path):
    def run(name: str, summary: dict | None) -> dict:
        out = tmp_path / "runs" / name
        out.mkdir(parents=True)
        if summary is not None:
            (out / "summary.json").write_text(json.dumps(summary))
        return {"name": name, "params": {}, "out_dir": str(out)}

    done = run("run-000", {"best_dev_f1": 0.5, "step": 8})
    pruned = run("run-001", {"pruned": True, "dev/best_f1": 0.1})
    mid = run("run-002", {"dev/best_f1": 0.4})  # dev evaluated, never finished
    crashed = run("run-003", {"dev/best_f1": 0.4, "exit_code": 1})
    never = run("run-004", None)
    grid = {"method": "grid", "runs": [done, pruned, mid, crashed, never]}
    assert sweeps.unfinished(grid, tmp_path) == ([mid, crashed, never], 0)
    assert sweeps.run_finished(pruned["out_dir"])  # a pruned run is finished, not failed

    trials = tmp_path / "trials"
    trials.mkdir()
    records = [  # trial 3 continued run trial-0001 after a failure; trial 2 is running
        {"trial": 0, "name": "trial-0000", **{k: done[k] for k in ("params", "out_dir")}},
        {"trial": 1, "name": "trial-0001", "params": {}, "out_dir": mid["out_dir"]},
        {"trial": 2, "name": "trial-0002", "params": {}, "out_dir": never["out_dir"]},
        {"trial": 3, "name": "trial-0001", "params": {}, "out_dir": mid["out_dir"]},
    ]
    for i, rec in enumerate(records):
        (trials / f"100_{i}.json").write_text(json.dumps(rec))
    bayes = {"method": "bayes", "count": 5, "runs": []}
    runs, fresh = sweeps.unfinished(bayes, tmp_path)
    assert [r["trial"] for r in runs] == [2, 3]  # the latest attempt of each unfinished run
    assert fresh == 2  # 5 tasks, 3 run directories handed out


def test_resubmit_fails_stale_trials_and_continues_parameters(tmp_path):
    first = search.ask(tmp_path, SPEC, 0)  # its task died: still RUNNING
    assert search.fail_running(tmp_path, [first["trial"]]) == [0]
    again = search.ask(tmp_path, SPEC, 0, continues={**first, "name": "trial-0000"})
    assert again["trial"] == 1 and again["params"] == first["params"]
    states = search.trial_states(tmp_path)
    assert states[0]["state"] == "fail" and states[1]["user_attrs"]["continues"] == 0


class _Job:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


def test_resubmit_submits_one_array_of_the_unfinished(launcher, monkeypatch, capsys, tmp_path):
    """--resubmit-failed on a bayes sweep whose trial 0 finished, trial 1's task died (RUNNING)
    and 1 of 3 tasks never asked: one array of 2 tasks (trial 1's run continued, 1 new trial),
    trial 1 failed in the study, the new job ids appended to sweep.json. Then the same on a
    finished grid sweep: nothing to do."""
    out = tmp_path / "sw"
    (out / "trials").mkdir(parents=True)
    for i in range(2):  # two tasks asked; the third never did
        rec = search.ask(out, SPEC, 0)
        run_dir = out / "runs" / f"trial-{i:04d}"
        rec.update(name=run_dir.name, out_dir=str(run_dir), job_id=f"5_{i}")
        (out / "trials" / f"5_{i}.json").write_text(json.dumps(rec))
    (out / "runs" / "trial-0000").mkdir(parents=True)
    (out / "runs" / "trial-0000" / "summary.json").write_text(json.dumps({"best_dev_f1": 0.3}))
    search.tell(out, 0, "complete", 0.3)
    manifest = {
        "name": "sw", "method": "bayes", "metric": METRIC, "mode": "offline",
        "config": str(ROOT / "configs/demo.yaml"), "overrides": ["train.epochs=1"],
        "runs": [], "dir": str(out), "spec": SPEC, "seed": 0, "count": 3,
        "job_ids": ["5_0", "5_1", "5_2"],
    }  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(manifest))
    submitted = []
    monkeypatch.setattr(launcher, "make_executor", lambda *a: None)
    monkeypatch.setattr(launcher, "live_arrays", lambda ids: [])
    monkeypatch.setattr(
        launcher,
        "submit_array",
        lambda ex, tasks: submitted.extend(tasks) or [_Job(f"9_{i}") for i in range(len(tasks))],
    )
    assert launcher.main(["--resubmit-failed", str(out)]) == 0
    assert "resubmitted 2 run(s) of sweep sw as array 9: trial-0001 and 1 new trial(s)" in (
        capsys.readouterr().out
    )
    assert [type(t).__name__ for t in submitted] == ["BayesTask", "BayesTask"]
    assert submitted[0].continues["trial"] == 1 and submitted[1].continues is None
    assert submitted[0].overrides == ["train.epochs=1"]
    assert search.trial_states(out)[1]["state"] == "fail"
    after = json.loads((out / "sweep.json").read_text())
    assert after["job_ids"] == ["5_0", "5_1", "5_2", "9_0", "9_1"]
    assert after["resubmissions"] == [
        {"job_ids": ["9_0", "9_1"], "runs": ["trial-0001"], "new_trials": 1}
    ]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files

    done = tmp_path / "grid"
    run_dir = done / "runs" / "run-000"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"best_dev_f1": 0.5}))
    grid = {**manifest, "method": "grid", "dir": str(done), "job_ids": ["7_0"]}
    grid["runs"] = [{"name": "run-000", "params": {}, "out_dir": str(run_dir)}]
    (done / "sweep.json").write_text(json.dumps(grid))
    assert launcher.main(["--resubmit-failed", str(done)]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out
    monkeypatch.setattr(launcher, "live_arrays", lambda ids: ["7"])
    assert launcher.main(["--resubmit-failed", str(done)]) == 2
    assert "array(s) 7 of this sweep are still queued or running" in capsys.readouterr().err


def test_bayes_task_is_shipped_by_value(launcher, tmp_path):
    """Launched, launch/sweep.py is __main__: cloudpickle ships BayesTask by value; a fresh
    interpreter loads it, requeues it with its trial record, and its hook pickles too."""
    task = launcher.BayesTask("c.yaml", ["train.epochs=1"], str(tmp_path), SPEC, 3, "t", 2)
    code = (
        "import pickle, sys\n"
        "task, hook = pickle.loads(sys.stdin.buffer.read())\n"
        "again = task.checkpoint().function\n"
        "assert type(again).__name__ == 'BayesTask' and again.max_requeues == 2\n"
        "assert (again.seed, again.spec, hook.number) == (3, task.spec, 4)\n"
        "rec = {'name': 'trial-0004', 'params': {'optim.lr': 0.001}, 'out_dir': '/o'}\n"
        "print(again.train_overrides(rec))\n"
    )
    hook = search.TrialHook(str(tmp_path), SPEC, 4)
    out = shipped_by_value(launcher, (task, hook), code, tmp_path)
    assert out.split() == [
        "['train.epochs=1',", "'optim.lr=0.001',", "'train.out_dir=/o',",
        "'tracking.run_name=trial-0004',", "'tracking.tags=[\"t\"]']",
    ]  # fmt: skip


def test_bayes_sweep_refusals(launcher, capsys, tmp_path):
    import yaml

    sweep, out = tmp_path / "b.yaml", tmp_path / "sw"
    sweep.write_text(yaml.safe_dump(SPEC))
    args = ["--sweep", str(sweep), "--config", "configs/demo.yaml", "--out", str(out), "--local"]
    assert launcher.main(args) == 2
    assert "--count: how many trials" in capsys.readouterr().err
    out.mkdir()
    search.load_study(out)  # a sweep directory that has a study already
    assert launcher.main([*args, "--count", "2"]) == 2
    assert "already holds a study (study.journal): continue it with --resubmit-failed" in (
        capsys.readouterr().err
    )
    bad = {**SPEC, "parameters": {"optim.nosuchkey": {"min": 0.1, "max": 0.2}}}
    sweep.write_text(yaml.safe_dump(bad))
    args[5] = str(tmp_path / "o2")  # --out
    assert launcher.main([*args, "--count", "2"]) == 2
    assert "optim.nosuchkey" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_max_parallel(launcher, capsys, tmp_path):
    args = launcher.parse_args(["--sweep", str(tmp_path), "--max-parallel", "3"])
    assert launcher.slurm_options(args, job_name="x").array_parallelism == 3
    assert launcher.slurm_options(launcher.parse_args([]), "x").array_parallelism == 64
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: dev/f1}\nparameters:\n  optim.lr: {values: [1]}\n"
    )
    assert launcher.main(["--sweep", str(sweep), "--max-parallel", "0"]) == 2
    assert "--max-parallel=0: must be >= 1" in capsys.readouterr().err


def test_library_imports_without_optuna(tmp_path):
    """The package, the trainer and grid/random sweeps work without optuna; a bayes sweep then
    says what to install."""
    code = (
        "import sys; sys.modules['optuna'] = None\n"
        "import multieye_dist.cli, multieye_dist.train.loop, multieye_dist.cluster.submit\n"
        "from multieye_dist.cluster import search, sweeps\n"
        f"spec = {SPEC!r}\n"
        "search.check_spec(spec)\n"
        "assert len(sweeps.expand({**spec, 'method': 'random'}, 3)) == 3\n"
        "try:\n"
        f"    search.ask({str(tmp_path)!r}, spec, 0)\n"
        "except sweeps.SweepError as e:\n"
        "    assert 'pip install optuna' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- pruning a run


def _pruned_run(rank: int, world: int, shards: str, out: str, calls: str) -> None:
    from multieye_dist.config import load_config
    from multieye_dist.train.loop import run

    seen = []

    def on_dev_f1(epoch: int, f1: float) -> bool:
        seen.append([epoch, f1])
        return epoch == 1

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        tiny_overrides(shards, out, "train.stage=distill", "loss.name=fundus-only",
                       "train.epochs=3", "data.samples_per_epoch=16", "tracking.backend=local"),
    )  # fmt: skip
    summary = run(cfg, on_dev_f1=on_dev_f1)
    Path(calls).write_text(json.dumps({"seen": seen, "summary": summary}))


@pytest.mark.slow
def test_a_pruned_run_saves_stops_and_says_so(shards, tmp_path):
    out, calls = tmp_path / "run", tmp_path / "calls.json"
    spawn_single(_pruned_run, str(shards), str(out), str(calls))
    got = json.loads(calls.read_text())
    assert [e for e, _ in got["seen"]] == [1]  # asked once, after epoch 1's evaluation
    assert got["summary"]["pruned"] is True and got["summary"]["stopped"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned"] is True and summary["best_dev_f1"] == got["seen"][0][1]
    assert sweeps.run_finished(out)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step00000002"]
    assert not (out / "last.safetensors").exists()  # no test evaluation of a pruned run


# ----------------------------------------------------------------------------- on Slurm


def _launch(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "sweep.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _replayed(final: dict, seen: list, number: int) -> dict:
    """What the sweep's sampler proposes for trial `number` from the trials `seen` as they were
    then (states at that time; params and results from the finished study)."""
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(direction="maximize")
    for n, state in seen:
        t = final[n]
        kw = {"params": t.params, "distributions": t.distributions, "state": TrialState[state]}
        if state in ("COMPLETE", "PRUNED"):
            kw.update(value=t.value, intermediate_values=t.intermediate_values)
        study.add_trial(create_trial(**kw))
    return search.propose(study, BAYES, 0, number=number).params


BAYES = _spec(
    **{
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "optim.weight_decay": {"min": 0.0, "max": 0.1},
    }
)
BAYES["tpe"] = {"n_startup_trials": 3}
TRIALS = 8  # each a real (tiny) training: ~20 CPU-seconds, mostly start-up and evaluation
BAYES["early_terminate"] = {"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 2}


def _elapsed(array_id: str) -> str:
    got = subprocess.run(
        ["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "ElapsedRaw"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    secs = [int(x) for x in got.stdout.split()]
    return f"{len(secs)} tasks, {sum(secs)} s in all, {min(secs)}-{max(secs)} s each"


def _max_overlap(array_id: str) -> int:
    def times() -> list[str] | None:
        got = subprocess.run(
            ["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,Start,End"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        lines = got.stdout.split()
        # slurmctld hands a task's end to the accounting daemon a moment after it ends: until
        # then sacct says "Unknown"
        return None if any("Unknown" in ln for ln in lines) else lines

    events = []
    for line in until("every task's start and end in sacct", times, timeout=60):
        _, start, end = line.split("|")
        events += [(datetime.fromisoformat(start), 1), (datetime.fromisoformat(end), -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@pytest.mark.slurm
def test_offline_bayes_sweep_with_max_parallel(slurm_cluster, shards, tmp_path):
    import yaml

    sweep, out = tmp_path / "bayes.yaml", tmp_path / "sweep"
    sweep.write_text(yaml.safe_dump(BAYES))
    base = [
        o for o in tiny_overrides(shards, "unused", "train.stage=distill", "loss.name=fundus-only",
                                  "train.epochs=1", "data.samples_per_epoch=8",
                                  "tracking.backend=local")
        if not o.startswith("train.out_dir")
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = _launch(
        "--sweep", str(sweep), "--config", "configs/demo.yaml", "--out", str(out),
        "--partition", slurm_cluster.partition, "--time", "10", "--count", str(TRIALS),
        "--max-parallel", "3", "--wait", *base,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "sweep.json").read_text())
    print(
        f"{TRIALS} trials in {took:.0f} s; tasks: {_elapsed(manifest['job_ids'][0].split('_')[0])}"
    )
    array = manifest["job_ids"][0].split("_")[0]
    show = subprocess.run(["scontrol", "show", "job", array], capture_output=True, text=True)
    assert "ArrayTaskThrottle=3" in show.stdout
    assert _max_overlap(array) <= 3

    final = {t.number: t for t in search.load_study(out).get_trials()}
    assert sorted(final) == list(range(TRIALS))
    assert {t.state.name for t in final.values()} <= {"COMPLETE", "PRUNED"}
    for rec in sweeps.bayes_records(out):  # the study and the runs agree
        summary = json.loads((Path(rec["out_dir"]) / "summary.json").read_text())
        t = final[rec["trial"]]
        assert Path(rec["out_dir"]).name == f"trial-{rec['trial']:04d}"
        assert bool(summary.get("pruned")) == (t.state.name == "PRUNED")
        if t.state.name == "COMPLETE":
            assert t.value == summary["best_dev_f1"]
        assert {k: rec["params"][k] for k in t.params} == t.params

    guided = 0
    for n, t in final.items():
        seen = t.user_attrs["seen"]
        assert [s[0] for s in seen] == list(range(n))  # every earlier trial, none later
        assert _replayed(final, seen, n) == t.params  # proposed from exactly that history
        alone = _replayed(final, [], n)  # the same seeded sampler with no history
        done = sum(state in ("COMPLETE", "PRUNED") for _, state in seen)
        if done >= BAYES["tpe"]["n_startup_trials"]:
            guided += 1
            assert alone != t.params  # TPE used the results, not the seed alone
        else:
            assert alone == t.params  # a start-up trial: random from its seed
    # at most 3 at once: trial k saw at least k - 2 finished, so TPE drew every trial from
    # n_startup + 2 on (the first ones too, if they happened to start later)
    assert guided >= TRIALS - (BAYES["tpe"]["n_startup_trials"] + 2)

    summary = _launch("--summary", str(out))
    assert summary.returncode == 0, summary.stderr
    rows = [ln.split() for ln in summary.stdout.splitlines() if ln.startswith("trial-")]
    assert len(rows) == TRIALS and {r[3] for r in rows} <= {"complete", "pruned"}
    again = _launch("--resubmit-failed", str(out), "--partition", slurm_cluster.partition)
    assert again.returncode == 0, again.stderr
    assert "nothing to resubmit" in again.stdout
