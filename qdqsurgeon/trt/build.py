"""Build a TensorRT engine from a Q/DQ ONNX model, and dump its layer info and profile.

TensorRT is imported lazily inside :func:`build_engine`, so the rest of qdqsurgeon works
without it; a missing package raises :class:`TensorRTMissingError` (exit 3). The build follows
``trt-rules.md`` §1: on 10.x a strongly typed network with no precision flags, on 11.x the
default network (strong typing is always on there). Layer info is the inspector's JSON, i.e.
the same content as ``trtexec --exportLayerInfo``; the profile is written in the
``trtexec --exportProfile`` format, so :mod:`qdqsurgeon.trt.report` reads both.

Only the pure helpers (shape parsing, profile records) are tested without a GPU; the TensorRT
path is covered by tests marked ``tensorrt`` that skip where TensorRT is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from qdqsurgeon.errors import ModelError, TensorRTMissingError, UsageError

__all__ = [
    "DEFAULT_WORKSPACE_MB",
    "Shape",
    "ShapeRange",
    "BuildResult",
    "parse_shapes",
    "shape_ranges",
    "normalise_shapes",
    "profile_records",
    "build_engine",
]

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 4096
DEFAULT_PROFILE_ITERATIONS = 100
_WARMUP_ITERATIONS = 10
PROFILE_NEEDS = "profiling needs device buffers: install cuda-python (pip install cuda-python) or torch with CUDA"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """Min/opt/max shape of one network input (one optimization profile)."""

    min: Shape
    opt: Shape
    max: Shape


@dataclass
class BuildResult:
    """What :func:`build_engine` produced."""

    engine_path: Path
    tensorrt_version: str
    strongly_typed: bool
    build_seconds: float
    engine_bytes: int
    layer_info_path: Path | None = None
    profile_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    sparsity: bool = False


# --------------------------------------------------------------------------- pure helpers


def parse_shapes(text: str | None, *, flag: str = "--shapes") -> dict[str, Shape]:
    """Parse ``name:1x3x224x224,other:1x10`` (trtexec syntax) into ``{name: (1, 3, 224, 224)}``.

    The name ends at the *last* colon, so TF-style names such as ``input_1:0:1x3x224x224`` work.
    """
    if text is None or not text.strip():
        return {}
    out: dict[str, Shape] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise UsageError(f"{flag}: '{item}' is not name:DIMS (e.g. input:1x3x224x224)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UsageError(f"{flag}: '{dims}' in '{item}' is not a list of integers joined by 'x'") from None
        if any(d < 0 for d in shape):
            raise UsageError(f"{flag}: negative dimension in '{item}'")
        if name in out:
            raise UsageError(f"{flag}: '{name}' given twice")
        out[name] = shape
    return out


def shape_ranges(
    min_shapes: Mapping[str, Shape] | None,
    opt_shapes: Mapping[str, Shape] | None,
    max_shapes: Mapping[str, Shape] | None,
) -> dict[str, ShapeRange]:
    """Combine the three flags as trtexec does: a missing min/max defaults to opt (and back)."""
    mins, opts, maxs = dict(min_shapes or {}), dict(opt_shapes or {}), dict(max_shapes or {})
    out: dict[str, ShapeRange] = {}
    for name in sorted(set(mins) | set(opts) | set(maxs)):
        opt = opts.get(name) or maxs.get(name) or mins.get(name)
        assert opt is not None
        lo, hi = mins.get(name, opt), maxs.get(name, opt)
        if not (len(lo) == len(opt) == len(hi)):
            raise UsageError(f"shapes for '{name}' differ in rank: min {lo}, opt {opt}, max {hi}")
        if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
            raise UsageError(f"shapes for '{name}' need min <= opt <= max in every dimension: {lo}, {opt}, {hi}")
        out[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


def profile_records(times: Mapping[str, Sequence[float]], order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per-layer times (ms per iteration) → the ``trtexec --exportProfile`` list.

    ``[{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}, ...]`` with
    ``timeMs`` the total over the iterations and ``percentage`` its share of the sum.
    """
    names = list(order) if order is not None else list(times)
    names += [n for n in times if n not in names]
    count = max((len(times.get(n, ())) for n in names), default=0)
    totals = {n: float(sum(times.get(n, ()))) for n in names}
    grand = sum(totals.values())
    records: list[dict[str, Any]] = [{"count": count}]
    for n in names:
        samples = list(times.get(n, ()))
        if not samples:
            continue
        records.append(
            {
                "name": n,
                "timeMs": totals[n],
                "averageMs": totals[n] / len(samples),
                "medianMs": float(statistics.median(samples)),
                "percentage": 100.0 * totals[n] / grand if grand else 0.0,
            }
        )
    return records


def normalise_shapes(shapes: Mapping[str, Any] | str | None) -> dict[str, ShapeRange]:
    """Accept ``{name: ShapeRange}``, ``{name: (1, 3, 224, 224)}`` (fixed shape) or trtexec text."""
    if shapes is None:
        return {}
    if isinstance(shapes, str):
        return shape_ranges({}, parse_shapes(shapes), {})
    out: dict[str, ShapeRange] = {}
    for name, value in shapes.items():
        if isinstance(value, ShapeRange):
            out[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(d, int) for d in value):
            out[name] = ShapeRange(tuple(value), tuple(value), tuple(value))
        else:
            raise UsageError(f"shape for '{name}' must be a ShapeRange or a tuple of ints, got {value!r}")
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- TensorRT path


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as exc:
        raise TensorRTMissingError() from exc
    return trt


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def _parser_error_line(err: Any) -> str:
    """One line per parser error, naming the ONNX node (10.x has node_name()/node_operator())."""

    def call(attr: str) -> Any:
        fn = getattr(err, attr, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # older bindings raise for missing info
            return None

    desc = call("desc") or str(err)
    node = call("node")
    name = call("node_name")
    op = call("node_operator")
    where = []
    if name:
        where.append(f"node '{name}'")
    elif isinstance(node, int) and node >= 0:
        where.append(f"node #{node}")
    if op:
        where.append(f"({op})")
    return (" ".join(where) + ": " if where else "") + str(desc)


def _create_network(trt: Any, builder: Any, major: int) -> tuple[Any, bool]:
    if major >= 11:
        # 11.x: strong typing is always on; the flag is ignored, so use the default network.
        return builder.create_network(0), True
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flag), True


def _set_profile(trt: Any, builder: Any, network: Any, config: Any, shapes: Mapping[str, ShapeRange]) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise UsageError(f"shape flags name unknown inputs {unknown}; the network inputs are {sorted(inputs)}")
    dynamic = [n for n, t in inputs.items() if any(d < 0 for d in tuple(t.shape))]
    missing = [n for n in dynamic if n not in shapes]
    if missing:
        raise UsageError(f"inputs {missing} have dynamic dimensions: give --min-shapes/--opt-shapes/--max-shapes")
    if not shapes:
        return
    profile = builder.create_optimization_profile()
    for name, rng in shapes.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)


def _device_allocator() -> tuple[str, Any] | None:
    """torch (CUDA) or cuda-python, whichever is importable and sees a GPU."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            return "torch", torch
    except Exception:  # not installed, or a broken CUDA setup
        pass
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = __import__(mod, fromlist=["cudaMalloc"])
            return "cuda-python", cudart
        except Exception:
            continue
    return None


class _Buffers:
    """Device buffers for every I/O tensor, freed on close."""

    def __init__(self, backend: tuple[str, Any]) -> None:
        self.kind, self.mod = backend
        self._keep: list[Any] = []
        self.stream: Any = None
        if self.kind == "torch":
            self._stream_obj = self.mod.cuda.Stream()
            self.stream = self._stream_obj.cuda_stream
        else:
            err, stream = self.mod.cudaStreamCreate()
            self._check(err, "cudaStreamCreate")
            self.stream = stream

    def _check(self, err: Any, what: str) -> None:
        if int(err) != 0:
            raise ModelError(f"{what} failed with CUDA error {int(err)}")

    def alloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self.kind == "torch":
            t = self.mod.zeros(nbytes, dtype=self.mod.uint8, device="cuda")
            self._keep.append(t)
            return int(t.data_ptr())
        err, ptr = self.mod.cudaMalloc(nbytes)
        self._check(err, "cudaMalloc")
        self.mod.cudaMemset(ptr, 0, nbytes)
        self._keep.append(ptr)
        return int(ptr)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        if self.kind == "torch":
            self._stream_obj.synchronize()
        else:
            (err,) = self.mod.cudaStreamSynchronize(self.stream)
            self._check(err, "cudaStreamSynchronize")

    def close(self) -> None:
        if self.kind != "torch":
            for ptr in self._keep:
                self.mod.cudaFree(ptr)
            self.mod.cudaStreamDestroy(self.stream)
        self._keep.clear()


def _run_profile(trt: Any, engine: Any, shapes: Mapping[str, ShapeRange], iterations: int) -> tuple[dict[str, list[float]], list[str]] | str:
    """Run the engine with a per-layer profiler; returns times, or a message why it could not."""
    backend = _device_allocator()
    if backend is None:
        return PROFILE_NEEDS

    class LayerTimes(trt.IProfiler):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}
            self.order: list[str] = []
            self.enabled = False

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            if not self.enabled:
                return
            if layer_name not in self.times:
                self.times[layer_name] = []
                self.order.append(layer_name)
            self.times[layer_name].append(float(ms))

    context = engine.create_execution_context()
    buffers = _Buffers(backend)
    try:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = tuple(engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    rng = shapes.get(name)
                    opt = rng.opt if rng else tuple(engine.get_tensor_profile_shape(name, 0)[1])
                    context.set_input_shape(name, opt)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(context.get_tensor_shape(name))
            try:
                itemsize = trt.nptype(engine.get_tensor_dtype(name))().itemsize
            except Exception:  # types without a numpy twin (bf16, fp8, int4): over-allocate
                itemsize = 4
            count = 1
            for d in shape:
                count *= max(int(d), 1)
            context.set_tensor_address(name, buffers.alloc(count * itemsize))
        profiler = LayerTimes()
        context.profiler = profiler
        for it in range(_WARMUP_ITERATIONS + iterations):
            profiler.enabled = it >= _WARMUP_ITERATIONS
            if not context.execute_async_v3(buffers.stream_handle):
                raise ModelError("TensorRT failed to run the engine for profiling")
            buffers.sync()
        return profiler.times, profiler.order
    finally:
        buffers.close()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    layer_info: str | Path | None = None,
    profile: str | Path | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    shapes: Mapping[str, ShapeRange | Sequence[int]] | str | None = None,
    profile_iterations: int = DEFAULT_PROFILE_ITERATIONS,
    sparsity: bool = False,
) -> BuildResult:
    """Build ``onnx_path`` into a serialized engine at ``engine_path``.

    ``layer_info`` receives the inspector JSON (detailed verbosity), ``profile`` the per-layer
    times in the ``--exportProfile`` format. ``shapes`` (see :func:`shape_ranges`) defines the
    optimization profile for dynamic inputs (a plain tuple per input, or trtexec text such as
    ``"input:1x3x224x224"``, fixes min = opt = max). Raises :class:`TensorRTMissingError` without
    TensorRT, :class:`UsageError` for bad arguments, :class:`ModelError` when TensorRT refuses
    the model (parser errors name the ONNX node). ``sparsity`` lets TensorRT use 2:4 sparse
    kernels for layers whose weights qualify (``docs/sparsity.md``).
    """
    src = Path(onnx_path)
    if not src.is_file():
        raise UsageError("file not found", path=str(src))
    if workspace_mb <= 0:
        raise UsageError(f"--workspace must be a positive number of MB, got {workspace_mb}")
    ranges = normalise_shapes(shapes)
    trt = _import_tensorrt()
    version = str(getattr(trt, "__version__", "0"))
    major = _major(version)
    if major < 10:
        raise TensorRTMissingError(f"TensorRT {version} is too old: qdqsurgeon build needs TensorRT 10 or newer")

    started = time.perf_counter()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network, strongly_typed = _create_network(trt, builder, major)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(src)):
        errors = [_parser_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in errors:
            logger.error("ONNX parser: %s", line)
        raise ModelError("TensorRT could not parse the model: " + "; ".join(errors or ["unknown error"]), path=str(src))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    # Without DETAILED the inspector lists names only and the report cannot see precisions.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _set_profile(trt, builder, network, config, ranges)
    # No precision flags: under strong typing the Q/DQ and the ONNX float types decide (§1).
    if sparsity:
        # "Allow the builder to examine weights and use optimized functions when weights have
        # suitable sparsity" (NvInfer.h, BuilderFlag::kSPARSE_WEIGHTS, 10.x and 11.x); Python name
        # trt.BuilderFlag.SPARSE_WEIGHTS as in the Developer Guide's Structured Sparsity example.
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(
            "TensorRT could not build the engine (see its log above); 'could not find any implementation'"
            " usually means Q/DQ around a layer without an INT8 kernel (V6)",
            path=str(src),
        )
    data = bytes(memoryview(plan))
    out = Path(engine_path)
    _atomic_write(out, data)
    result = BuildResult(
        engine_path=out,
        tensorrt_version=version,
        strongly_typed=strongly_typed,
        build_seconds=time.perf_counter() - started,
        engine_bytes=len(data),
        sparsity=sparsity,
    )
    logger.info("built %s (%d bytes) with TensorRT %s in %.1f s", out, len(data), version, result.build_seconds)

    if layer_info is None and profile is None:
        return result
    runtime = trt.Runtime(log)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ModelError("TensorRT could not deserialize the engine it just built", path=str(out))
    if layer_info is not None:
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        json.loads(info)  # fail here, not in the report, if TensorRT wrote something odd
        result.layer_info_path = Path(layer_info)
        _atomic_write(result.layer_info_path, info.encode("utf-8"))
    if profile is not None:
        outcome = _run_profile(trt, engine, ranges, max(int(profile_iterations), 1))
        if isinstance(outcome, str):
            logger.warning("%s; %s not written", outcome, profile)
            result.notes.append(f"{outcome}; {profile} not written")
        else:
            times, order = outcome
            result.profile_path = Path(profile)
            _atomic_write(result.profile_path, json.dumps(profile_records(times, order), indent=2).encode("utf-8"))
    return result
