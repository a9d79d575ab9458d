# fgclf on a cloud GPU machine: CUDA wheels of torch from PyPI, the project and its extras.
#   docker build -t fgclf .
#   docker run --gpus all --rm -v $PWD/runs:/opt/fgclf/runs fgclf \
#       --config_file accelerate_configs/gpu1_bf16.yaml scripts/train_classifier.py --peft lora
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FGCLF_CACHE=/opt/fgclf-cache
WORKDIR /opt/fgclf
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY fgclf ./fgclf
RUN pip install -e '.[all]'
COPY . .
ENTRYPOINT ["accelerate", "launch"]
CMD ["scripts/train_classifier.py", "--help"]
