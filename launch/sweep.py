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
--mode online: the sweep is created on the W&B server and each array task runs one agent step
(any method, bayes included); a task's ranks share the run the agent hands to rank 0.
Nothing is submitted unless every run resolves; the array is one sbatch (all or nothing).

The W&B sweep agent lives here, not in the library: choosing a run's parameters is the sweep
controller's business, not tracking's, and this launcher is the one place besides
multieye_dist.tracking allowed to import wandb. AgentTask is defined in this script, which runs
as __main__, so submitit's cloudpickle ships the class by value; what it uses by import
(multieye_dist.cluster.TrainTask, multieye_dist.tracking, multieye_dist.sweeps) is installed on
the nodes, and it uses nothing from launch/common.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_slurm_options, check_run, slurm_options, undone_if_refused  # noqa: E402

from multieye_dist import sweeps  # noqa: E402
from multieye_dist.atomic import write_text  # noqa: E402
from multieye_dist.cluster import (  # noqa: E402
    SubmissionError,
    TrainTask,
    make_executor,
    submit_array,
)
from multieye_dist.config import load_config  # noqa: E402
from multieye_dist.resources import config_argument, path_argument  # noqa: E402
from multieye_dist.tracking import TrackingConfig, write_run_id  # noqa: E402

HANDOFF_WAIT_S = 900  # how long a task's other ranks wait for rank 0's agent step


# ----------------------------------------------------------------------------- online sweeps


def create_sweep(spec: Mapping[str, Any], tracking: TrackingConfig) -> str:
    """Register a sweep (a validated W&B sweep dict) on the W&B server; returns its id.
    Needs the network and WANDB_API_KEY in the environment."""
    import wandb

    return str(wandb.sweep(dict(spec), project=tracking.project, entity=tracking.entity))


def next_sweep_run(sweep_id: str, tracking: TrackingConfig) -> tuple[str, dict[str, Any]]:
    """One agent step: the run id and parameters the sweep controller chose next. The run is
    then continued by the training's Tracker with that id (``resume="allow"`` online), which
    logs the training itself."""
    import wandb

    from multieye_dist.tracking import wandb_settings

    got: dict[str, Any] = {}

    def take() -> None:
        run = wandb.init(settings=wandb_settings(wandb))
        got.update(run_id=run.id, params=dict(run.config))
        run.finish()

    wandb.agent(sweep_id, function=take, count=1, project=tracking.project, entity=tracking.entity)
    if "run_id" not in got:
        raise RuntimeError(f"sweep {sweep_id}: the agent got no run (sweep finished?)")
    return got["run_id"], got["params"]


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
    handoff = Path(sweep_dir) / "agents" / f"{job_id}.json"
    if rank == 0 and not handoff.is_file():
        run_id, params = next_run()
        out_dir = Path(sweep_dir) / "runs" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_id(out_dir, run_id)
        record = {"name": run_id, "params": params, "out_dir": str(out_dir)}
        write_text(handoff, json.dumps(record))
    deadline = time.monotonic() + timeout_s
    while not handoff.is_file():  # other ranks: wait for rank 0's agent step
        if time.monotonic() > deadline:
            raise RuntimeError(f"no sweep run handed over in {handoff} after {timeout_s:g} s")
        time.sleep(poll_s)
    return json.loads(handoff.read_text(encoding="utf-8"))


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
        import submitit

        job_env = submitit.JobEnvironment()
        record = hand_off(self.sweep_dir, str(job_env.job_id), job_env.global_rank, self._next)
        return TrainTask(self.config, self.train_overrides(record), self.max_requeues)()

    def _next(self) -> tuple[str, dict[str, Any]]:
        return next_sweep_run(self.sweep_id, load_config(self.config, self.overrides).tracking)

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
        import submitit

        return submitit.helpers.DelayedSubmission(
            AgentTask(self.sweep_id, self.config, self.overrides, self.sweep_dir, self.max_requeues)
        )


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
        "--config",
        type=config_argument,
        default="distill",
        help="base config every run starts from: a packaged config's name or a YAML file",
    )
    p.add_argument("--count", type=int, help="runs (random: required; grid: at most)")
    p.add_argument("--mode", choices=("offline", "online"), default="offline")
    p.add_argument("--seed", type=int, default=0, help="offline random sweeps")
    p.add_argument("--out", type=Path, help="sweep directory (default runs/sweeps/<file stem>)")
    add_slurm_options(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, world: int) -> tuple[dict, Path, list[dict]]:
    """The sweep spec, its directory and (offline) the checked runs; raises on bad input."""
    spec = sweeps.load_sweep(args.sweep)
    if not args.config.is_file():
        raise sweeps.SweepError(f"--config {args.config}: no such file")
    base = load_config(args.config, args.overrides)  # the base itself must resolve
    out = (args.out or Path("runs/sweeps") / args.sweep.stem).resolve()
    runs: list[dict] = []
    if args.mode == "offline":
        for i, params in enumerate(sweeps.expand(spec, args.count, args.seed)):
            name = f"run-{i:03d}"
            runs.append({"name": name, "params": params, "out_dir": str(out / "runs" / name)})
        sweeps.check_runs(args.config, args.overrides, [r["params"] for r in runs])
        for r in runs:  # as its array task's trainer will check it, in its own directory
            try:
                check_run(load_config(args.config, run_overrides(args, r)), world)
            except (ValueError, FileNotFoundError) as exc:
                raise sweeps.SweepError(f"{r['name']} ({r['params']}): {exc}") from None
    elif not args.count:
        raise sweeps.SweepError("--count: how many agent runs (array tasks) to submit")
    else:  # the controller picks each run's parameters later: the base, in no run directory
        check_run(base, world, in_run_dir=False)
    return spec, out, runs


def run_overrides(args: argparse.Namespace, run: Mapping[str, Any]) -> list[str]:
    """An offline run's overrides: the base's, its parameters, its directory and its name."""
    return [
        *args.overrides,
        *sweeps.overrides_for(run["params"]),
        f"train.out_dir={run['out_dir']}",
        f"tracking.run_name={run['name']}",
        f"tracking.tags={json.dumps([args.sweep.stem])}",
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
    }
    cfg = str(args.config.resolve())
    if args.mode == "offline":
        tasks = [TrainTask(cfg, run_overrides(args, r), args.max_requeues) for r in runs]
    else:
        base = load_config(args.config, args.overrides)
        manifest["sweep_id"] = create_sweep(spec, base.tracking)
        tasks = [
            AgentTask(manifest["sweep_id"], cfg, args.overrides, str(out), args.max_requeues)
            for _ in range(args.count)
        ]
    try:
        with undone_if_refused(out):
            executor = make_executor(out / "slurm", "local" if args.local else "slurm", opts)
            jobs = submit_array(executor, tasks)
    except SubmissionError as exc:
        print(f"sweep: the scheduler refused the array: {exc}", file=sys.stderr)
        return 2
    manifest["job_ids"] = [j.job_id for j in jobs]
    write_text(out / "sweep.json", json.dumps(manifest, indent=1))
    print(
        f"submitted {len(jobs)} run(s) of sweep {args.sweep.stem} ({args.mode}) as array "
        f"{jobs[0].job_id.split('_')[0]}; directory {out}; logs in {out / 'slurm'}"
    )
    if args.wait:
        failed = 0
        for job in jobs:
            try:
                job.results()
            except Exception as exc:  # one failed run does not hide the others
                failed += 1
                print(f"sweep: task {job.job_id} failed: {exc}", file=sys.stderr)
        print(sweeps.format_summary(*sweeps.summarize(out)))
        return 1 if failed else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        try:
            print(sweeps.format_summary(*sweeps.summarize(args.summary)))
        except FileNotFoundError as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.sweep:
        print("sweep: error: give --sweep FILE (or --summary SWEEP_DIR)", file=sys.stderr)
        return 2
    return submit(args)


if __name__ == "__main__":
    sys.exit(main())
