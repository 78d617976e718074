"""SLURM environment mapping (issue 11, item 8): a bare multi-node `srun` must rendezvous on the first
node of the job, not on 127.0.0.1 (which made every node wait for a master of its own)."""
from __future__ import annotations

import subprocess

import pytest

from megabd3.errors import UserError
from megabd3.parallel import init as pinit
from megabd3.training import launch


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07],gpu2", ["node01", "node02", "node03", "node04", "node07", "gpu2"]),
    ("a-[1-3]", ["a-1", "a-2", "a-3"]),
    ("n[001-002]x", ["n001x", "n002x"]),
    ("gpu2,node[9-11]", ["gpu2", "node9", "node10", "node11"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("x[7]", ["x7"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node[a-c]", "node[5-2]", ""])
def test_bad_nodelist_is_a_user_error(bad):
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch.expand_nodelist(bad)


def test_scontrol_is_preferred_when_present(monkeypatch):
    seen = []

    def run(cmd, **kw):  # noqa: ANN001, ANN003
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="alpha\nbeta\n", stderr="")

    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/scontrol" if name == "scontrol" else None)
    monkeypatch.setattr(launch.subprocess, "run", run)
    assert launch.slurm_hostnames("weird{syntax}") == ["alpha", "beta"]
    assert seen == [["scontrol", "show", "hostnames", "weird{syntax}"]]


def test_failing_scontrol_falls_back_to_the_parser(monkeypatch):
    def run(cmd, **kw):  # noqa: ANN001, ANN003
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(launch.subprocess, "run", run)
    assert launch.slurm_hostnames("node[3-4]") == ["node3", "node4"]


def _srun_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "123456",
           "SLURM_NTASKS_PER_NODE": "8(x2)"}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)


def test_multi_node_srun_uses_the_first_node():
    env = _srun_env(SLURM_JOB_NODELIST="gpu[017-018]", SLURM_JOB_NUM_NODES="2")
    assert launch.map_slurm_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_SIZE"]) == ("9", "1", "16", "8")
    assert env["MASTER_ADDR"] == "gpu017"
    assert env["MASTER_PORT"] == str(10000 + 123456 % 50000)  # step 0
    other_step = _srun_env(SLURM_JOB_NODELIST="gpu[017-018]", SLURM_STEP_ID="1")
    launch.map_slurm_env(other_step)
    assert other_step["MASTER_PORT"] != env["MASTER_PORT"]  # concurrent srun steps: different ports


def test_step_nodelist_wins_over_the_job_nodelist():
    env = _srun_env(SLURM_JOB_NODELIST="gpu[1-4]", SLURM_STEP_NODELIST="gpu[3-4]", SLURM_STEP_NUM_TASKS="8")
    launch.map_slurm_env(env)
    assert env["MASTER_ADDR"] == "gpu3" and env["WORLD_SIZE"] == "8"


def test_single_node_uses_loopback():
    env = _srun_env(SLURM_JOB_NODELIST="gpu017", SLURM_JOB_NUM_NODES="1")
    launch.map_slurm_env(env)
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_exported_master_is_kept_and_torchrun_env_is_untouched():
    env = _srun_env(SLURM_JOB_NODELIST="gpu[1-2]", MASTER_ADDR="head", MASTER_PORT="777")
    launch.map_slurm_env(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "777")
    env = _srun_env(SLURM_JOB_NODELIST="gpu[1-2]", RANK="3")
    assert not launch.map_slurm_env(env) and "MASTER_ADDR" not in env


def test_multi_node_without_nodelist_is_a_user_error():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch.map_slurm_env(_srun_env(SLURM_NNODES="2"))


def test_init_reads_slurm_through_the_same_mapping(monkeypatch):
    import os

    env = _srun_env(SLURM_JOB_NODELIST="node[07-08]", SLURM_JOB_NUM_NODES="2")
    monkeypatch.setattr(os, "environ", env)  # a private environment: nothing leaks into later tests
    assert pinit._env_rank() == (9, 1, 16)
    assert env["MASTER_ADDR"] == "node07"
    assert not hasattr(pinit, "_first_host")  # one parser only (megabd3.training.launch)
