"""A sweep's results, best first: each run's last value of the sweep's metric (from its
``metrics.jsonl``) and, for an offline Bayesian sweep, its trial's state in the optuna study.
Above both :mod:`multieye_dist.cluster.sweeps` (the manifest and its runs) and
:mod:`multieye_dist.cluster.search` (the study), which do not import each other's way back.
"""

from __future__ import annotations

import json
from pathlib import Path

from multieye_dist.cluster.search import trial_states
from multieye_dist.cluster.sweeps import bayes_records
from multieye_dist.track.records import read_metrics


def summarize(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """(manifest, rows best first): each run's final value of the sweep's metric, from its
    metrics.jsonl (the last value logged), or None when the run has not logged it (yet)."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a sweep directory (no sweep.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    metric, goal = manifest["metric"]["name"], manifest["metric"].get("goal", "maximize")
    states: dict[int, dict] = {}
    if manifest["method"] == "bayes" and manifest["mode"] == "offline":
        runs, states = bayes_records(sweep_dir), trial_states(sweep_dir)
    else:
        runs = manifest["runs"] or [  # online sweeps: the runs the agents were handed
            json.loads(f.read_text(encoding="utf-8"))
            for f in sorted((sweep_dir / "agents").glob("*.json"))
        ]
    rows = []
    for run in runs:
        run_dir = Path(run["out_dir"])
        value, step = None, None
        if (run_dir / "metrics.jsonl").is_file():
            for rec in read_metrics(run_dir):
                if metric in rec:
                    value, step = rec[metric], rec["step"]
        row = {**run, "value": value, "step": step}
        if states:  # complete, pruned, fail or running, as the study has it
            row["state"] = states.get(run["trial"], {}).get("state", "unknown")
        rows.append(row)
    sign = -1.0 if goal == "maximize" else 1.0
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0)))
    return manifest, rows


def format_summary(manifest: dict, rows: list[dict]) -> str:
    metric = manifest["metric"]["name"]
    names = list(rows[0]["params"]) if rows else []
    state = bool(rows) and "state" in rows[0]
    head = f"{'run':<12}{metric:>12}{'step':>8}" + (f"  {'state':<9}" if state else "  ")
    head += "  ".join(names)
    lines = [
        f"sweep {manifest['name']} ({manifest['method']}, {metric} "
        f"{manifest['metric'].get('goal', 'maximize')}), {len(rows)} runs",
        head,
    ]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.4f}"
        params = "  ".join(f"{r['params'][n]}" for n in names)
        step = r["step"] if r["step"] is not None else "-"
        mid = f"  {r['state']:<9}" if state else "  "
        lines.append(f"{r['name']:<12}{v:>12}{step:>8}{mid}{params}")
    return "\n".join(lines)
