"""The ``check`` command: compare a Q/DQ model with its float original on real data."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click
import onnx

from qdqsurgeon.calibration import Preprocess, open_data
from qdqsurgeon.check import CheckReport, compare
from qdqsurgeon.errors import DataError, ModelError

__all__ = ["check_command"]

logger = logging.getLogger(__name__)

_LAYERS_SHOWN = 20


def _load(path: str | Path) -> onnx.ModelProto:
    """Read and validate a model through the package's one I/O module."""
    from .io import load

    return load(path, infer_shapes=False)


def _fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _print_table(report: CheckReport, min_sqnr: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Q/DQ vs FP32, {report.num_samples} samples")
    table.add_column("output")
    table.add_column("SQNR dB", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column("max |err|", justify="right")
    nonfinite = any(m.nonfinite_reference or m.nonfinite_candidate for m in report.outputs.values())
    if nonfinite:
        table.add_column("NaN/inf ref / cand", justify="right")
    low = set(report.below(min_sqnr)) if min_sqnr is not None else set()
    for name, m in report.outputs.items():
        sqnr = _fmt(m.sqnr_db)
        row = [name, f"[red]{sqnr}[/red]" if name in low else sqnr, _fmt(m.cosine, 6), f"{m.max_abs:.4g}"]
        if nonfinite:
            row.append(f"{m.nonfinite_reference} / {m.nonfinite_candidate} of {m.values}")
        table.add_row(*row)
    console.print(table)
    if report.top1_agreement is not None:
        console.print(f"top-1 agreement ({report.top1_output}): {report.top1_agreement:.2%}")
    if report.layers is not None:
        layers = Table(title="per-layer SQNR, worst first")
        layers.add_column("tensor")
        layers.add_column("SQNR dB", justify="right")
        for lm in report.layers[:_LAYERS_SHOWN]:
            layers.add_row(lm.tensor, _fmt(lm.sqnr_db))
        console.print(layers)
        if len(report.layers) > _LAYERS_SHOWN:
            console.print(f"... {len(report.layers) - _LAYERS_SHOWN} more (all of them with --json)")


@click.command("check")
@click.argument("fp32", type=click.Path(dir_okay=False, readable=False, path_type=Path))
@click.argument("qdq", type=click.Path(dir_okay=False, readable=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(readable=False, path_type=Path),
              help="Evaluation data: .npz/.npy, an image, or a folder of them.")
@click.option("--preprocess", "preprocess_spec", default=None, metavar="SPEC",
              help="Image preprocessing, e.g. 'size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225'.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per batch when the model's batch dimension is dynamic (default 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--min-sqnr", type=float, default=None, metavar="DB",
              help="Exit with status 1 when any output's SQNR is below DB.")
@click.option("--per-layer", is_flag=True, help="Also score every quantized tensor, worst first.")
def check_command(
    fp32: Path,
    qdq: Path,
    data_path: Path,
    preprocess_spec: str | None,
    batch_size: int | None,
    as_json: bool,
    min_sqnr: float | None,
    per_layer: bool,
) -> None:
    """Compare the Q/DQ model QDQ with the float model FP32 in onnxruntime.

    Reports SQNR (dB), cosine similarity and max abs error per output, top-1 agreement for
    classifiers, and with --per-layer the SQNR of every fake-quantized tensor. In JSON an
    infinite SQNR (identical outputs) is written as the string "inf". NaN/inf values are
    counted, not averaged in: a float model that gives no finite value on the data is refused
    (exit 2), and a Q/DQ model giving NaN/inf where the float model does not fails (exit 1).

    \b
    Example:
      qdqsurgeon check model.onnx model.int8.onnx --data images/ \\
          --preprocess "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225" --min-sqnr 20
    """
    reference = _load(fp32)
    candidate = _load(qdq)
    preprocess = Preprocess.parse(preprocess_spec, Preprocess.from_model(reference)) if preprocess_spec else None
    data = open_data(data_path, reference, preprocess, batch_size=batch_size)
    report = compare(reference, candidate, data, per_layer=per_layer, progress=not as_json and sys.stderr.isatty())
    nonfinite = report.nonfinite_error()
    if isinstance(nonfinite, DataError):
        raise nonfinite  # no report at all: the float model gave nothing finite to compare with
    if as_json:
        click.echo(json.dumps(report.to_dict(), allow_nan=False, indent=2))
    else:
        _print_table(report, min_sqnr)
    if nonfinite is not None:
        raise nonfinite
    if min_sqnr is not None:
        low = report.below(min_sqnr)
        if low:
            worst = min((report.outputs[n].sqnr_db for n in low), key=lambda v: -math.inf if math.isnan(v) else v)
            raise ModelError(f"SQNR below --min-sqnr {min_sqnr:g} dB on {len(low)} output(s) {low} (worst {_fmt(worst)} dB)")
