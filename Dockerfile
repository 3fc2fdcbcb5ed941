# GPU image for cluster runs: one CUDA 12.8 stack, pinned in the `gpu` extra of pyproject.toml:
# torch 2.13.0 / torchvision 0.28.0 as +cu128 builds (PyTorch index), nvidia-dali-cuda120 2.4.0,
# faiss-gpu 1.15.1 (CUDA 12 runtime; same faiss as the CPU pin), submitit, wandb. The CUDA
# libraries come as pip wheels; the base image adds the hooks for the host's driver (>= 570).
#
#   docker build -t and_dist:gpu .
#   docker run --gpus all --ipc=host -v /data:/data and_dist:gpu \
#       torchrun --nproc_per_node=8 -m and_dist.train --config imagenet_alexnet data.root=/data/imagenet
#
# SLURM with enroot + pyxis: each srun task finds its rank, world size and rendezvous address in
# SLURM's variables (and_dist/platform/cluster.py), so no torchrun and no launcher is needed inside:
#   enroot import -o and_dist.sqsh dockerd://and_dist:gpu
#   srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --container-image=./and_dist.sqsh \
#        --container-mounts=/data:/data,$HOME/and_dist_runs:/root/and_dist_runs \
#        /opt/venv/bin/python -m and_dist.train --config imagenet_alexnet data.root=/data/imagenet \
#        run_dir=/root/and_dist_runs/alexnet resume=auto
# launch/slurm.py does the same with requeue on preemption, probe jobs and sweeps: from a login
# node, `python launch/slurm.py --config imagenet_alexnet --nodes 2 --gpus-per-node 8
# --container-image=/shared/and_dist.sqsh` runs every task in the image with /opt/venv/bin/python
# (out_dir, its log folder and data.root are mounted at the same paths; more with --container-mounts).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv && pip install --no-cache-dir uv==0.13.9

WORKDIR /app
COPY pyproject.toml ./
COPY and_dist ./and_dist
COPY configs ./configs
COPY launch ./launch
# The extra's GPU builds take the place of faiss-cpu and nvidia-dali-cuda130 (an override whose
# marker never holds drops a requirement); torch and torchvision resolve to their +cu128 wheels.
# Editable, so that and_dist finds configs/ beside it.
RUN printf '%s\n' "faiss-cpu; sys_platform == 'never'" "nvidia-dali-cuda130; sys_platform == 'never'" \
        "torch==2.13.0+cu128" "torchvision==0.28.0+cu128" > /tmp/gpu-overrides.txt \
    && uv pip install --extra-index-url https://download.pytorch.org/whl/cu128 \
        --index-strategy unsafe-best-match --override /tmp/gpu-overrides.txt -e '.[gpu]' \
    && python -c "import torch, torchvision, nvidia.dali, faiss, submitit, wandb; print(torch.__version__, torch.version.cuda, faiss.__version__)"

CMD ["python", "-m", "and_dist.train", "--config", "demo"]
