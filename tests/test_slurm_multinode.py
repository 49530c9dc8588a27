"""launch/submit.py across two Slurm nodes: the namespace nodes of launch/slurm_cluster.sh
(`up --nodes 2`: node1 and node2, each a slurmd in a network namespace of its own, partition
`multi`). Ranks on different nodes meet over the namespaces' bridge (MASTER_ADDR = the batch
host's address, gloo on the interface towards it), not over loopback.

A 2-node x 1-task job computes what a 1-node x 2-task job does (same world, same global batch,
same losses); a 2-node x 2-task job, preempted by Slurm's warning signal, requeues and resumes on
both nodes without losing or repeating a step. Without Slurm: the rendezvous variables a task
exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import launch, sacct_field, sacct_state, slurm_tiny, train_losses, train_steps, until

from multieye_dist.cluster.submit import interface_towards, rendezvous
from multieye_dist.track.records import RUN_ID_FILE

SAMPLES = 2 * 128  # slurm_tiny: 2 epochs x 128 samples, batch 8 per rank

# submitit logs each task's place at its start, in that task's own stdout log:
# JobEnvironment(job_id=7, hostname=vm, local_rank=1(2), node=1(2), global_rank=3(4))
_PLACE = re.compile(
    r"JobEnvironment\(job_id=\S+, hostname=\S+, local_rank=(\d+)\(\d+\), node=(\d+)\(\d+\), "
    r"global_rank=(\d+)\((\d+)\)\)"
)


def _submit(partition: str, nodes: int, tasks: int, shards: Path, out: Path, env: dict) -> str:
    """launch/submit.py: the tiny run as nodes x tasks ranks; returns the job id."""
    proc = launch(
        "submit.py",
        "--config",
        "configs/demo.yaml",
        "--nodes",
        str(nodes),
        "--tasks-per-node",
        str(tasks),
        "--partition",
        partition,
        "--time",
        "10",
        *slurm_tiny(shards, out),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{nodes} node(s) x {tasks} task(s)" in proc.stdout
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def _finished(job_id: str, out: Path, timeout: float = 240) -> None:
    def done():
        state = sacct_state(job_id)
        if state.startswith(("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_ME")):
            logs = "".join(p.read_text()[-1500:] for p in (out / "slurm").glob("*_log.err"))
            pytest.fail(f"job {job_id} ended {state}:\n{logs}")
        return state == "COMPLETED" and (out / "summary.json").is_file()

    until(f"job {job_id} to complete", done, timeout=timeout)


def _places(out: Path, job_id: str) -> dict[int, list[tuple[int, int, int, int]]]:
    """task -> (local_rank, node, global_rank, world) at each start, from the task's log."""
    return {
        int(p.name.split("_")[1]): [tuple(map(int, m)) for m in _PLACE.findall(p.read_text())]
        for p in (out / "slurm").glob(f"{job_id}_*_log.out")
    }


def _node_list(job_id: str) -> str:
    return sacct_field(job_id, "NodeList")


class _JobEnv:  # what rendezvous reads of submitit's JobEnvironment
    job_id, global_rank, num_tasks, local_rank, hostnames = "41", 3, 4, 1, ["nodeA", "nodeB"]


def test_rendezvous_meets_at_the_launch_node_address(monkeypatch):
    """MASTER_ADDR is the batch host's address (no name to resolve), and gloo binds to the
    interface towards it, which for a local address is the interface that holds it."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    env = rendezvous(_JobEnv())
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "20041",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice stands
    assert "GLOO_SOCKET_IFNAME" not in rendezvous(_JobEnv())
    monkeypatch.delenv("SLURM_LAUNCH_NODE_IPADDR")  # not under srun: the first host's name
    assert rendezvous(_JobEnv())["MASTER_ADDR"] == "nodeA"
    assert interface_towards("no-such-host.invalid") is None


@pytest.fixture(scope="module")
def two_by_one(slurm_cluster_multi, shards, wandb_home, tmp_path_factory):
    """A 2-node x 1-task job of the tiny run."""
    multi = tmp_path_factory.mktemp("multinode") / "2x1"
    multi_id = _submit(slurm_cluster_multi.multi_partition, 2, 1, shards, multi, wandb_home)
    _finished(multi_id, multi)
    return multi, multi_id


@pytest.mark.slow
@pytest.mark.slurm
def test_two_nodes_one_task_each_compute_what_one_node_two_tasks_do(two_by_one, two_task_job):
    """The same run as the 1-node x 2-task job of tests/test_launch.py (conftest's
    two_task_job, on the default partition: this host's node): the same losses."""
    multi, multi_id = two_by_one
    assert _node_list(multi_id) == "node[1-2]"
    # Global rank r ran on node r, as the only task there.
    assert _places(multi, multi_id) == {0: [(0, 0, 0, 2)], 1: [(0, 1, 1, 2)]}
    steps = SAMPLES // (2 * 8)
    assert train_steps(multi) == list(range(1, steps + 1))
    expected = train_losses(two_task_job)
    assert sorted(expected) == list(range(1, steps + 1))
    for step, loss in train_losses(multi).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.fixture(scope="module")
def preempted_two_by_two(slurm_cluster_multi, shards, wandb_home, tmp_path_factory):
    """A 2-node x 2-task job sent SIGUSR2 (Slurm's warning before a time limit or preemption)
    after 2 steps: it saves, requeues and runs to its end."""
    out = tmp_path_factory.mktemp("multinode") / "2x2"
    job_id = _submit(slurm_cluster_multi.multi_partition, 2, 2, shards, out, wandb_home)
    until(
        "2 training steps",
        lambda: (out / "metrics.jsonl").is_file() and len(train_steps(out)) >= 2,
        timeout=180,
    )
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _finished(job_id, out, timeout=300)
    return out, job_id


@pytest.mark.slow
@pytest.mark.slurm
def test_two_nodes_two_tasks_requeued_resume_on_both_nodes(preempted_two_by_two):
    out, job_id = preempted_two_by_two
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    assert "Restarts=1" in show.stdout
    assert _node_list(job_id) == "node[1-2]"
    # Both starts put global rank r on node r // 2 as its local rank r % 2: RANK != LOCAL_RANK
    # on node 1 (ranks 2 and 3 are its local ranks 0 and 1).
    places = _places(out, job_id)
    assert places == {r: [(r % 2, r // 2, r, 4)] * 2 for r in range(4)}
    steps = train_steps(out)
    assert steps == list(range(1, SAMPLES // (4 * 8) + 1))  # none lost, none repeated
    err = (out / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "stop requested" in err and "resumed from" in err
    # Global rank 0 alone writes the run directory's W&B run: one offline part per start (a
    # local rank 0 on node 1 writing too would make four).
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert len(list(out.glob(f"wandb/offline-run-*-{run_id}*"))) == 2
