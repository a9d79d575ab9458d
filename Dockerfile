# fgclf on a cloud GPU machine: the official PyTorch CUDA runtime image, the project with its GPU
# extras, `accelerate launch` as the entry point, a non-root user, data and runs as volumes.
#
# Build (from the repository root):
#   docker build -t fgclf .
#   docker build -t fgclf --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-devel .   # nvcc, for DeepSpeed's JIT-compiled ops
#
# Run on 1 GPU (the arguments are those of `accelerate launch`; `mkdir -p runs` first, or Docker
# creates the folder owned by root):
#   docker run --rm --gpus all --shm-size=16g \
#       -v /path/to/datasets:/data:ro -v "$PWD/runs":/opt/fgclf/runs -v fgclf-cache:/cache \
#       fgclf --config_file accelerate_configs/gpu1_bf16.yaml scripts/train_classifier.py \
#       --config configs/cub_resnet50_finetune.yaml --data.root /data/CUB_200_2011
#
# Run on 8 GPUs of one machine (DDP; --ipc=host gives DataLoader workers and NCCL the host's shared
# memory, which Docker otherwise caps at 64 MB):
#   docker run --rm --gpus all --ipc=host \
#       -v /path/to/datasets:/data:ro -v "$PWD/runs":/opt/fgclf/runs -v fgclf-cache:/cache \
#       fgclf --config_file accelerate_configs/ddp_8gpu_bf16.yaml scripts/train_classifier.py \
#       --config configs/cub_resnet50_finetune.yaml --data.root /data/CUB_200_2011
#
# Smoke test: the embedded toy dataset needs no /data mount (it is generated into /cache):
#   docker run --rm --gpus all --shm-size=8g -v "$PWD/runs":/opt/fgclf/runs fgclf --config_file accelerate_configs/gpu1_bf16.yaml \
#       scripts/train_classifier.py --config configs/toy_effnetlite0_finetune.yaml --train.epochs 1
# Any other command: --entrypoint, e.g. `docker run --rm -it --gpus all --entrypoint bash fgclf`.
#
# The container runs as `fgclf` (uid 1000). If the mounted runs folder belongs to another user, add
# `--user "$(id -u):$(id -g)"` (every cache lives under /cache, writable by any uid), or build with
# `--build-arg FGCLF_UID=$(id -u)`.

ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG FGCLF_UID=1000

# Every cache goes under /cache (a volume, writable by any uid) so that `--user` with another uid
# works without a writable HOME; USER keeps getpass.getuser() working for a uid missing from passwd.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    HOME=/home/fgclf \
    USER=fgclf \
    XDG_CACHE_HOME=/cache \
    FGCLF_CACHE=/cache/fgclf \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/cache/matplotlib \
    CUDA_CACHE_PATH=/cache/nv

# A non-root user. Ubuntu 24.04 based images already hold uid 1000 (`ubuntu`): that user goes first.
RUN if id -u "${FGCLF_UID}" >/dev/null 2>&1; then userdel --remove "$(id -nu "${FGCLF_UID}")"; fi \
 && useradd --create-home --home-dir /home/fgclf --uid "${FGCLF_UID}" --user-group --shell /bin/bash fgclf \
 && mkdir -p /opt/fgclf/runs /data /cache \
 && chown fgclf:fgclf /opt/fgclf/runs /data \
 && chmod 1777 /cache

WORKDIR /opt/fgclf

# The base image's torch and torchvision stay: their exact versions (e.g. 2.14.1+cu130), read from the
# installed packages, go into a pip constraints file, so resolving the project's `torch<=2.14.1` and
# the extras' own torch requirements can never replace the torch built for this CUDA. Extras: `all`
# (peft, datasets, diffusers, torch-fidelity) and `deepspeed` (deepspeed, transformers); DeepSpeed
# pre-builds no ops; its own ops (FusedAdam, CPU Adam for offload) compile at first use and need nvcc,
# i.e. the -devel base (see the build line above). Later `pip install`s inside the container can pass
# the same `-c /opt/torch-constraints.txt`.
# Only the package and its metadata are copied before the (slow) install, so editing scripts or
# configs does not invalidate the install layer.
COPY pyproject.toml README.md ./
COPY fgclf ./fgclf
RUN python -c "from importlib.metadata import version as v; [print(p + '==' + v(p)) for p in ('torch', 'torchvision')]" \
        > /opt/torch-constraints.txt \
 && cat /opt/torch-constraints.txt \
 && python -m pip install -c /opt/torch-constraints.txt '.[all,deepspeed]' \
 && rm -rf build fgclf.egg-info

COPY scripts ./scripts
COPY configs ./configs
COPY accelerate_configs ./accelerate_configs
COPY bench ./bench

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${FGCLF_UID}
VOLUME ["/data", "/opt/fgclf/runs", "/cache"]

ENTRYPOINT ["accelerate", "launch"]
CMD ["scripts/train_classifier.py", "--help"]
