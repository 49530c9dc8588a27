"""The Slurm cluster of launch/slurm_cluster.sh, through sbatch and through submitit; its
namespace nodes (`up --nodes`), and what `purge` leaves of them: nothing.

Every test runs real jobs on real slurmctld/slurmd daemons (the `slurm_cluster` fixture boots
them); job states come from sacct, as submitit reads them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from helpers import sacct_state, until

from multieye_dist.cluster.submit import SlurmOptions, make_executor

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# The jobs unpickle these functions in a fresh interpreter that cannot import this test module
# (pytest put tests/ on sys.path, the job does not): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _square(x: int) -> int:
    return x * x


def _rank() -> int:
    return submitit.JobEnvironment().global_rank


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _ended(state: str) -> str:
    """`state` if it is a final one, else "" (sacct may not know the job for a moment)."""
    return "" if state in ("", "PENDING", "RUNNING", "COMPLETING", "REQUEUED") else state


def _executor(folder: Path, cluster):
    return make_executor(folder, "slurm", SlurmOptions(partition=cluster.partition, time_min=5))


def test_sbatch_job_completes_with_its_output(slurm_cluster, tmp_path):
    res = _run(
        "sbatch",
        "--parsable",
        "-o",
        str(tmp_path / "out-%j.txt"),
        "--wrap",
        'echo "hello from job $SLURM_JOB_ID on partition $SLURM_JOB_PARTITION"',
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert until("the job to end", lambda: _ended(sacct_state(job_id))) == "COMPLETED"
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert out == f"hello from job {job_id} on partition debug\n"


def test_submitit_job_returns_its_result_andsacct_state(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster).submit(_square, 7)
    assert job.result() == 49
    # submitit's own state query (sacct through slurmdbd) sees the job finish.
    state = until(
        "submitit to see COMPLETED",
        lambda: (s := job.watcher.get_state(job.job_id, mode="force")) == "COMPLETED" and s,
        timeout=15,
    )
    assert state == "COMPLETED"


def test_submitit_two_tasks_have_ranks_0_and_1(slurm_cluster, tmp_path):
    ex = _executor(tmp_path, slurm_cluster)
    ex.update_parameters(tasks_per_node=2)
    job = ex.submit(_rank)
    assert job.results() == [0, 1]


def test_submitit_array_of_four(slurm_cluster, tmp_path):
    jobs = _executor(tmp_path, slurm_cluster).map_array(_square, [1, 2, 3, 4])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one Slurm array
    assert [j.result() for j in jobs] == [1, 4, 9, 16]


def test_cancelled_job_is_seen_as_done(slurm_cluster, tmp_path):
    """A job killed from outside writes no result: only the sacct state ends the wait."""
    job = _executor(tmp_path, slurm_cluster).submit(_sleep, 120)
    until("the job to run", lambda: sacct_state(job.job_id) == "RUNNING")
    assert _run("scancel", job.job_id).returncode == 0
    until("submitit to see the job done", lambda: job.done(force_check=True), timeout=20)
    assert job.state.startswith("CANCELLED")


def test_up_is_idempotent_and_status_reports_running(slurm_cluster):
    before = slurm_cluster.run("status")
    assert before.returncode == 0, before.stdout + before.stderr
    again = slurm_cluster.run("up")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    after = slurm_cluster.run("status")
    assert after.returncode == 0
    assert "running" in after.stdout
    # The same daemons (pids) answer: nothing was restarted.
    pids = [line for line in before.stdout.splitlines() if "pid" in line]
    assert len(pids) == 5 + slurm_cluster.multi_nodes  # and one slurmd per namespace node
    assert pids == [line for line in after.stdout.splitlines() if "pid" in line]


def test_requeued_job_runs_again(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.txt"
    res = _run(
        "sbatch",
        "--parsable",
        "--open-mode=append",  # a requeued job would otherwise truncate its first start's line
        "-o",
        str(out),
        "--wrap",
        "echo start ${SLURM_RESTART_COUNT:-0}; sleep 60",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    try:

        def starts() -> list[str]:
            text = out.read_text() if out.exists() else ""
            return [line for line in text.splitlines() if line.startswith("start")]

        until("the first start", lambda: starts() == ["start 0"])
        res = _run("scontrol", "requeue", job_id)
        assert res.returncode == 0, res.stderr
        # A requeued job waits cred_expire (10 s on this cluster) before it may start again.
        until("the second start", lambda: len(starts()) == 2, timeout=40)
        assert starts() == ["start 0", "start 1"]
        show = _run("scontrol", "show", "job", job_id).stdout
        assert "Restarts=1" in show
    finally:
        _run("scancel", job_id)


def test_unknown_partition_is_refused_by_sbatch(slurm_cluster):
    res = _run("sbatch", "-p", "no-such-partition", "--wrap", "true")
    assert res.returncode != 0
    assert "invalid partition specified: no-such-partition" in res.stderr


def _ours(net_id: str) -> dict[str, list[str]]:
    """The namespaces and interfaces named after a cluster's network id."""
    netns = _run("ip", "netns", "list").stdout.split()
    links = [ln.split(": ")[1].split("@")[0] for ln in _run("ip", "-o", "link").stdout.splitlines()]
    return {
        "netns": [n for n in netns if n.startswith(f"multieye-{net_id}-")],
        "links": [n for n in links if n.startswith((f"mebr{net_id}", f"me{net_id}v"))],
    }


def test_two_namespace_nodes_run_a_job_and_purge_leaves_nothing(slurm_cluster_multi):
    """A cluster of its own (next to the session's: other ports, other /24) with two namespace
    nodes: a 2-node job's tasks see two network stacks; `purge` ends every process and removes
    the namespaces, the veths, the bridge and the state directory."""
    import tempfile

    # Not under tmp_path: munged wants every directory above its socket searchable by all.
    state = Path(tempfile.mkdtemp(prefix="multieye-slurm-"))
    env = {**os.environ, "MULTIEYE_SLURM_DIR": str(state)}
    script = ["bash", str(slurm_cluster_multi.script)]
    up = subprocess.run([*script, "up", "--nodes", "2"], env=env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        net = dict(ln.split("=", 1) for ln in (state / "etc" / "net.env").read_text().split())
        assert net["NET_ID"] not in slurm_cluster_multi.conf.parent.joinpath("net.env").read_text()
        made = _ours(net["NET_ID"])
        assert len(made["netns"]) == 2 and len(made["links"]) == 3  # 2 veths, 1 bridge
        pids = [int(p.read_text()) for p in (state / "run").glob("slurmd-node*.pid")]
        assert len(pids) == 2
        conf = {**env, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
        job = subprocess.run(
            ["srun", "-p", "multi", "-N", "2", "-l", "sh", "-c",
             'echo "$SLURMD_NODENAME $(ip -4 -o addr show eth0 | cut -d" " -f7)"'],
            env=conf, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert job.returncode == 0, job.stderr
        assert sorted(job.stdout.splitlines()) == [
            f"0: node1 {net['NET_PREFIX']}.2/24",
            f"1: node2 {net['NET_PREFIX']}.3/24",
        ]
    finally:
        purge = subprocess.run([*script, "purge"], env=env, capture_output=True, text=True)
    assert purge.returncode == 0, purge.stderr
    assert _ours(net["NET_ID"]) == {"netns": [], "links": []}
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not state.exists()
