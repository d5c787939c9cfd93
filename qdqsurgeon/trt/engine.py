"""Read TensorRT engine inspection output into plain dataclasses.

Two inputs are understood (format notes in ``trt-rules.md`` §4):

* layer information, as written by ``trtexec --exportLayerInfo`` or
  ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``: detailed or
  names-only, in the TensorRT 8.x / 10.x spelling (one ``Format/Datatype`` key, ``Bindings``)
  and the 11.x spelling (``Format`` plus ``DataType``/``Datatype``, ``I/O Tensors``);
* per-layer timing, as written by ``trtexec --exportProfile``.

Nothing here judges the engine; :mod:`qdqsurgeon.trt.report` does. The parser only
normalises names, precisions and the ONNX node names each layer came from (rule E4).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qdqsurgeon.errors import ModelError, UsageError

__all__ = [
    "FLOAT_PRECISIONS",
    "TensorInfo",
    "IOTensor",
    "Layer",
    "EngineInfo",
    "ProfileRecord",
    "Profile",
    "precision_of",
    "load_json_document",
    "parse_layer_info",
    "load_layer_info",
    "parse_profile",
    "load_profile",
    "onnx_names_from_metadata",
    "onnx_names_from_layer_name",
    "any_float",
]

logger = logging.getLogger(__name__)

FLOAT_PRECISIONS = frozenset({"fp32", "fp16", "bf16"})

# §4 precision tokens, matched as whole words in this order (BFloat16 before Float, UInt8
# before Int8). Case-insensitive with an optional enum "k" prefix, so that TRT 11's data-type
# field works whichever spelling it uses ("Int8", "INT8", "kINT8").
_PRECISION_TOKENS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"\b(?:k)?(?:{alts})\b", re.IGNORECASE), token)
    for alts, token in (
        ("BFloat16|BF16", "bf16"),
        ("FP16|Half", "fp16"),
        ("FP8|FP8E4M3", "fp8"),
        ("FP4|FP4E2M1", "fp4"),
        ("UInt8", "uint8"),
        ("Int8", "int8"),
        ("Int4", "int4"),
        ("Int32", "int32"),
        ("Int64", "int64"),
        ("Bool", "bool"),
        ("FP32|Float", "fp32"),
    )
)

# TRT 11 appends the enum to the format, e.g. "Row major linear (kLINEAR)".
_ENUM_SUFFIX = re.compile(r"\s*\(k[A-Z0-9_]+\)\s*$")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_UNNAMED = re.compile(r"^\(Unnamed Layer\*\s*\d+\)")
_PROFILE_SUFFIX = re.compile(r" \[profile \d+\]$")
_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$")


def precision_of(text: str | None) -> str | None:
    """Return the precision token (``int8``, ``fp16``, ...) named in a format/type string."""
    if not text:
        return None
    for pattern, token in _PRECISION_TOKENS:
        if pattern.search(text):
            return token
    return None


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor of an engine layer."""

    name: str
    dims: tuple[int, ...] | None = None
    format: str | None = None
    precision: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class IOTensor:
    """A network input or output (``Bindings`` up to 10.x, ``I/O Tensors`` on 11.x)."""

    name: str
    mode: str | None = None  # "input", "output", or None when the dump does not say
    precision: str | None = None
    dims: tuple[int, ...] | None = None


@dataclass
class Layer:
    """One engine layer (a kernel, possibly many fused ONNX nodes)."""

    index: int
    name: str
    layer_type: str | None = None
    parameter_type: str | None = None
    origin: str | None = None
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    metadata: str | None = None
    tactic_name: str | None = None
    weights_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """The logical type: ``ParameterType`` when present (§4), else ``LayerType``."""
        return self.parameter_type or self.layer_type or "Unknown"

    @property
    def in_precisions(self) -> list[str | None]:
        return [t.precision for t in self.inputs]

    @property
    def out_precisions(self) -> list[str | None]:
        return [t.precision for t in self.outputs]

    @property
    def activation_precision(self) -> str | None:
        """Precision of the first input, which is the activation for conv/gemm/pool kernels."""
        return self.inputs[0].precision if self.inputs else None

    @property
    def is_reformat_type(self) -> bool:
        return "Reformat" in (self.layer_type or "", self.parameter_type or "")

    @property
    def is_standalone_qdq(self) -> bool:
        """A Q or DQ that TensorRT could not fuse and runs as its own kernel.

        ``Origin: "QDQ"`` when the dump says so; older dumps show such layers as ``Scale``
        (or a ``Reformat`` without ``Origin``) converting to or from Int8 on exactly one side.
        """
        if self.origin is not None:
            return self.origin.upper() == "QDQ"
        if self.is_reformat_type or self.kind == "Scale" or self.layer_type == "Scale":
            ins = {p for p in self.in_precisions if p}
            outs = {p for p in self.out_precisions if p}
            return ("int8" in ins) != ("int8" in outs)
        return False

    @property
    def is_reformat(self) -> bool:
        """A layout/type copy that is not a Q/DQ (``Origin: "REFORMAT"``); free NoOps excluded."""
        if self.is_standalone_qdq:
            return False
        if self.origin is not None:
            return self.origin.upper() == "REFORMAT"
        return self.is_reformat_type

    @property
    def changes_precision(self) -> bool:
        ins = [p for p in self.in_precisions if p]
        outs = [p for p in self.out_precisions if p]
        return bool(ins and outs) and set(ins) != set(outs)

    @property
    def is_compute(self) -> bool:
        """True for layers that do arithmetic (not Q/DQ, reformat, free or data-movement)."""
        if self.is_standalone_qdq or self.is_reformat:
            return False
        return self.kind not in {"NoOp", "Shuffle", "Slice", "Padding", "Reformat", "Constant", "Unknown"}

    @property
    def has_sparse_weights(self) -> bool:
        """The builder found the weights 2:4 (``HasSparseWeights`` 1; ``AllowSparse`` in 8.x guides' example)."""
        return any(str(self.raw.get(k, 0)).strip() in ("1", "True", "true") for k in ("HasSparseWeights", "AllowSparse"))

    @property
    def sparse_kernel(self) -> bool:
        """The chosen tactic is a sparse Tensor Core kernel: its name contains ``sparse``
        (``sm80_xmma_fprop_sparse_conv_*``, ``sm80_xmma_fprop_avdt_sparse_int8int8_*``; docs/sparsity.md)."""
        return "sparse" in (self.tactic_name or "").lower()

    def onnx_names(self) -> list[str]:
        """ONNX node names this layer came from (E4), unfiltered: Metadata, else the Name."""
        names = onnx_names_from_metadata(self.metadata)
        return names if names else onnx_names_from_layer_name(self.name)


@dataclass
class EngineInfo:
    """A parsed layer-information dump."""

    layers: list[Layer]
    io_tensors: list[IOTensor] = field(default_factory=list)
    detailed: bool = True
    source: str | None = None

    def producers(self) -> dict[str, int]:
        """Tensor name → index of the layer writing it."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for t in layer.outputs:
                out.setdefault(t.name, layer.index)
        return out

    def consumers(self) -> dict[str, list[tuple[int, int]]]:
        """Tensor name → [(layer index, input position)] of the layers reading it."""
        out: dict[str, list[tuple[int, int]]] = {}
        for layer in self.layers:
            for pos, t in enumerate(layer.inputs):
                out.setdefault(t.name, []).append((layer.index, pos))
        return out


@dataclass(frozen=True)
class ProfileRecord:
    """One per-layer record of ``--exportProfile``."""

    name: str
    time_ms: float
    average_ms: float
    median_ms: float | None = None
    percentage: float | None = None


@dataclass
class Profile:
    """A parsed ``--exportProfile`` file."""

    records: list[ProfileRecord]
    count: int | None = None
    source: str | None = None

    @property
    def total_average_ms(self) -> float:
        """Sum of per-layer ``averageMs``. Not the latency when auxiliary streams overlap (§4)."""
        return sum(r.average_ms for r in self.records)

    def by_name(self) -> dict[str, ProfileRecord]:
        out: dict[str, ProfileRecord] = {}
        for r in self.records:
            # 8.x adds " [profile N]" for optimization profiles N > 0; keep profile 0 first.
            out.setdefault(r.name, r)
            out.setdefault(_PROFILE_SUFFIX.sub("", r.name), r)
        return out


# --------------------------------------------------------------------------- loading


def load_json_document(path: str | Path) -> Any:
    """Read a JSON file that may carry log lines before or after the JSON value.

    trtexec logs and some published dumps (the TRT 10 cookbook's ``.log``) wrap the JSON in
    other text, so on a decode failure the first ``{``/``[`` that starts a complete JSON value
    is used instead.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError("file not found", path=str(p))
    if p.is_dir():
        raise UsageError("is a directory, expected a JSON file", path=str(p))
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read: {exc.strerror}", path=str(p)) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"(?m)^[ \t]*[\[{]", text):
        start = match.end() - 1
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, (dict, list)) and value:
            logger.info("%s: JSON found at offset %d after non-JSON text", p, start)
            return value
    raise ModelError("not JSON (expected trtexec --exportLayerInfo / --exportProfile output)", path=str(p))


def _dims(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return tuple(int(v) for v in value)
    return None


def _tensor(obj: Any) -> TensorInfo:
    if isinstance(obj, str):
        return TensorInfo(name=obj)
    if not isinstance(obj, dict):
        return TensorInfo(name=str(obj))
    fmt = obj.get("Format/Datatype")
    dtype = obj.get("DataType", obj.get("Datatype"))
    if fmt is None:
        fmt = obj.get("Format")
    fmt = _ENUM_SUFFIX.sub("", fmt) if isinstance(fmt, str) else None
    dtype = _ENUM_SUFFIX.sub("", dtype) if isinstance(dtype, str) else None
    # TRT 11: prefer the data-type field; the format may not name a type at all.
    precision = precision_of(dtype) or precision_of(fmt)
    return TensorInfo(
        name=str(obj.get("Name", "")),
        dims=_dims(obj.get("Dimensions")),
        format=fmt if fmt is not None else dtype,
        precision=precision,
        location=obj.get("Location"),
    )


def _io_tensors(top: dict[str, Any]) -> list[IOTensor]:
    items = top.get("I/O Tensors", top.get("Bindings")) or []
    out: list[IOTensor] = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            out.append(IOTensor(name=item))
        elif isinstance(item, dict):
            mode = item.get("IOMode")
            dtype = item.get("DataType", item.get("Datatype", item.get("Format/Datatype")))
            out.append(
                IOTensor(
                    name=str(item.get("Name", "")),
                    mode=str(mode).lower() if mode else None,
                    precision=precision_of(dtype if isinstance(dtype, str) else None),
                    dims=_dims(item.get("Dimensions")),
                )
            )
    return out


def _weights_type(obj: dict[str, Any]) -> str | None:
    w = obj.get("Weights")
    if isinstance(w, dict):
        return precision_of(str(w.get("Type", "")))
    return None


def parse_layer_info(doc: Any, *, source: str | None = None) -> EngineInfo:
    """Turn a decoded ``--exportLayerInfo`` document into an :class:`EngineInfo`."""
    where = source or "layer info"
    if isinstance(doc, list):
        if doc and isinstance(doc[0], dict) and "count" in doc[0] and len(doc[0]) == 1:
            raise ModelError("this is an --exportProfile file, not layer info (pass it with --profile)", path=where)
        # A bare list of layer objects (inspector output for a subset): accept it.
        doc = {"Layers": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("Layers"), list):
        raise ModelError("not a TensorRT layer-info dump: no \"Layers\" list (expected trtexec --exportLayerInfo output)", path=where)
    raw_layers = doc["Layers"]
    layers: list[Layer] = []
    detailed = any(isinstance(x, dict) for x in raw_layers)
    for i, item in enumerate(raw_layers):
        if isinstance(item, str):
            # Names-only verbosity: nothing but the name survives.
            layers.append(Layer(index=i, name=item))
            continue
        if not isinstance(item, dict) or "Name" not in item:
            raise ModelError(f"layer {i} is neither a name nor an object with a \"Name\"", path=where)
        layers.append(
            Layer(
                index=i,
                name=str(item["Name"]),
                layer_type=item.get("LayerType"),
                parameter_type=item.get("ParameterType"),
                origin=item.get("Origin"),
                inputs=[_tensor(t) for t in item.get("Inputs", []) or []],
                outputs=[_tensor(t) for t in item.get("Outputs", []) or []],
                metadata=item.get("Metadata") if isinstance(item.get("Metadata"), str) else None,
                tactic_name=item.get("TacticName"),
                weights_type=_weights_type(item),
                raw=item,
            )
        )
    if not detailed and layers:
        logger.warning(
            "%s: names-only layer info; rebuild with --profilingVerbosity=detailed for types and precisions", where
        )
    return EngineInfo(layers=layers, io_tensors=_io_tensors(doc), detailed=detailed, source=source)


def load_layer_info(path: str | Path) -> EngineInfo:
    """Read a layer-info JSON file (``--exportLayerInfo``)."""
    return parse_layer_info(load_json_document(path), source=str(path))


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def parse_profile(doc: Any, *, source: str | None = None) -> Profile:
    """Turn a decoded ``--exportProfile`` document into a :class:`Profile`."""
    where = source or "profile"
    if isinstance(doc, dict) and "Layers" in doc:
        raise ModelError("this is layer info, not an --exportProfile file", path=where)
    if not isinstance(doc, list):
        raise ModelError("not a TensorRT profile: expected a JSON list (trtexec --exportProfile output)", path=where)
    count: int | None = None
    records: list[ProfileRecord] = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise ModelError(f"profile record {i} is not an object", path=where)
        if "name" not in item:
            if "count" in item:
                count = int(item["count"])
                continue
            raise ModelError(f"profile record {i} has no \"name\"", path=where)
        avg = _num(item.get("averageMs"))
        total = _num(item.get("timeMs"))
        if avg is None and total is not None and count:
            avg = total / count
        if avg is None:
            raise ModelError(f"profile record {i} ({item['name']}) has no averageMs", path=where)
        records.append(
            ProfileRecord(
                name=str(item["name"]),
                time_ms=total if total is not None else avg * (count or 1),
                average_ms=avg,
                median_ms=_num(item.get("medianMs")),
                percentage=_num(item.get("percentage")),
            )
        )
    return Profile(records=records, count=count, source=source)


def load_profile(path: str | Path) -> Profile:
    """Read a per-layer profile JSON file (``--exportProfile``)."""
    return parse_profile(load_json_document(path), source=str(path))


# --------------------------------------------------------------------------- ONNX names (E4)


def onnx_names_from_metadata(metadata: str | None) -> list[str]:
    """Extract ``[ONNX Layer: name]`` entries; TRT 10 separates them with \\x1e or \\x1f (§4)."""
    if not metadata:
        return []
    names: list[str] = []
    for part in re.split(r"[\x1e\x1f]", metadata):
        for name in _ONNX_LAYER.findall(part):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def _unwrap_pwn(part: str) -> list[str]:
    """``PWN(PWN(/Sub), PWN(/Div))`` → ``["/Sub", "/Div"]``; other parts are returned as is."""
    if not part.startswith("PWN(") or not part.endswith(")"):
        return [part]
    inner = part[4:-1]
    pieces: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(inner[start:i].strip())
            start = i + 1
    pieces.append(inner[start:].strip())
    out: list[str] = []
    for p in pieces:
        out.extend(_unwrap_pwn(p))
    return out


def onnx_names_from_layer_name(name: str) -> list[str]:
    """Candidate ONNX node names in an engine layer name (§4 rule 2).

    Splits fused names on ``" + "`` (and horizontally merged ones on ``" || "``), unwraps
    ``PWN(...)``, drops generated layers and ``(Unnamed Layer* N)`` entries. Weight names
    cannot be told from node names here; :func:`qdqsurgeon.trt.report.map_to_onnx` drops
    every candidate that is not a node of the ONNX model.
    """
    name = _PROFILE_SUFFIX.sub("", name)
    if name.startswith("Reformatting CopyNode") or name.startswith("__myl"):
        return []
    foreign = _FOREIGN.match(name)
    if foreign:
        # A Myelin region names only its first and last node.
        return [n for n in foreign.group(1).split("...") if n]
    out: list[str] = []
    for group in name.split(" || "):
        for part in group.split(" + "):
            for piece in _unwrap_pwn(part.strip()):
                if not piece or _UNNAMED.match(piece):
                    continue
                if piece.startswith(("copied_squeeze_after_", "reshape_after_", "reshape_before_")):
                    continue
                if piece not in out:
                    out.append(piece)
    return out


def any_float(precisions: Iterable[str | None]) -> bool:
    """True when any of the precisions is a float type."""
    return any(p in FLOAT_PRECISIONS for p in precisions)
