#!/usr/bin/env python
"""Run a W&B sweep as ONE Slurm job array: every array task is one run on its own allocation.

    python launch/sweep.py --sweep configs/sweeps/distill.yaml --count 16 --gpus-per-node 8 \
        --partition gpu teacher.checkpoint=runs/teacher/best.safetensors
    python launch/sweep.py --summary runs/sweeps/distill        # the runs, best first

--mode offline (default; no account, or no network on the compute nodes): grid and random
sweeps are expanded here, deterministically (--seed), every run is checked as the trainer checks
it (config, backbone, teacher export, concept bank, batch geometry, a resume's compatibility, no
live training in its directory), and the array is submitted with each task's overrides; runs log
offline (`wandb sync` later). A refused array (ours or sbatch's) writes nothing.
Offline bayes: an optuna study in the sweep directory (study.journal, multieye_dist.cluster.search):
each array task's rank 0 asks it for a trial, trains it in runs/trial-NNNN, reports each dev
macro-F1 (the sweep's early_terminate: Hyperband pruning) and tells it the best one.
--mode online: the sweep is created on the W&B server and each array task runs one agent step
(any method, bayes included); a task's ranks share the run the agent hands to rank 0.
Nothing is submitted unless every run resolves; the array is one sbatch (all or nothing).

--max-parallel N: at most N array tasks run at once (Slurm's %N throttle).
--resubmit-failed SWEEP_DIR: one new array of the runs without a finished summary (same
overrides, same run directories: they resume from their checkpoints; a bayes run continues
under a new trial, and the tasks that never got a trial ask for one); give the Slurm options
again, not the overrides. Refused while a task of the sweep is still queued or running.

The tasks live here: AgentTask (an online sweep's agent step, through the W&B sweep controller
of multieye_dist.track.tracking, which owns wandb) and BayesTask (an offline bayes trial,
through multieye_dist.cluster.search, which owns optuna); submitit stays multieye_dist.cluster's
import. This script runs as __main__, so submitit's cloudpickle ships the classes by value; what
they use by import (multieye_dist.cluster, multieye_dist.track.tracking) is installed on the
nodes, and they use nothing from launch/common.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_slurm_options, check_run, slurm_options, undone_if_refused  # noqa: E402

from multieye_dist.cluster import summaries, sweeps  # noqa: E402
from multieye_dist.cluster.submit import (  # noqa: E402
    SubmissionError,
    TrainTask,
    job_place,
    make_executor,
    resubmission,
    submit_array,
)
from multieye_dist.config import load_config  # noqa: E402
from multieye_dist.core.atomic import write_text  # noqa: E402
from multieye_dist.core.resources import config_argument, path_argument  # noqa: E402
from multieye_dist.track.records import write_run_id
from multieye_dist.track.tracking import (  # noqa: E402
    create_wandb_sweep,
    next_wandb_sweep_run,
)

HANDOFF_WAIT_S = 900  # how long a task's other ranks wait for rank 0's agent step


# ----------------------------------------------------------------------------- online sweeps


def hand_off(
    sweep_dir: str | Path,
    job_id: str,
    rank: int,
    next_run: Callable[[], tuple[str, dict[str, Any]]],
    *,
    timeout_s: float = HANDOFF_WAIT_S,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """The run an array task trains: ``{"name", "params", "out_dir"}``.

    Rank 0 of a task that has none yet calls ``next_run`` (the agent step) once, persists the
    run id in the run's directory (atomically, where the Tracker reads it) and then writes
    ``<sweep_dir>/agents/<job_id>.json`` (atomically, so a rank never reads half of it); the
    other ranks wait for that file. A requeued task finds its file and continues the same run.
    """

    def make() -> dict[str, Any]:
        run_id, params = next_run()
        out_dir = Path(sweep_dir) / "runs" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_id(out_dir, run_id)
        return {"name": run_id, "params": params, "out_dir": str(out_dir)}

    handoff = Path(sweep_dir) / "agents" / f"{job_id}.json"
    return shared_record(handoff, rank, make, timeout_s=timeout_s, poll_s=poll_s)


def shared_record(
    path: Path,
    rank: int,
    make: Callable[[], dict[str, Any]],
    *,
    timeout_s: float = HANDOFF_WAIT_S,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Rank 0 of a task makes the record once and writes it to `path` (atomically, so that a
    rank never reads half of it); the other ranks wait for it; a requeued task reads it again."""
    if rank == 0 and not path.is_file():
        write_text(path, json.dumps(make()))
    deadline = time.monotonic() + timeout_s
    while not path.is_file():  # other ranks: wait for rank 0's agent step
        if time.monotonic() > deadline:
            raise RuntimeError(f"no sweep run handed over in {path} after {timeout_s:g} s")
        time.sleep(poll_s)
    return json.loads(path.read_text(encoding="utf-8"))


class AgentTask:
    """An online sweep's array task: rank 0 asks the W&B sweep controller for the next run's
    parameters (:func:`hand_off`), and all ranks train that run as :class:`TrainTask`, so
    preemption and requeue work the same (a requeued task continues the same run)."""

    def __init__(
        self,
        sweep_id: str,
        config: str,
        overrides: list[str],
        sweep_dir: str,
        max_requeues: int = 3,
    ):
        self.sweep_id, self.config, self.overrides = sweep_id, config, list(overrides)
        self.sweep_dir, self.max_requeues = sweep_dir, max_requeues

    def __call__(self) -> dict[str, Any]:
        job_id, rank = job_place()
        record = hand_off(self.sweep_dir, job_id, rank, self._next)
        return TrainTask(self.config, self.train_overrides(record), self.max_requeues)()

    def _next(self) -> tuple[str, dict[str, Any]]:
        return next_wandb_sweep_run(
            self.sweep_id, load_config(self.config, self.overrides).tracking
        )

    def train_overrides(self, record: Mapping[str, Any]) -> list[str]:
        """The base overrides, the run's parameters, its directory, and W&B online (the run
        the controller made is continued, under the id persisted in ``out_dir``)."""
        return [
            *self.overrides,
            *sweeps.overrides_for(record["params"]),
            f"train.out_dir={record['out_dir']}",
            "tracking.backend=wandb",
            "tracking.wandb.mode=online",
        ]

    def checkpoint(self, *args: Any, **kwargs: Any):
        return resubmission(
            AgentTask(self.sweep_id, self.config, self.overrides, self.sweep_dir, self.max_requeues)
        )


# ----------------------------------------------------------------------------- offline bayes


class BayesTask:
    """An offline bayes sweep's array task: rank 0 asks the study for a trial
    (:func:`multieye_dist.cluster.search.ask`, under the study's lock), hands it to the other ranks
    (``<sweep_dir>/trials/<job_id>.json``: a requeued task keeps its trial), all ranks train it
    as :class:`TrainTask` with the trial's pruning hook, and rank 0 tells the study how it
    ended: its best dev macro-F1, pruned, or failed (the error is raised again).
    ``continues``: the record of a run that did not finish (``--resubmit-failed``): a new trial
    takes over its parameters and its directory, and the run resumes from its checkpoint."""

    def __init__(
        self,
        config: str,
        overrides: list[str],
        sweep_dir: str,
        spec: dict[str, Any],
        seed: int,
        tag: str,
        max_requeues: int = 3,
        continues: dict[str, Any] | None = None,
    ):
        self.config, self.overrides, self.sweep_dir = config, list(overrides), sweep_dir
        self.spec, self.seed, self.tag, self.max_requeues = spec, seed, tag, max_requeues
        self.continues = continues

    def __call__(self) -> dict[str, Any]:
        from multieye_dist.cluster import search

        job_id, rank = job_place()
        path = Path(self.sweep_dir) / "trials" / f"{job_id}.json"
        record = shared_record(path, rank, lambda: self.ask(job_id))
        hook = search.TrialHook(self.sweep_dir, self.spec, record["trial"])
        task = TrainTask(self.config, self.train_overrides(record), self.max_requeues, hook)
        try:
            summary = task()
        except Exception:  # not SystemExit: submitit's requeue exits, the trial goes on
            if rank == 0:
                with contextlib.suppress(Exception):  # the training's error is the one to see
                    search.tell(Path(self.sweep_dir), record["trial"], "fail")
            raise
        if rank == 0 and summary.get("pruned"):
            search.tell(Path(self.sweep_dir), record["trial"], "pruned")
        elif rank == 0 and not summary.get("stopped"):
            search.tell(Path(self.sweep_dir), record["trial"], "complete", summary["best_dev_f1"])
        return summary

    def ask(self, job_id: str) -> dict[str, Any]:
        """A trial for this task: its number, parameters, run name and directory."""
        from multieye_dist.cluster import search

        got = search.ask(Path(self.sweep_dir), self.spec, self.seed, self.continues)
        name = self.continues["name"] if self.continues else f"trial-{got['trial']:04d}"
        out_dir = self.continues["out_dir"] if self.continues else None
        out_dir = out_dir or str(Path(self.sweep_dir) / "runs" / name)
        return {**got, "name": name, "out_dir": out_dir, "job_id": job_id}

    def train_overrides(self, record: Mapping[str, Any]) -> list[str]:
        return run_overrides(self.overrides, self.tag, record)

    def checkpoint(self, *args: Any, **kwargs: Any):
        return resubmission(
            BayesTask(
                self.config, self.overrides, self.sweep_dir, self.spec, self.seed, self.tag,
                self.max_requeues, self.continues,
            )
        )  # fmt: skip


# ----------------------------------------------------------------------------- the launcher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sweep",
        type=path_argument,
        help="W&B sweep file (YAML; configs/sweeps/distill.yaml is the packaged one)",
    )
    p.add_argument("--summary", type=Path, metavar="SWEEP_DIR", help="list a sweep's runs")
    p.add_argument(
        "--resubmit-failed",
        type=Path,
        metavar="SWEEP_DIR",
        help="submit again, as one array, the runs of an offline sweep without a finished summary",
    )
    p.add_argument(
        "--config",
        type=config_argument,
        default="distill",
        help="base config every run starts from: a packaged config's name or a YAML file",
    )
    p.add_argument("--count", type=int, help="runs (random, bayes: required; grid: at most)")
    p.add_argument("--mode", choices=("offline", "online"), default="offline")
    p.add_argument("--seed", type=int, default=0, help="offline random and bayes sweeps")
    p.add_argument(
        "--max-parallel",
        type=int,
        metavar="N",
        help="at most N array tasks run at once (Slurm's array throttle, %%N; default 64)",
    )
    p.add_argument("--out", type=Path, help="sweep directory (default runs/sweeps/<file stem>)")
    add_slurm_options(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, world: int) -> tuple[dict, Path, list[dict]]:
    """The sweep spec, its directory and (offline grid/random) the checked runs; raises on bad
    input."""
    spec = sweeps.load_sweep(args.sweep)
    if not args.config.is_file():
        raise sweeps.SweepError(f"--config {args.config}: no such file")
    base = load_config(args.config, args.overrides)  # the base itself must resolve
    out = (args.out or Path("runs/sweeps") / args.sweep.stem).resolve()
    runs: list[dict] = []
    if args.mode == "offline" and spec["method"] == "bayes":
        check_bayes(args, spec, out)
        check_run(base, world, in_run_dir=False)  # each trial's directory is made on its node
    elif args.mode == "offline":
        for i, params in enumerate(sweeps.expand(spec, args.count, args.seed)):
            name = f"run-{i:03d}"
            runs.append({"name": name, "params": params, "out_dir": str(out / "runs" / name)})
        sweeps.check_runs(args.config, args.overrides, [r["params"] for r in runs])
        for r in runs:  # as its array task's trainer will check it, in its own directory
            check_named_run(
                args.config, run_overrides(args.overrides, args.sweep.stem, r), r, world
            )
    elif not args.count:
        raise sweeps.SweepError("--count: how many agent runs (array tasks) to submit")
    else:  # the controller picks each run's parameters later: the base, in no run directory
        check_run(base, world, in_run_dir=False)
    return spec, out, runs


def check_bayes(args: argparse.Namespace, spec: dict, out: Path) -> None:
    from multieye_dist.cluster import search

    search.check_spec(spec, str(args.sweep))
    search.require_optuna()
    if not args.count or args.count < 1:
        raise sweeps.SweepError(
            "--count: how many trials (array tasks) an offline bayes sweep runs"
        )
    if (out / search.JOURNAL).exists():
        raise sweeps.SweepError(
            f"{out} already holds a study ({search.JOURNAL}): continue it with --resubmit-failed "
            f"{out}, or give another --out"
        )
    # each parameter's extremes (and every choice) against the config's names and ranges
    sweeps.check_runs(args.config, args.overrides, search.corner_runs(spec))


def check_named_run(config: Path, overrides: list[str], run: Mapping[str, Any], world: int) -> None:
    try:
        check_run(load_config(config, overrides), world)
    except (ValueError, FileNotFoundError) as exc:
        raise sweeps.SweepError(f"{run['name']} ({run['params']}): {exc}") from None


def run_overrides(base: list[str], tag: str, run: Mapping[str, Any]) -> list[str]:
    """An offline run's overrides: the base's, its parameters, its directory and its name."""
    return [
        *base,
        *sweeps.overrides_for(run["params"]),
        f"train.out_dir={run['out_dir']}",
        f"tracking.run_name={run['name']}",
        f"tracking.tags={json.dumps([tag])}",
    ]


def offline_tasks(manifest: dict, runs: list[dict], fresh: int, max_requeues: int) -> list:
    """The array tasks of an offline sweep: one per run (grid/random: its TrainTask; bayes: a
    BayesTask continuing it), and for bayes `fresh` more that ask the study for new trials."""
    cfg, base, tag = manifest["config"], manifest["overrides"], manifest["name"]
    if manifest["method"] != "bayes":
        return [TrainTask(cfg, run_overrides(base, tag, r), max_requeues) for r in runs]
    sweep_dir, spec, seed = str(manifest["dir"]), manifest["spec"], manifest["seed"]
    return [
        BayesTask(cfg, base, sweep_dir, spec, seed, tag, max_requeues, continues)
        for continues in [*runs, *[None] * fresh]
    ]


def submit(args: argparse.Namespace) -> int:
    try:
        opts = slurm_options(args, job_name=f"sweep-{args.sweep.stem}")
        spec, out, runs = plan(args, opts.nodes * opts.tasks_per_node)
    except (ValueError, FileNotFoundError) as exc:  # SweepError, ConfigError are ValueErrors
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    manifest = {
        "name": args.sweep.stem,
        "method": spec["method"],
        "metric": spec["metric"],
        "mode": args.mode,
        "config": str(args.config.resolve()),
        "overrides": args.overrides,
        "runs": runs,
        "dir": str(out),
        "spec": spec,
        "seed": args.seed,
        "count": args.count,
    }
    if args.mode == "offline":
        n_fresh = args.count if spec["method"] == "bayes" else 0
        tasks = offline_tasks(manifest, runs, n_fresh, args.max_requeues)
    else:
        base = load_config(args.config, args.overrides)
        manifest["sweep_id"] = create_wandb_sweep(spec, base.tracking)
        cfg = manifest["config"]
        tasks = [
            AgentTask(manifest["sweep_id"], cfg, args.overrides, str(out), args.max_requeues)
            for _ in range(args.count)
        ]

    def new_study() -> None:  # the empty study: --summary works at once
        if args.mode == "offline" and spec["method"] == "bayes":
            from multieye_dist.cluster import search

            out.mkdir(parents=True, exist_ok=True)
            search.load_study(out, spec)

    jobs = queue_array(out, args, opts, tasks, new_study)
    if jobs is None:
        return 2
    manifest["job_ids"] = [j.job_id for j in jobs]
    write_text(out / "sweep.json", json.dumps(manifest, indent=1))
    print(
        f"submitted {len(jobs)} run(s) of sweep {args.sweep.stem} ({args.mode}) as array "
        f"{jobs[0].job_id.split('_')[0]} (at most {opts.array_parallelism} at once); "
        f"directory {out}; logs in {out / 'slurm'}"
    )
    return wait_for(jobs, out) if args.wait else 0


def queue_array(
    out: Path, args: argparse.Namespace, opts, tasks: list, first: Callable[[], None] | None = None
) -> list | None:
    """`tasks` as ONE array job into `out` (after `first`, inside the same undo); None, with the
    scheduler's refusal printed, if it is refused: what the attempt made in `out` is removed."""
    try:
        with undone_if_refused(out):
            if first is not None:
                first()
            executor = make_executor(out / "slurm", "local" if args.local else "slurm", opts)
            return submit_array(executor, tasks)
    except SubmissionError as exc:
        print(f"sweep: the scheduler refused the array: {exc}", file=sys.stderr)
        return None


def wait_for(jobs: list, out: Path) -> int:
    failed = 0
    for job in jobs:
        try:
            job.results()
        except Exception as exc:  # one failed run does not hide the others
            failed += 1
            print(f"sweep: task {job.job_id} failed: {exc}", file=sys.stderr)
    print(summaries.format_summary(*summaries.summarize(out)))
    return 1 if failed else 0


def live_arrays(job_ids: list[str]) -> list[str]:
    """The sweep's arrays that Slurm still has queued or running (none without Slurm)."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return []
    got = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=60)
    if got.returncode != 0:
        raise sweeps.SweepError(f"squeue failed: {got.stderr.strip()}")
    queued = set(got.stdout.split())
    return sorted({j.split("_")[0] for j in job_ids} & queued)


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a sweep directory (no sweep.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def plan_resubmit(args: argparse.Namespace, out: Path, world: int):
    """(manifest, the unfinished runs, how many new bayes trials); raises on bad input."""
    manifest = {**read_manifest(out), "dir": str(out)}
    if manifest["mode"] != "offline":
        raise sweeps.SweepError(f"{out}: an online sweep: its W&B controller hands out the runs")
    if args.overrides or args.sweep:
        raise sweeps.SweepError(
            "--resubmit-failed: the runs keep the sweep's file and overrides (sweep.json); give "
            "only Slurm options"
        )
    live = [] if args.local else live_arrays(manifest["job_ids"])
    if live:
        raise sweeps.SweepError(
            f"{out}: array(s) {', '.join(live)} of this sweep are still queued or running: wait "
            "for them (or scancel them) before resubmitting"
        )
    runs, fresh = sweeps.unfinished(manifest, out)
    cfg = Path(manifest["config"])
    if manifest["method"] != "bayes":
        for r in runs:  # a training into it must not be live; a resume must be compatible
            check_named_run(
                cfg, run_overrides(manifest["overrides"], manifest["name"], r), r, world
            )
    return manifest, runs, fresh


def resubmit(args: argparse.Namespace) -> int:
    out = args.resubmit_failed.resolve()
    try:
        opts = slurm_options(args, job_name=f"sweep-{out.name}")
        manifest, runs, fresh = plan_resubmit(args, out, opts.nodes * opts.tasks_per_node)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if not runs and not fresh:
        print(f"nothing to resubmit: every run of sweep {manifest['name']} in {out} is finished")
        return 0
    if manifest["method"] == "bayes":
        from multieye_dist.cluster import search

        # their tasks are gone (nothing of the sweep is queued): RUNNING is no longer true
        search.fail_running(out, [r["trial"] for r in runs])
    tasks = offline_tasks(manifest, runs, fresh, args.max_requeues)
    jobs = queue_array(out, args, opts, tasks)
    if jobs is None:
        return 2
    new_ids = [j.job_id for j in jobs]
    manifest["job_ids"] = [*manifest["job_ids"], *new_ids]
    manifest.setdefault("resubmissions", []).append(
        {"job_ids": new_ids, "runs": [r["name"] for r in runs], "new_trials": fresh}
    )
    write_text(out / "sweep.json", json.dumps(manifest, indent=1))  # atomic: all or nothing
    names = ", ".join(r["name"] for r in runs) or "-"
    extra = f" and {fresh} new trial(s)" if fresh else ""
    print(
        f"resubmitted {len(jobs)} run(s) of sweep {manifest['name']} as array "
        f"{new_ids[0].split('_')[0]}: {names}{extra}; directory {out}"
    )
    return wait_for(jobs, out) if args.wait else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        try:
            print(summaries.format_summary(*summaries.summarize(args.summary)))
        except (ValueError, FileNotFoundError) as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.resubmit_failed:
        return resubmit(args)
    if not args.sweep:
        print(
            "sweep: error: give --sweep FILE (or --summary / --resubmit-failed SWEEP_DIR)",
            file=sys.stderr,
        )
        return 2
    return submit(args)


if __name__ == "__main__":
    sys.exit(main())
