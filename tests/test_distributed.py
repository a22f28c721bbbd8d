"""When train.py joins other processes: the environment variables that say so, and clear errors."""

from __future__ import annotations

import pytest

from moela.parallel.distributed import DistributedConfigError, distributed_args, initialize


def test_single_process_environments_do_nothing():
    assert distributed_args({}) is None
    assert distributed_args({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1", "TPU_WORKER_HOSTNAMES": "h0"}) is None
    assert initialize({}) is False


def test_explicit_coordinator_gives_all_three_arguments():
    env = {"MOELA_COORDINATOR": "10.0.0.1:1234", "MOELA_NUM_PROCESSES": "4", "MOELA_PROCESS_ID": "3"}
    assert distributed_args(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


@pytest.mark.parametrize(
    "env",
    [
        {"MOELA_DISTRIBUTED": "1"},
        {"JAX_COORDINATOR_ADDRESS": "h0:1"},
        {"SLURM_NTASKS": "8"},
        {"OMPI_COMM_WORLD_SIZE": "2"},
        {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"},
    ],
)
def test_clusters_jax_detects_call_initialize_without_arguments(env):
    assert distributed_args(env) == {}


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"MOELA_COORDINATOR": "h:1", "MOELA_NUM_PROCESSES": "2"}, "MOELA_PROCESS_ID must be an integer"),
        ({"MOELA_COORDINATOR": "h:1", "MOELA_NUM_PROCESSES": "two", "MOELA_PROCESS_ID": "0"}, "MOELA_NUM_PROCESSES"),
        ({"MOELA_COORDINATOR": "h:1", "MOELA_NUM_PROCESSES": "2", "MOELA_PROCESS_ID": "2"}, r"must be in \[0, "),
    ],
)
def test_incomplete_settings_are_refused(env, needle):
    with pytest.raises(DistributedConfigError, match=needle):
        distributed_args(env)
