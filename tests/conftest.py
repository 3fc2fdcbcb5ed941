"""The suite tests CPU semantics (gloo ranks, bit-exact resumes) wherever it runs: the training
processes it starts see no GPU, also on a GPU machine, where one process per rank on one card
would not even start. This process keeps the GPUs it found (the CUDA-only tests use them, and
tests/test_gpu.py hands them to its runs through AND_TEST_GPUS)."""
import os

import torch

if torch.cuda.is_available():
    os.environ.setdefault("AND_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
    # CUDA initialised and the count taken before the mask below: torch caches the count only once
    # CUDA is initialised, and before 2.12 (the GPU machine has 2.11) an uncached device_count()
    # re-reads CUDA_VISIBLE_DEVICES through NVML and would answer 0 after the mask
    torch.cuda.init()
    torch.cuda.device_count()
os.environ["CUDA_VISIBLE_DEVICES"] = ""


# ------------------------------------------------- fixtures built once per session (issue 32 item 7)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def big_jpeg_tree(tmp_path_factory):
    """test_prepare.make_tree's large noisy JPEGs (slow to make), once for every test that reads
    them (prepare and prepare --pack only read their source)."""
    from test_prepare import make_tree
    return make_tree(tmp_path_factory.mktemp("big-jpeg-tree") / "src")


FINISHED_DEMO = ["--config", "demo", "name=small", "data.demo_train=500", "data.demo_test=200", "curriculum.rounds=3",
                 "train.epochs_per_round=2", "eval.knn_k=20", "log.wandb_mode=offline", "train.threads=1",
                 "log.every_steps=1"]


@pytest.fixture(scope="session")
def finished_demo_run(tmp_path_factory):
    """A finished 3-round demo run (FINISHED_DEMO: 500 train images, 2 epochs a round, wandb
    offline), trained once for the tests that only read one (test_train, test_init_from,
    test_plots): (its run directory, its stdout). Copy it before changing it."""
    import subprocess
    import sys
    from helpers import ENV, REPO
    from and_dist.run import rundir
    out = tmp_path_factory.mktemp("finished-demo")
    proc = subprocess.run([sys.executable, "-m", "and_dist.train", *FINISHED_DEMO, f"out_dir={out}"], cwd=REPO,
                          text=True, capture_output=True, timeout=600, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = rundir.runs_of(out / "small")
    return run, proc.stdout
