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
