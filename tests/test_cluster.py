"""Where a process sits in its job, from torchrun's or SLURM's variables (no scontrol needed)."""
import pytest

from and_dist.platform.cluster import first_host, placement


@pytest.mark.parametrize("nodes,first", [
    ("gpu[03-05,9]", "gpu03"), ("node7", "node7"), ("a[1,4],b2", "a1"), ("cn-[010-012]", "cn-010"),
    ("host1,host2", "host1"), ("rack[1-2]-node[01-04]", "rack1-node01"), ("a[1-2]b,c", "a1b"),
])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    p = placement(env)
    assert (p.rank, p.world, p.local_rank, p.master_addr, p.master_port) == (3, 8, 1, "n1", 1234)


def test_slurm_tasks_alone_give_a_full_placement():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0"}
    p = placement(env)
    assert (p.rank, p.world, p.local_rank, p.master_addr) == (9, 16, 1, "gpu07")
    assert p.master_port == placement(dict(env, SLURM_PROCID="0")).master_port  # same on every task
    assert 1024 < p.master_port < 32768                                     # not an ephemeral port
    batch_shell = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}      # sbatch script, salloc
    assert placement(batch_shell).world == 1 and placement(batch_shell).rank == 0
    assert placement({}) == placement({"WORLD_SIZE": ""})
    assert placement({}).world == 1
