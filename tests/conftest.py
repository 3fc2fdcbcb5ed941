"""The suite tests CPU semantics (gloo ranks, bit-exact resumes) wherever it runs: the training
processes it starts see no GPU, also on a GPU machine, where one process per rank on one card
would not even start. This process keeps the GPUs it found (the CUDA-only tests use them, and
tests/test_gpu.py hands them to its runs through AND_TEST_GPUS)."""
import os

import torch

if torch.cuda.is_available():                      # initialises CUDA here before the mask below
    os.environ.setdefault("AND_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""
