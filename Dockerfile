# syntax=docker/dockerfile:1
#
# tomectl images, one target each:
#
#   docker build --target cpu -t tomectl:cpu .        # compress, export --onnx, bench on CPU
#   docker build --target tensorrt -t tomectl:trt .   # + export --trt (needs an NVIDIA GPU at run time)
#
#   docker run --rm -v "$PWD/runs:/work/runs" tomectl:cpu \
#       compress deit_small_patch16_224 --r 13 --random-weights --out runs/deit_s_r13
#   docker run --rm -v "$PWD/runs:/work/runs" tomectl:cpu \
#       export runs/deit_s_r13 --onnx runs/deit_s_r13.onnx --batch 8
#   docker run --rm --gpus all -v "$PWD/runs:/work/runs" tomectl:trt \
#       export runs/deit_s_r13 --trt runs/deit_s_r13.engine --precision fp16
#
# The install steps are the README's: `pip install .`, and `pip install ".[trt]"` for TensorRT.
# TensorRT 10.x or 11.x is detected at run time: pick the NVIDIA base image (TRT_IMAGE) whose
# TensorRT your deployment runs (JetPack 6 devices stay on 10.x).

ARG PYTHON_IMAGE=python:3.11-slim
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

FROM ${PYTHON_IMAGE} AS cpu
# Set PIP_EXTRA_INDEX_URL (build arg) to a CPU-only torch wheel index for a much smaller image.
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/tomectl
COPY pyproject.toml README.md ./
COPY tomectl ./tomectl
RUN pip install .
# optional: graph simplification in `tomectl export`
RUN pip install onnxslim
WORKDIR /work
ENTRYPOINT ["tomectl"]
CMD ["--help"]

FROM ${TRT_IMAGE} AS tensorrt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/tomectl
COPY pyproject.toml README.md ./
COPY tomectl ./tomectl
# The base image ships the tensorrt Python package, which satisfies the trt extra.
RUN pip install ".[trt]"
RUN pip install onnxslim
WORKDIR /work
ENTRYPOINT ["tomectl"]
CMD ["--help"]
