"""Calibration and evaluation data: ``.npz``/``.npy`` files, folders of them, folders of images.

Every source is a re-iterable sequence of *feed dicts* (input name -> batch array) whose
``len()`` is the number of batches. Samples are streamed: at most one file and one batch are
held in memory at a time. Everything is checked against the model's declared inputs when the
source is opened (names, rank, static dimensions, dtype kind), reading only the ``.npy``
headers, so a bad data set fails before any inference runs. Every problem is a
:class:`~qdqsurgeon.errors.DataError` naming the file and the input.

Batching: if the model's batch dimension (axis 0 of the first input) is static, samples are
grouped into batches of exactly that size (an incomplete last batch is dropped with a
warning); if it is dynamic, ``batch_size`` samples (default 1) per batch, the last batch may
be smaller.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from qdqsurgeon.errors import DataError, UsageError

__all__ = [
    "Preprocess",
    "InputSpec",
    "DataSource",
    "model_inputs",
    "open_data",
    "random_data",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_ARRAY_SUFFIXES = frozenset({".npz", ".npy"})
# Ultralytics pads letterboxed images with this grey; detectors are trained with it.
_LETTERBOX_FILL = 114

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """One real (non-initializer) graph input: numpy dtype and shape, ``None`` for a dynamic dim."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None when the model declares no shape at all
    # Where the samples are stacked: 0, or the axis named like the first input's batch dim (an RNN
    # state [layers, batch, hidden], as silero VAD's ``state [2, batch, 128]``).
    batch_axis: int = 0

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def scalar(self) -> bool:
        """A rank-0 input (a sample rate, an If condition): a setting, not data; it has no batch axis."""
        return self.shape == ()

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name} {self.dtype} {dims}"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers), in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    batch_name: str | None = None
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
            raise DataError(f"model input {vi.name!r} is not a typed tensor; cannot feed it from data")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        axis = 0
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
            params = [d.dim_param if d.HasField("dim_param") else None for d in tt.shape.dim]
            if batch_name is None and params:
                batch_name = params[0]
            elif batch_name and params and params[0] != batch_name and batch_name in params:
                axis = params.index(batch_name)
        specs.append(InputSpec(vi.name, dtype, shape, axis))
    if not specs:
        raise DataError("the model has no inputs to feed")
    return specs


def _batched(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """The inputs that carry a batch axis (every one but the scalars)."""
    return [s for s in specs if not s.scalar]


def _static_batch(specs: Sequence[InputSpec]) -> int | None:
    batched = _batched(specs)
    if not batched or not batched[0].shape:
        return None
    return batched[0].shape[batched[0].batch_axis]


def _take(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return a[(slice(None),) * axis + (slice(start, stop),)]


def _kind(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":  # ml_dtypes' bfloat16 is not np.floating
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return dtype.kind


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How image files become an input tensor.

    ``size`` is the (height, width) fed to the model. ``resize`` chooses how an image of another
    aspect ratio gets there: ``crop`` resizes the shorter side and center-crops (classifiers),
    ``letterbox`` fits the longer side and pads with grey 114 (YOLO-style detectors),
    ``stretch`` resizes both sides independently. Pixels (0..255) are multiplied by ``scale``,
    then ``(x - mean) / std`` per channel (in ``channel_order``) when given.
    """

    size: tuple[int, int] = (224, 224)
    resize: Literal["crop", "letterbox", "stretch"] = "crop"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "letterbox", "stretch"):
            raise UsageError(f"preprocess: resize must be crop, letterbox or stretch, not {self.resize!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise UsageError(f"preprocess: order must be RGB or BGR, not {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"preprocess: layout must be NCHW or NHWC, not {self.layout!r}")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise UsageError(f"preprocess: size must be positive, got {self.size!r}")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, 3):
                raise UsageError(f"preprocess: {label} needs 1 or 3 values, got {len(values)}")
        if self.std is not None and any(v == 0 for v in self.std):
            raise UsageError("preprocess: std must not contain 0")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise UsageError(f"preprocess: scale must be a finite non-zero number, got {self.scale!r}")

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> Preprocess:
        """A default for the model's single image input: its static H/W (224 when dynamic), /255, no mean/std."""
        specs = model_inputs(model)
        if len(specs) != 1 or specs[0].rank != 4:
            return cls()
        shape = specs[0].shape or (None,) * 4
        # A channels-last model shows 1 or 3 in the last dim and something else in dim 1.
        layout: Literal["NCHW", "NHWC"] = "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"
        h, w = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
        return cls(size=(h or 224, w or 224), layout=layout)

    @classmethod
    def parse(cls, spec: str, base: Preprocess | None = None) -> Preprocess:
        """Parse ``"size=224,mean=0.485/0.456/0.406,std=...,scale=1/255,order=RGB,layout=NCHW,resize=crop"``.

        Keys not given keep the value from ``base`` (the defaults when ``None``). ``size`` is
        ``N`` or ``HxW``. Raises :class:`UsageError` on anything malformed.
        """
        result = base or cls()
        changes: dict[str, object] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or not value:
                raise UsageError(f"preprocess: expected key=value, got {item!r}")
            try:
                if key == "size":
                    parts = value.lower().split("x")
                    if len(parts) == 1:
                        changes["size"] = (int(parts[0]), int(parts[0]))
                    elif len(parts) == 2:
                        changes["size"] = (int(parts[0]), int(parts[1]))
                    else:
                        raise ValueError(value)
                elif key in ("mean", "std"):
                    changes[key] = tuple(float(Fraction(v)) for v in value.split("/"))
                elif key == "scale":
                    changes["scale"] = float(Fraction(value))
                elif key in ("order", "channel_order"):
                    changes["channel_order"] = value.upper()
                elif key == "layout":
                    changes["layout"] = value.upper()
                elif key == "resize":
                    changes["resize"] = value.lower()
                else:
                    raise UsageError(
                        f"preprocess: unknown key {key!r} (known: size, mean, std, scale, order, layout, resize)"
                    )
            except (ValueError, ZeroDivisionError):
                raise UsageError(f"preprocess: bad value for {key}: {value!r}") from None
        return replace(result, **changes)  # type: ignore[arg-type]

    def __call__(self, image: object) -> np.ndarray:
        """A PIL image -> float32 array ``[C, H, W]`` or ``[H, W, C]`` (no batch axis)."""
        from PIL import Image

        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # type: ignore[attr-defined]
            # 16-bit/float greyscale: convert("RGB") would clip to 255; scale the full range to 8 bits.
            arr = np.asarray(image, dtype=np.float64)
            top = float(arr.max()) if arr.size else 0.0
            peak = 65535.0 if image.mode.startswith("I;16") else (255.0 if top <= 255 else 65535.0 if top <= 65535 else top)  # type: ignore[attr-defined]
            image = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8))
        img = image.convert("RGB")  # type: ignore[attr-defined]
        th, tw = self.size
        w, h = img.size
        if self.resize == "stretch":
            img = img.resize((tw, th), Image.BILINEAR)
        elif self.resize == "crop":
            ratio = max(th / h, tw / w)
            nw, nh = max(tw, round(w * ratio)), max(th, round(h * ratio))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - tw) // 2, (nh - th) // 2
            img = img.crop((left, top, left + tw, top + th))
        else:
            ratio = min(th / h, tw / w)
            nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
            canvas = Image.new("RGB", (tw, th), (_LETTERBOX_FILL,) * 3)
            canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((tw - nw) // 2, (th - nh) // 2))
            img = canvas
        x = np.asarray(img, dtype=np.float32)  # H, W, C in RGB
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = x * np.float32(self.scale)
        if self.mean is not None:
            x = x - np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            x = x / np.asarray(self.std, dtype=np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- sources


class DataSource:
    """A re-iterable stream of feed dicts; ``len()`` is the number of batches."""

    def __init__(self, specs: Sequence[InputSpec], batch_size: int, drop_last: bool, num_samples: int, label: str):
        self.inputs = list(specs)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_samples = num_samples
        self.label = label

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}: {len(self)} batches of {self.batch_size}>"

    def _chunks(self) -> Iterator[tuple[Feed, str]]:
        """Yield (arrays with any number of samples along axis 0, where they came from)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Feed]:
        names = [s.name for s in self.inputs]
        axes = {s.name: s.batch_axis for s in self.inputs}
        pending: list[Feed] = []
        origins: list[str] = []
        count = 0
        for chunk, origin in self._chunks():
            # A scalar input is the same for every sample of the chunk: it goes with each batch unsliced.
            n = next((v.shape[axes[k]] for k, v in chunk.items() if np.ndim(v)), 1)
            start = 0
            while start < n:
                take = min(self.batch_size - count, n - start)
                pending.append({k: _take(v, axes[k], start, start + take) if np.ndim(v) else v for k, v in chunk.items()})
                origins.append(origin)
                count += take
                start += take
                if count == self.batch_size:
                    yield _concat(pending, names, origins, axes)
                    pending, origins, count = [], [], 0
        if count:
            if self.drop_last:
                logger.warning(
                    "%s: dropping the last %d sample(s): the model's batch size is fixed at %d",
                    self.label,
                    count,
                    self.batch_size,
                )
            else:
                yield _concat(pending, names, origins, axes)


def _concat(parts: list[Feed], names: list[str], origins: list[str], axes: dict[str, int]) -> Feed:
    if len(parts) == 1:
        # ascontiguousarray would give a scalar input a batch axis (it returns at least 1-d)
        return {k: np.ascontiguousarray(parts[0][k]) if np.ndim(parts[0][k]) else np.asarray(parts[0][k]) for k in names}
    out = {}
    for k in names:
        if not np.ndim(parts[0][k]):
            values = {p[k].item() for p in parts}
            if len(values) > 1:
                raise DataError(f"scalar input {k!r} differs between {origins[0]} .. {origins[-1]} ({sorted(values)}), "
                                "so their samples cannot share a batch; use batch size 1")
            out[k] = parts[0][k]
            continue
        ax = axes[k]
        shapes = {p[k].shape[:ax] + p[k].shape[ax + 1:] for p in parts}
        if len(shapes) > 1:
            raise DataError(
                f"input {k!r}: samples in {origins[0]} .. {origins[-1]} have different shapes "
                f"{sorted(shapes)} and cannot form one batch; use batch size 1"
            )
        out[k] = np.concatenate([p[k] for p in parts], axis=ax)
    return out


@dataclass
class _ArrayFile:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    batched: bool = True  # False: the file holds one sample without the batch axis
    num_samples: int = 0
    key_of: dict[str, str] = field(default_factory=dict)  # input name -> key in the file


class _ArraySource(DataSource):
    def __init__(self, files: list[_ArrayFile], specs: Sequence[InputSpec], batch_size: int, drop_last: bool, label: str):
        super().__init__(specs, batch_size, drop_last, sum(f.num_samples for f in files), label)
        self._files = files

    def _chunks(self) -> Iterator[tuple[Feed, str]]:
        for f in self._files:
            arrays = _load_arrays(f)
            chunk = {}
            for spec in self.inputs:
                a = arrays[f.key_of[spec.name]]
                if not f.batched and not spec.scalar:
                    a = np.expand_dims(a, spec.batch_axis)
                if a.dtype != spec.dtype:
                    a = a.astype(spec.dtype)
                chunk[spec.name] = a
            yield chunk, f.path.name


class _ImageSource(DataSource):
    def __init__(self, files: list[Path], spec: InputSpec, preprocess: Preprocess, batch_size: int, drop_last: bool, label: str):
        super().__init__([spec], batch_size, drop_last, len(files), label)
        self._files = files
        self._preprocess = preprocess

    def _chunks(self) -> Iterator[tuple[Feed, str]]:
        from PIL import Image, UnidentifiedImageError

        spec = self.inputs[0]
        for path in self._files:
            try:
                with Image.open(path) as img:
                    x = self._preprocess(img)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                raise DataError(f"cannot decode image: {exc}", path=str(path)) from None
            _check_shape(spec, x[np.newaxis].shape, str(path), "the preprocessed image has ")
            yield {spec.name: x[np.newaxis].astype(spec.dtype, copy=False)}, path.name


class _RandomSource(DataSource):
    def __init__(self, specs: Sequence[InputSpec], n: int, seed: int, settings: dict[str, np.ndarray] | None = None):
        shapes = {spec.name: _concrete_shape(spec) for spec in specs}
        batched = _batched(specs)
        batch = shapes[batched[0].name][0] if batched else 1
        super().__init__(specs, batch, False, n * batch, f"random data (seed {seed})")
        self._shapes = shapes
        self._seed = seed
        self._settings = settings or {}

    def _chunks(self) -> Iterator[tuple[Feed, str]]:
        rng = np.random.default_rng(self._seed)
        for i in range(len(self)):
            feed = {}
            for spec in self.inputs:
                shape = self._shapes[spec.name]
                kind = _kind(spec.dtype)
                if spec.name in self._settings:
                    feed[spec.name] = self._settings[spec.name]
                elif kind == "float":
                    feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif kind == "bool":
                    feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
                else:
                    # 0/1 are valid token ids, masks and segment ids alike.
                    feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
            yield feed, f"random batch {i}"


def _concrete_shape(spec: InputSpec) -> tuple[int, ...]:
    if spec.shape is None:
        raise DataError(f"input {spec.name!r} has no declared shape; random data needs one")
    shape = []
    for axis, d in enumerate(spec.shape):
        if d is not None:
            shape.append(d)
        elif axis == spec.batch_axis:
            shape.append(1)
        elif spec.rank == 4 and _kind(spec.dtype) == "float" and axis >= 1:
            shape.append(224 if (axis >= 2 or spec.shape[3] in (1, 3)) else 3)
        else:
            shape.append(16)
    return tuple(shape)


# --------------------------------------------------------------------------- file reading


def _npy_header(fp: object, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"not a valid .npy array: {exc}", path=where) from None
    if dtype.hasobject:
        raise DataError(
            "holds Python objects (a pickled array); only plain numeric arrays are accepted "
            "(arrays are loaded with allow_pickle=False)",
            path=where,
        )
    return tuple(shape), dtype


def _read_headers(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
    """Shapes and dtypes of every array in a .npy/.npz without reading the data."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as fp:
                shapes[""], dtypes[""] = _npy_header(fp, str(path))
        else:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with zf.open(member) as fp:
                        key = member[: -len(".npy")]
                        shapes[key], dtypes[key] = _npy_header(fp, f"{path}[{key}]")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"cannot read: {exc}", path=str(path)) from None
    if not shapes:
        raise DataError("contains no arrays", path=str(path))
    return shapes, dtypes


def _load_arrays(f: _ArrayFile) -> dict[str, np.ndarray]:
    try:
        if f.path.suffix.lower() == ".npy":
            # mmap keeps a large single-input file out of memory until a batch is sliced from it.
            return {"": np.load(f.path, mmap_mode="r", allow_pickle=False)}
        with np.load(f.path, allow_pickle=False) as npz:
            return {key: npz[key] for key in f.key_of.values()}
    except ValueError as exc:
        raise DataError(f"cannot load arrays ({exc})", path=str(f.path)) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read: {exc}", path=str(f.path)) from None


def _check_shape(spec: InputSpec, shape: tuple[int, ...], where: str, what: str = "the data has ",
                 sample: bool = False) -> None:
    """Refuse data whose shape cannot feed ``spec``; the message labels the data's and the model's shape.

    ``sample``: ``shape`` is one sample without its batch axis (a file of rank one less than the
    model's input), checked as ``[1, *shape]`` but reported as the file holds it.
    """
    if spec.shape is None:
        return
    model_side = f"the model's is {spec.describe().split(' ', 1)[1]} (rank {len(spec.shape)})"
    shown = (f"input {spec.name!r}: {what}shape {list(shape)} (rank {len(shape)}"
             + (", read as one sample without the batch axis)" if sample else ")"))
    checked = (*shape[:spec.batch_axis], 1, *shape[spec.batch_axis:]) if sample else shape
    if len(checked) != len(spec.shape):
        raise DataError(f"{shown}, {model_side}", path=where)
    for axis, (got, want) in enumerate(zip(checked, spec.shape)):
        if axis == spec.batch_axis:
            continue  # batching regroups samples; the batch dim is checked by the caller
        if want is not None and got != want:
            raise DataError(f"{shown}, {model_side}: on the model's axis {axis} the data has {got}, the model {want}",
                            path=where)


def _inspect_array_file(path: Path, specs: Sequence[InputSpec]) -> _ArrayFile:
    shapes, dtypes = _read_headers(path)
    expected = [s.name for s in specs]
    if path.suffix.lower() == ".npy":
        if len(specs) != 1:
            raise DataError(
                f"a .npy file holds one array but the model has {len(specs)} inputs {expected}; use .npz keyed by input name",
                path=str(path),
            )
        key_of = {specs[0].name: ""}
    else:
        if set(shapes) != set(expected):
            raise DataError(
                f"array names do not match the model inputs: expected {sorted(expected)}, got {sorted(shapes)}",
                path=str(path),
            )
        key_of = {name: name for name in expected}

    batched: bool | None = None
    counts = set()
    for spec in specs:
        shape, dtype = shapes[key_of[spec.name]], dtypes[key_of[spec.name]]
        if _kind(dtype) != _kind(spec.dtype):
            raise DataError(
                f"input {spec.name!r}: data dtype {dtype} does not fit the model's {spec.dtype} "
                f"({_kind(dtype)} vs {_kind(spec.dtype)})",
                path=str(path),
            )
        if spec.scalar:
            if shape != ():
                raise DataError(f"input {spec.name!r} is a scalar (rank 0), a setting shared by every sample: store it as "
                                f"a 0-d array, not shape {list(shape)}", path=str(path))
            continue
        this_batched = not (spec.rank is not None and len(shape) == spec.rank - 1)  # else one sample, no batch axis
        if spec.rank is not None and len(shape) == 0:
            raise DataError(f"input {spec.name!r}: got a scalar, the model expects {spec.describe()}", path=str(path))
        if batched is not None and this_batched != batched:
            raise DataError("some arrays have a batch axis and others do not", path=str(path))
        batched = this_batched
        _check_shape(spec, shape, str(path), "the file's array has ", sample=not this_batched)
        counts.add(shape[spec.batch_axis] if this_batched else 1)
    if len(counts) > 1:
        axes = sorted({s.batch_axis for s in specs if not s.scalar})
        raise DataError(f"arrays disagree on the number of samples (batch axis {'/'.join(map(str, axes))}): {sorted(counts)}",
                        path=str(path))
    return _ArrayFile(path, shapes, dtypes, bool(batched), counts.pop() if counts else 1, key_of)


def _batching(specs: Sequence[InputSpec], batch_size: int | None, label: str) -> tuple[int, bool]:
    static = _static_batch(specs)
    if static is not None:
        if batch_size is not None and batch_size != static:
            raise DataError(f"{label}: the model's batch size is fixed at {static}; cannot use batch size {batch_size}")
        return static, True
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    return batch_size or 1, False


def open_data(
    path: str | Path,
    model: onnx.ModelProto,
    preprocess: Preprocess | None = None,
    *,
    batch_size: int | None = None,
) -> DataSource:
    """Open calibration/evaluation data for ``model``.

    ``path`` is a ``.npz`` (arrays keyed by input name, axis 0 = samples), a ``.npy`` (single-input
    models), an image file, or a folder of one of those kinds (files taken in name order; other
    files are ignored). A sample without its batch axis (rank one less than the input) is accepted.
    ``preprocess`` applies to images only; default :meth:`Preprocess.from_model`.
    """
    path = Path(path)
    specs = model_inputs(model)
    label = str(path)
    if not path.exists():
        raise DataError("no such file or folder", path=label)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: p.name)
        subdirs = [p for p in path.iterdir() if p.is_dir()]
        arrays = [p for p in files if p.suffix.lower() in _ARRAY_SUFFIXES]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not arrays and not images:
            raise DataError(
                "folder holds no .npz, .npy or image files"
                + (f" ({len(files)} other files)" if files else "")
                + (f"; it has subfolders ({', '.join(sorted(d.name for d in subdirs)[:3])}): point --calib at the folder holding the files"
                   if subdirs else (" (empty)" if not files else "")),
                path=label,
            )
        if arrays and images:
            # Mixed folders happen (a stray README array next to photos): the majority kind wins.
            if len(arrays) == len(images):
                raise DataError(f"folder mixes {len(arrays)} array files and {len(images)} images; keep one kind", path=label)
            kept, dropped = (images, arrays) if len(images) > len(arrays) else (arrays, images)
            logger.warning("%s: using the %d %s, ignoring %d other file(s) such as %s", label, len(kept),
                           "images" if kept is images else "array files", len(dropped), dropped[0].name)
            arrays, images = ([], images) if kept is images else (arrays, [])
    elif path.suffix.lower() in _ARRAY_SUFFIXES:
        arrays, images = [path], []
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        arrays, images = [], [path]
    else:
        raise DataError("unknown data format: expected .npz, .npy, an image or a folder of them", path=label)

    size, drop_last = _batching(specs, batch_size, label)
    if arrays:
        inspected = [_inspect_array_file(p, specs) for p in arrays]
        source: DataSource = _ArraySource(inspected, specs, size, drop_last, label)
    else:
        if len(specs) != 1 or _kind(specs[0].dtype) != "float" or specs[0].rank not in (None, 4):
            raise DataError(
                f"images need a model with one float rank-4 input; this model has {[s.describe() for s in specs]}",
                path=label,
            )
        from PIL import Image, UnidentifiedImageError

        pre = preprocess or Preprocess.from_model(model)
        h, w = pre.size
        _check_shape(specs[0], (1, 3, h, w) if pre.layout == "NCHW" else (1, h, w, 3), label, f"preprocess {pre.layout} size {h}x{w} gives ")
        for p in images:
            try:
                with Image.open(p):  # reads the header only: fail early on a non-image
                    pass
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise DataError(f"cannot read image: {exc}", path=str(p)) from None
        source = _ImageSource(images, specs[0], pre, size, drop_last, label)
    if len(source) == 0:
        raise DataError(
            f"{source.num_samples} sample(s) is fewer than one batch of {size} (the model's fixed batch size)",
            path=label,
        )
    return source


def _compared_constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The constant a scalar input is tested against (``Equal(Gather(Reshape(sr)), 16000)``), or None.

    Follows the input through shape-only ops (Reshape, Squeeze, Unsqueeze, Gather, Cast, Identity)
    to an Equal whose other operand is an initializer or a Constant.
    """
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    names, seen = [name], set()
    while names:
        current = names.pop()
        seen.add(current)
        for node in model.graph.node:
            if current not in node.input:
                continue
            if node.op_type == "Equal":
                other = next((i for i in node.input if i != current), None)
                if other in consts and consts[other].size == 1:
                    return consts[other].reshape(())
            elif node.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Gather", "Cast", "Identity") \
                    and node.input[0] == current and node.output[0] not in seen:
                names.append(node.output[0])
    return None


def _scalar_settings(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """A fixed value for each scalar input of random data: a setting such as a sample rate, not a sample.

    Random values would pick an arbitrary branch or break the model (silero VAD takes sr = 16000
    or 8000 only). The value the model compares the input with is used (the branch it was exported
    for); without one, 1 (True for bool).
    """
    settings = {}
    for spec in specs:
        if not spec.scalar:
            continue
        value = _compared_constant(model, spec.name)
        settings[spec.name] = np.asarray(value if value is not None else 1).astype(spec.dtype)
        logger.warning("random data: scalar input %r fixed at %s%s", spec.name, settings[spec.name].item(),
                       " (the value the model tests it against)" if value is not None else "")
    return settings


def random_data(model: onnx.ModelProto, n: int, seed: int = 0) -> DataSource:
    """``n`` batches of random inputs (normal floats, 0/1 integers). Only for smoke tests.

    Scalar inputs are settings, not data: each gets one fixed value (see :func:`_scalar_settings`).
    """
    if n < 1:
        raise UsageError(f"random data needs n >= 1, got {n}")
    logging.warning(
        "calibrating on random data: the scales are meaningless for real inputs; use it as a smoke test only"
    )
    specs = model_inputs(model)
    return _RandomSource(specs, n, seed, _scalar_settings(model, specs))
