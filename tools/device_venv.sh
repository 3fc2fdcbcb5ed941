#!/usr/bin/env bash
# A venv with the lent GPU machine's versions (torch 2.11.0, torchvision 0.26.0, triton 3.6.0), then
# the session's CPU smoke in it. Why: the device runs older torch than .venv (2.13), and the first
# lease should not be where a 2.11 difference shows up.
#
# PyPI has only the CUDA build of torch 2.11.0 for Linux, and `import torch` loads its CUDA
# libraries, so the nvidia-* wheels come too (about 4 GB installed; the CPU path never uses them).
# The device has Python 3.12; this builds with whatever python3 is here (3.11 on the CPU machines).
#
# Usage: tools/device_venv.sh [VENV (default .venv-device)] [OUT (default /tmp/device-smoke)]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-device}
out=${2:-/tmp/device-smoke}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# The device's torch stack, and the rest of what it has that the session imports (no DALI, faiss,
# wandb or submitit); the machine-wide pip constraints allow these versions.
"$venv/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 \
    pyyaml==6.0.3 tqdm==4.70.1 pillow==13.0.0 numpy==2.4.6 scipy==1.17.1 matplotlib==3.11.2 \
    xxhash==4.1.0 pytest==9.2.0
"$venv/bin/python" -c 'import sys, torch, torchvision, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "triton", triton.__version__)'
du -sh "$venv"
rm -rf "$out"
PYTHONPATH="$PWD/tests/blocked_imports:$PWD" CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 \
    "$venv/bin/python" benchmarks/gpu_session.py --device cpu --quick --out "$out"
