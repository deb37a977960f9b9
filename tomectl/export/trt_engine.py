"""The TensorRT path's half that needs the tensorrt module and an NVIDIA GPU: the builder (network
flags, builder config, fp32 pins, int8 calibrator, timing cache), `build_engine` and its checks
against onnxruntime (fp32) or the unreduced model (fp16/int8, `precision.check_precision`), and
`TrtRunner`, which runs an engine on torch CUDA buffers.

Every TensorRT name used here is checked against the real bindings of TensorRT 10.0, 10.3, 10.16,
11.0 and 11.4 (tests/fixtures/tensorrt, recorded by tests/trt_stubs/build_stubs.py): what differs
between versions is reached through `hasattr` (e.g. `device_memory_size_v2`, only on 10.3+ and the
only one on 11.x; STRONGLY_TYPED is member 1 on 10.x and 0 on 11.x, so it is always read by name).

See `tomectl.export.tensorrt` for the whole path; what is decided without a GPU (graph checks, the
fp16 rewrite, version planning) is `tomectl.export.trt_graph`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..artifact import atomic_file, write_json
from ..errors import UserError
from ..runtime import chunks
from .onnx import ExportCheckError, Progress, ort_session, readable, run_session, stamped
from .onnx import parity as parity_of
from .trt_graph import (
    MIN_AGREEMENT,
    BuildPlan,
    availability,
    decision_nodes,
    parse_problems,
    plan_build,
    require_tensorrt,
    to_fp16,
)

DEFAULT_WORKSPACE_GB = 4.0


# --- the builder ---------------------------------------------------------------------------------


def network_flags(trt, plan: BuildPlan) -> int:
    """create_network flags: STRONGLY_TYPED on 11+ (always on there; set where the member exists)."""
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def configure(trt, config, plan: BuildPlan, workspace_gb: float) -> None:
    """Apply `plan` to a builder config: workspace, precision flags, TF32 off for fp32."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))


def pin_layers_fp32(trt, network, node_names: Sequence[str]) -> int:
    """Weak typing (10.x): ask for fp32 in the layers the parser made from `node_names`.

    The ONNX parser names each layer after its node (with a suffix where a node becomes several
    layers). Returns how many layers were pinned."""
    names = set(node_names)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base = layer.name
        if not (base in names or any(base.startswith(n + "_") or base.startswith(n + ":") for n in names)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


# --- logging, calibration, timing cache ---------------------------------------------------------

_LOGGERS: dict = {}


def _init_plugins(trt, log) -> None:
    """Register TensorRT's plugin library once per process: the parser needs it for the ops it maps
    to plugins, and an engine that contains a plugin layer cannot be deserialized without it."""
    if "plugins" not in _LOGGERS and hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(log, "")
        _LOGGERS["plugins"] = True


def _logger(trt):
    """One logger per process (TensorRT wants the builder and runtime to share it); keeps errors."""
    if "logger" not in _LOGGERS:

        class _Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))

        _LOGGERS["logger"] = _Log()
    return _LOGGERS["logger"]


def _calibrator(trt, images: torch.Tensor, batch: int):
    """IInt8EntropyCalibrator2 over `images` [N, 3, H, W] (TensorRT 10.x int8)."""

    class ImageCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.images = images.float().contiguous()
            self.batch = batch
            self.next = 0
            self.device = torch.empty((batch, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self):
            return self.batch

        def get_batch(self, names):
            if self.next + self.batch > len(self.images):
                return None
            self.device.copy_(self.images[self.next : self.next + self.batch])
            torch.cuda.synchronize()
            self.next += self.batch
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return None  # calibrate afresh: the cache would be tied to one graph and image set

        def write_calibration_cache(self, cache):
            return None

    return ImageCalibrator()


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def default_timing_cache(version: str) -> Path:
    """~/.cache/tomectl/tensorrt-<version>-<gpu>.timing: tactic timings are per version and GPU."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tomectl"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name()).strip("-").lower()
    return root / f"tensorrt-{version}-{gpu}.timing"


def _load_timing_cache(config, path: Path, notes: list) -> bool:
    """Set the timing cache at `path` on `config` (a fresh one where there is none). Returns whether
    the build has a cache to save afterwards.

    `set_timing_cache(cache, ignore_mismatch=False)` returns False for a cache written by another
    TensorRT version or device (it is not mixed in): the build then starts from a fresh cache, which
    replaces the file, and a note says so. Where even a fresh cache is refused, the engine is built
    without one and nothing is saved (a note says so too)."""
    data = path.read_bytes() if path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), False):
        return True
    if data:
        if config.set_timing_cache(config.create_timing_cache(b""), False):
            notes.append(f"the timing cache {path} was written by another TensorRT version or device; "
                         "built with a fresh one, which replaces it")
            return True
    notes.append(f"TensorRT refused a timing cache; built without one, nothing was saved to {path}")
    return False


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))
        readable(tmp)


# --- running engines ----------------------------------------------------------------------------


#: engine I/O types as torch dtypes, by the tensorrt module's DataType aliases (all in 10.0+)
IO_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8,
             "bool": torch.bool}


def _torch_dtype(trt, dtype, name: str = "?"):
    """The torch dtype of an engine I/O tensor; UserError for the types no torch buffer holds as
    TensorRT lays them out (FP8, INT4, FP4, E8M0: quantized or packed types)."""
    for alias, torch_dtype in IO_DTYPES.items():
        if hasattr(trt, alias) and dtype == getattr(trt, alias):
            return torch_dtype
    what = getattr(dtype, "name", str(dtype))
    raise UserError(
        f"the engine's I/O tensor {name} is of type {what}, which tomectl's runner does not handle "
        f"(it takes {', '.join(IO_DTYPES)}); build the engine with float inputs and outputs"
    )


def engine_device_memory(engine) -> int:
    """Bytes of device memory the engine's execution context allocates (activations and scratch):
    `device_memory_size_v2` where it exists (10.3+, the only one on 11.x), else `device_memory_size`."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


ENGINE_EXPECTED = "a serialized TensorRT engine (as `tomectl export ART --trt FILE` writes)"


def check_engine_file(path: str | Path, sniff: bool = True) -> Path:
    """The engine file, if it can be one at all: one UserError for a missing, empty or directory
    path, and (`sniff`) for a text or ONNX file, which need no TensorRT to be told apart."""
    from ..artifact import check_input_file

    path = check_input_file(path, "TensorRT engine", ENGINE_EXPECTED)
    if sniff:
        _refuse_non_engine(path)
    return path


def _refuse_non_engine(path: Path, why: str = "") -> None:
    from ..artifact import text_start

    start = text_start(path)
    if start is not None:
        raise UserError(f"TensorRT engine {path} is a text file (it starts with {start!r}), "
                        f"not an engine{why}; expected {ENGINE_EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(64)
    if b"pytorch" in head or b"onnx" in head.lower():
        raise UserError(f"TensorRT engine {path} is an ONNX graph, not an engine{why}: evaluate it under "
                        "a .onnx name, or build an engine with `tomectl export ART --trt FILE`")


def require_tensorrt_to_run(path: Path):
    """The tensorrt module for running the engine `path`. Without it: one UserError about the file
    where it is plainly no engine, else naming what this machine lacks to run it."""
    try:
        return require_tensorrt()
    except UserError:
        if path.exists():
            check_engine_file(path)
        _, missing = availability()
        if not missing:
            raise
        raise UserError(f"running the TensorRT engine {path} needs {' and '.join(missing)}; "
                        f"this machine lacks {'it' if len(missing) == 1 else 'them'} "
                        "(an .onnx export of the same artifact runs anywhere)") from None


class TrtRunner:
    """Run a static-shape engine: ``TrtRunner(path)(batch)`` -> logits (numpy in, numpy out;
    torch in, torch out on the input's device). Buffers are torch CUDA tensors."""

    def __init__(self, engine_path: str | Path):
        path = Path(engine_path)
        trt = require_tensorrt_to_run(path)
        check_engine_file(path, sniff=False)
        self._trt = trt
        _init_plugins(trt, _logger(trt))  # before deserializing: plugin layers need their creators
        self.runtime = trt.Runtime(_logger(trt))
        try:
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception:  # noqa: BLE001 - some releases raise instead of returning None
            self.engine = None
        if self.engine is None:
            _refuse_non_engine(path, f" TensorRT {trt.__version__} can load")
            raise UserError(
                f"{path} is not an engine TensorRT {trt.__version__} on {gpu_name()} can load "
                "(engines are tied to the TensorRT version and GPU that built them)"
            )
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = (
                name,
                tuple(self.engine.get_tensor_shape(name)),
                _torch_dtype(trt, self.engine.get_tensor_dtype(name), name),
            )
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)
        if len(self.inputs) != 1:
            raise UserError(f"{path} has {len(self.inputs)} inputs; tomectl engines take one image batch")
        self._buffers = {
            name: torch.empty(shape, dtype=dtype, device="cuda") for name, shape, dtype in self.outputs
        }
        for name, buf in self._buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self.stream = torch.cuda.Stream()

    @property
    def device_memory_bytes(self) -> int:
        """What the execution context allocated on the device (not seen by torch's allocator)."""
        return engine_device_memory(self.engine)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.inputs[0][1]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.outputs[0][1]

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        name, shape, dtype = self.inputs[0]
        if tuple(x.shape) != shape:
            raise UserError(f"the engine takes a batch of shape {shape}, got {tuple(x.shape)}")
        x = x.to("cuda", dtype).contiguous()
        self.context.set_tensor_address(name, x.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to execute the engine")
        self.stream.synchronize()
        return self._buffers[self.outputs[0][0]].float().clone()

    def __call__(self, batch):
        if isinstance(batch, np.ndarray):
            return self._run(torch.from_numpy(batch)).cpu().numpy()
        return self._run(batch).to(batch.device)

    def time_ms(self, iters: int = 100, warmup: int = 20) -> float:
        """Median latency of one batch already on the GPU, in milliseconds (CUDA events around
        each run, which includes copying the logits out of the engine's buffer)."""
        x = torch.randn(self.input_shape, device="cuda")
        for _ in range(warmup):
            self._run(x)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._run(x)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))


def run_engine(runner: TrtRunner, images: torch.Tensor) -> np.ndarray:
    out = []
    for chunk, real in chunks(images, runner.batch):
        out.append(runner(chunk.numpy())[:real])
    return np.concatenate(out)


# --- building -----------------------------------------------------------------------------------


@dataclass
class EngineResult:
    path: str
    precision: str
    batch: int
    tensorrt_version: str
    gpu: str
    input_shape: list[int]
    output_shape: list[int]
    build_seconds: float
    sha256: str
    timing_cache: str
    max_abs_diff: float
    top1_agreement: float
    n_check: int
    min_agreement: float
    metadata: str
    onnx_sha256: str
    strongly_typed: bool
    notes: list[str] = field(default_factory=list)
    precision_check: Optional[dict] = None  # fp16/int8: precision.PrecisionCheck.to_dict()
    device_memory_bytes: int = 0  # what an execution context allocates (engine_device_memory)

    def to_dict(self) -> dict:
        return asdict(self)


def _sidecar_preprocessing(onnx_path: Path) -> Optional[dict]:
    sidecar = onnx_path.with_name(onnx_path.name + ".json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text()).get("preprocessing")
    return None


def _images(onnx_path: Path, source, n: int, shape: Sequence[int]) -> tuple[torch.Tensor, str]:
    """Preprocessed images from a tensor, a folder (preprocessing from the ONNX sidecar), the
    shared calibration images, or seeded random inputs."""
    from .. import data
    from .onnx import shared_calibration_dir

    if isinstance(source, torch.Tensor):
        return source, f"{len(source)} given images"
    pre = _sidecar_preprocessing(onnx_path)
    root = Path(source) if source is not None else shared_calibration_dir()
    if root is not None and pre is not None:
        images = data.load_images(root, pre, n, resize="timm")
        return images, f"{len(images)} images from {root}"
    if source is not None:
        raise UserError(
            f"{onnx_path} has no sidecar JSON with its preprocessing; pass the images as a tensor"
        )
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape[1:], generator=gen), f"{n} random inputs"


@dataclass
class _Network:
    """A parsed network and what must outlive its build (the parser owns the weights' memory)."""

    builder: object
    network: object
    parser: object
    log: object


def _load_graph(onnx_path: Path, batch: Optional[int]):
    """The ONNX graph and its static input shape (UserError: no file, or exported at another batch)."""
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist")
    model_proto = onnx.load(str(onnx_path))
    shape = [d.dim_value for d in model_proto.graph.input[0].type.tensor_type.shape.dim]
    if batch is not None and shape[0] != batch:
        raise UserError(
            f"{onnx_path} was exported at batch {shape[0]}, not {batch}; export it again with --batch"
        )
    return model_proto, shape


def _parse(trt, plan: BuildPlan, onnx_path: Path, model_proto, workdir: Path, say) -> _Network:
    """Parse the graph (converted to fp16 first for a strongly typed fp16 build) into a network."""
    import onnx

    parse_path = onnx_path
    if plan.onnx_precision == "fp16":
        say("converting the graph to fp16 for a strongly typed network...")
        parse_path = workdir / "fp16.onnx"
        onnx.save(to_fp16(model_proto), str(parse_path))

    log = _logger(trt)
    log.errors.clear()
    _init_plugins(trt, log)
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, log)
    say(f"parsing {parse_path.name} (TensorRT {trt.__version__})...")
    if not parser.parse_from_file(str(parse_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        hint = f" ({'; '.join(parse_problems(model_proto))})" if parse_problems(model_proto) else ""
        raise ExportCheckError(
            f"TensorRT's ONNX parser refused the graph: {(errors or log.errors or ['?'])[0]}{hint}"
        )
    return _Network(builder, network, parser, log)


def _builder_config(trt, net: _Network, plan: BuildPlan, model_proto, workspace_gb: float, notes: list):
    """The builder config for `plan`; weakly typed reduced precision pins the decisions to fp32."""
    config = net.builder.create_builder_config()
    configure(trt, config, plan, workspace_gb)
    if plan.pin_decisions_fp32:
        pinned = pin_layers_fp32(trt, net.network, decision_nodes(model_proto))
        notes.append(f"{pinned} merge-decision layers pinned to fp32")
    return config


def _int8_calibrator(trt, plan: BuildPlan, config, onnx_path: Path, calib_images, n_calib: int,
                     shape: Sequence[int]):
    """The entropy calibrator a 10.x int8 build needs, set on `config` (None otherwise: 11.x has no
    `int8_calibrator`), over `calib_images`, which must not be the check images (an engine is not
    validated on what it was calibrated on). The caller keeps it referenced until the build is done."""
    if not plan.calibrate:
        return None
    if calib_images is None:
        raise UserError("an int8 engine needs calibration images other than its check images "
                        "(calib_images; `engine_images` splits one set)")
    calib, _ = _images(onnx_path, calib_images, max(n_calib, shape[0]), shape)
    if len(calib) < shape[0]:
        raise UserError(f"int8 calibration needs at least {shape[0]} images, got {len(calib)}")
    calibrator = _calibrator(trt, calib, shape[0])
    config.int8_calibrator = calibrator
    return calibrator


def _build_serialized(net: _Network, config, cache_path: Path, engine_path: Path, precision: str,
                      say, notes: list) -> float:
    """Build the engine into `engine_path` with the timing cache at `cache_path`; the build seconds."""
    cached = _load_timing_cache(config, cache_path, notes)
    say(f"building the {precision} engine (minutes)...")
    t0 = time.perf_counter()
    serialized = net.builder.build_serialized_network(net.network, config)
    build_seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportCheckError(
            f"TensorRT could not build the engine: {(net.log.errors or ['no reason given'])[-1]}"
        )
    if cached:
        _save_timing_cache(config, cache_path)
    engine_path.write_bytes(bytes(serialized))
    return build_seconds


def agreement_floor(precision: str, min_agreement: Optional[float], reference) -> Optional[float]:
    """The floor on top-1 agreement with onnxruntime fp32 an engine must reach: fp32 engines always
    (default `MIN_AGREEMENT`); fp16/int8 engines judged against the unreduced model (`reference`)
    only where `min_agreement` asks for one, since a correct reduced-precision engine of a reduced
    model takes other, equally good merges on a few % of images (see `precision`); without a
    reference, the default floor."""
    if min_agreement is not None:
        if not 0 <= min_agreement <= 1:
            raise UserError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
        return min_agreement
    if precision != "fp32" and reference is not None:
        return None
    return MIN_AGREEMENT[precision]


def _validate(onnx_path: Path, engine_path: Path, images: torch.Tensor, batch: int, precision: str,
              floor: Optional[float], margin: Optional[float], reference, out: Path):
    """(runner, parity, precision check or None) of the built engine on `images`.

    parity: against onnxruntime fp32 (the graph the engine was built from). fp16/int8 with
    `reference` (the unreduced fp32 model's logits on `images`): `check_precision`, refused when its
    agreement with the unreduced model is shown to fall more than `margin` below the fp32 graph's.
    ExportCheckError on a refusal or below `floor`."""
    from .precision import check_precision

    fp32 = run_session(ort_session(onnx_path), images, batch)
    runner = TrtRunner(engine_path)
    logits = run_engine(runner, images)
    parity = parity_of(fp32, logits)
    check = None
    if reference is not None and precision != "fp32":
        reference = np.asarray(reference)
        if len(reference) != len(images):
            raise ValueError(f"{len(reference)} reference logits for {len(images)} check images")
        check = check_precision(reference, fp32, logits, precision, margin)
        if not check.passed:
            raise ExportCheckError(f"the {precision} engine loses too much agreement ({check.describe()}, "
                                   f"see --max-agreement-drop); nothing was written to {out}")
    if floor is not None and parity.top1_agreement < floor:
        raise ExportCheckError(
            f"the {precision} engine agrees with onnxruntime on only {parity.top1_agreement:.1%} of "
            f"{parity.n} images (need {floor:.0%}, see --min-agreement; max |diff| "
            f"{parity.max_abs_diff:.3g}); "
            f"nothing was written to {out}"
        )
    return runner, parity, check


def engine_images(images: torch.Tensor, precision: str,
                  batch: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(calibration images or None, check images) for an engine: int8 calibrates on the first half
    (at least one batch) and is checked on the rest, never on what it was calibrated on."""
    from .precision import split_images

    if precision != "int8":
        return None, images
    return split_images(images, max(batch, len(images) // 2))


def unreduced_logits(reduced, images: torch.Tensor) -> np.ndarray:
    """The unreduced fp32 model's logits on `images` (the reference of a reduced-precision engine)."""
    return reduced.unreduced_logits(images)


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    batch: Optional[int] = None,
    calib_images=None,
    check_images=None,
    n_check: int = 64,
    timing_cache: Optional[str | Path] = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    min_agreement: Optional[float] = None,
    reference=None,
    max_agreement_drop: Optional[float] = None,
    meta: Optional[dict] = None,
    progress: Progress = None,
) -> EngineResult:
    """Build a TensorRT engine from a validated static-shape ONNX graph, validate it, and write it
    with its metadata JSON (``<out>.json``).

    calib_images: int8 calibration images (tensor [N, 3, H, W] or folder), required for int8 on
      10.x and disjoint from the check images (`engine_images` splits one set).
    check_images: validation images (tensor or folder; default: the shared calibration images).
    reference: the unreduced fp32 model's logits on the check images: fp16/int8 engines are then
      judged by `precision.check_precision` (agreement with the unreduced model at most
      `max_agreement_drop` below the fp32 graph's, default `precision.DEFAULT_MARGIN`), not by a
      floor on agreement with the fp32 graph; `min_agreement` (see `agreement_floor`) adds one.
    Raises UserError without tensorrt or a GPU, ExportCheckError (nothing written) when the
    parser refuses the graph, the build fails, or the engine disagrees with onnxruntime.
    """
    from ..models import sha256_of

    say = progress or (lambda msg: None)
    trt = require_tensorrt()
    plan = plan_build(trt.__version__, precision)
    onnx_path, out = Path(onnx_path), Path(out)
    model_proto, shape = _load_graph(onnx_path, batch)
    floor = agreement_floor(precision, min_agreement, reference)
    notes = [f"{p} (TensorRT may still build it)" for p in parse_problems(model_proto)]

    with tempfile.TemporaryDirectory(prefix="tomectl-trt-") as td:
        net = _parse(trt, plan, onnx_path, model_proto, Path(td), say)
        config = _builder_config(trt, net, plan, model_proto, workspace_gb, notes)
        images, source = _images(onnx_path, check_images, n_check, shape)
        calibrator = _int8_calibrator(trt, plan, config, onnx_path, calib_images, n_check, shape)
        cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__)
        engine_tmp = Path(td) / "engine.plan"
        build_seconds = _build_serialized(net, config, cache_path, engine_tmp, precision, say, notes)
        del calibrator  # referenced until the build is done (TensorRT calls back into it)

        say(f"validating on {source}...")
        runner, parity, check = _validate(onnx_path, engine_tmp, images, shape[0], precision, floor,
                                          max_agreement_drop, reference, out)
        if check is not None:
            notes.append(f"engine {check.describe()}")
        result = EngineResult(
            path=str(out), precision=precision, batch=shape[0], tensorrt_version=trt.__version__,
            gpu=gpu_name(), input_shape=list(runner.input_shape), output_shape=list(runner.output_shape),
            build_seconds=round(build_seconds, 1), sha256=sha256_of(engine_tmp), timing_cache=str(cache_path),
            max_abs_diff=parity.max_abs_diff, top1_agreement=parity.top1_agreement, n_check=parity.n,
            min_agreement=0.0 if floor is None else floor, metadata=str(out.with_name(out.name + ".json")),
            onnx_sha256=sha256_of(onnx_path), strongly_typed=plan.strongly_typed, notes=notes,
            precision_check=check.to_dict() if check is not None else None,
            device_memory_bytes=runner.device_memory_bytes,
        )
        del runner
        _write_engine(engine_tmp, result, engine_metadata(result, plan, source, meta))
    return result


def _write_engine(engine_path: Path, result: EngineResult, metadata: dict) -> None:
    """The engine to `result.path` and its metadata JSON beside it, both atomically."""
    with atomic_file(result.metadata) as tmp_json, atomic_file(result.path) as tmp_engine:
        shutil.copyfile(engine_path, tmp_engine)
        write_json(tmp_json, metadata)
        readable(tmp_engine, tmp_json)


def engine_metadata(result: EngineResult, plan: BuildPlan, source: str, meta: Optional[dict]) -> dict:

    doc = {
        "file": Path(result.path).name,
        "sha256": result.sha256,
        "tensorrt": result.tensorrt_version,
        "gpu": result.gpu,
        "precision": result.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "input": {"shape": result.input_shape},
        "output": {"shape": result.output_shape},
        "batch": result.batch,
        "build_seconds": result.build_seconds,
        "timing_cache": result.timing_cache,
        "onnx_sha256": result.onnx_sha256,
        "validation": {
            "reference": "onnxruntime CPU fp32",
            "inputs": source,
            "n": result.n_check,
            "max_abs_diff": result.max_abs_diff,
            "top1_agreement": result.top1_agreement,
            "min_agreement": result.min_agreement,
            "vs_unreduced": result.precision_check,  # fp16/int8: precision.check_precision
        },
        "device_memory_bytes": result.device_memory_bytes,
        "notes": result.notes,
    }
    return stamped(doc, meta)
