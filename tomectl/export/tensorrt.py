"""TensorRT engines from a validated ONNX graph, for TensorRT 10.x and 11.x (detected at run time).

The two majors build reduced precision differently:

- TensorRT 10.x (weakly typed networks, still what JetPack 6 devices run): fp16 and int8 are
  builder flags; int8 is calibrated from images with an entropy calibrator (IInt8EntropyCalibrator2).
- TensorRT 11.x removed those flags: every network is strongly typed, so fp16 means handing the
  parser an ONNX graph that is already in half precision (converted here with onnxruntime's
  float16 converter, inputs and outputs kept in fp32), and int8 means Q/DQ nodes in the graph.
  tomectl writes no Q/DQ graph yet, so int8 on TensorRT 11 is refused with a clear message.

In both, the few layers that only *decide* which tokens merge (key normalisation, the similarity
product, the max/argmax and the sorts) stay in fp32: fp16 rounding makes near-ties of the
similarity flip, and a flipped decision moves whole tokens. fp32 engines are built with TF32
disabled, so fp32 means fp32.

TensorRT's ONNX parser refuses ScatterND with a reduction, runs ScatterElements with a reduction
only through its plugin library, and takes TopK with sorted=1 only (and K < 3840). `parse_problems` checks
a graph for these without a GPU; the "scatter" merge formulation sums rows with ScatterND
(reduction=add), so TensorRT takes the "onehot" one, which has no Scatter at all (its default).

Every engine is validated on real images before it is written: fp32 engines against onnxruntime
(fp32 CPU; top-1 agreement floor, max |logit difference| reported); fp16 and int8 engines of a
reduced model against the unreduced fp32 model, like the reduced-precision ONNX graphs
(`precision.check_precision`: agreement with the unreduced model at most a margin below the fp32
graph's, paired, with its 95 % interval), on images disjoint from int8's calibration images. Each
engine gets a metadata JSON
beside it (TensorRT version, GPU, precision, shapes, build time, sha256). A timing cache file is
reused across builds. Without the ``tensorrt`` package or without an NVIDIA GPU every entry point
raises a one-line UserError naming what is missing.

This module is the path's public face; the work is in two rooms:

- `trt_graph`: what needs no GPU (parse-readiness, the fp16 rewrite, the decision layers, whether
  tensorrt and a GPU are here, the build plan per precision and TensorRT major);
- `trt_engine`: what needs tensorrt and a GPU (the builder, `build_engine`, `TrtRunner`).
"""

from .trt_engine import (
    DEFAULT_WORKSPACE_GB,
    EngineResult,
    TrtRunner,
    agreement_floor,
    build_engine,
    configure,
    default_timing_cache,
    engine_device_memory,
    engine_images,
    engine_metadata,
    gpu_name,
    network_flags,
    pin_layers_fp32,
    run_engine,
    unreduced_logits,
)
from .trt_graph import (
    DECISION_OPS,
    MIN_AGREEMENT,
    PRECISIONS,
    TOPK_MAX_K,
    BuildPlan,
    _attr,
    _constants,
    availability,
    decision_nodes,
    parse_problems,
    parse_version,
    plan_build,
    require_tensorrt,
    to_fp16,
)

__all__ = [
    "DECISION_OPS", "DEFAULT_WORKSPACE_GB", "MIN_AGREEMENT", "PRECISIONS", "TOPK_MAX_K",
    "BuildPlan", "EngineResult", "TrtRunner",
    "agreement_floor", "availability", "build_engine", "configure", "decision_nodes", "default_timing_cache",
    "engine_device_memory", "engine_images", "engine_metadata", "unreduced_logits",
    "gpu_name", "network_flags", "parse_problems", "parse_version", "pin_layers_fp32", "plan_build",
    "require_tensorrt", "run_engine", "to_fp16",
    "_attr", "_constants",  # the graph tests read constants and attributes through these
]
