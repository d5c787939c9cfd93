"""Click commands ``build``, ``engine-report`` and ``engine-diff``.

Thin wrappers over :func:`~qdqsurgeon.trt.build.build_engine`,
:func:`~qdqsurgeon.trt.report.engine_report` and :func:`~qdqsurgeon.trt.diff.engine_diff`.
Errors are raised as :class:`~qdqsurgeon.errors.QdqError`; the main ``qdqsurgeon`` group turns
them into ``error: <message>`` on stderr and the exit code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from qdqsurgeon.trt.build import DEFAULT_PROFILE_ITERATIONS, DEFAULT_WORKSPACE_MB, build_engine, parse_shapes, shape_ranges
from qdqsurgeon.trt.diff import engine_diff
from qdqsurgeon.trt.html import write_html
from qdqsurgeon.trt.report import engine_report

__all__ = ["build_command", "engine_report_command", "engine_diff_command", "COMMANDS"]

logger = logging.getLogger(__name__)

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.command(
    "build",
    help="""Build MODEL into a TensorRT engine (strongly typed, no precision flags).

Needs the TensorRT Python package (10.x or 11.x) and an NVIDIA GPU; without it the command
exits with code 3. Dumps the layer info and per-layer profile for engine-report.

\b
Example:
  qdqsurgeon build model.qdq.onnx --engine model.plan \\
      --layer-info model.layers.json --profile model.profile.json \\
      --min-shapes input:1x3x224x224 --opt-shapes input:8x3x224x224 --max-shapes input:32x3x224x224
""",
)
@click.argument("model", type=_PATH)
@click.option("--engine", "engine_path", type=_PATH, required=True, help="Where to write the serialized engine.")
@click.option("--layer-info", type=_PATH, default=None, help="Write the inspector JSON (as trtexec --exportLayerInfo).")
@click.option("--profile", type=_PATH, default=None, help="Run the engine and write per-layer times (as trtexec --exportProfile).")
@click.option("--workspace", type=int, default=DEFAULT_WORKSPACE_MB, show_default=True, help="Workspace memory pool limit in MB.")
@click.option("--min-shapes", default=None, help="name:1x3x224x224,... minimum shapes of dynamic inputs.")
@click.option("--opt-shapes", default=None, help="name:1x3x224x224,... shapes to optimize for.")
@click.option("--max-shapes", default=None, help="name:1x3x224x224,... maximum shapes.")
@click.option("--iterations", type=int, default=DEFAULT_PROFILE_ITERATIONS, show_default=True, help="Profiled runs for --profile.")
@click.option("--sparsity", is_flag=True,
              help="Let TensorRT use 2:4 sparse kernels where the weights qualify (BuilderFlag.SPARSE_WEIGHTS; see inspect).")
def build_command(
    model: Path,
    engine_path: Path,
    layer_info: Path | None,
    profile: Path | None,
    workspace: int,
    min_shapes: str | None,
    opt_shapes: str | None,
    max_shapes: str | None,
    iterations: int,
    sparsity: bool,
) -> None:
    shapes = shape_ranges(
        parse_shapes(min_shapes, flag="--min-shapes"),
        parse_shapes(opt_shapes, flag="--opt-shapes"),
        parse_shapes(max_shapes, flag="--max-shapes"),
    )
    result = build_engine(
        model,
        engine_path,
        layer_info=layer_info,
        profile=profile,
        workspace_mb=workspace,
        shapes=shapes,
        profile_iterations=iterations,
        sparsity=sparsity,
    )
    click.echo(
        f"engine: {result.engine_path} ({result.engine_bytes} bytes, TensorRT {result.tensorrt_version}, "
        f"{'strongly typed' if result.strongly_typed else 'weakly typed'}{', sparse weights allowed' if result.sparsity else ''}, "
        f"{result.build_seconds:.1f} s)"
    )
    if result.layer_info_path:
        click.echo(f"layer info: {result.layer_info_path}")
    if result.profile_path:
        click.echo(f"profile: {result.profile_path}")
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)


@click.command(
    "engine-report",
    help="""Report on an engine from its layer-info JSON (trtexec --exportLayerInfo).

Counts layers by type, standalone Q/DQ and reformat layers and their time share, INT8 vs
float compute time, and lists findings (E2/E3) grouped by pattern with the time they cost and
the pass that fixes each. With --onnx, layers and findings are mapped to ONNX node names (E4).
The GPU and TensorRT version come from TREx metadata beside LAYERS or from --metadata.

\b
Example:
  qdqsurgeon engine-report model.layers.json --profile model.profile.json \\
      --onnx model.qdq.onnx --html report.html
""",
)
@click.argument("layers", type=_PATH)
@click.option("--profile", type=_PATH, default=None, help="Per-layer times (trtexec --exportProfile).")
@click.option("--onnx", "onnx_model", type=_PATH, default=None, help="The ONNX model the engine was built from.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--html", "html_out", type=_PATH, default=None, help="Also write a self-contained HTML report.")
@click.option("--per-layer", "show_layers", is_flag=True, help="Include the per-layer table in the text output.")
@click.option("--metadata", "metadata", type=_PATH, multiple=True,
              help="A trtexec log or TREx *.metadata.json with the GPU and TensorRT version (repeatable; "
                   "TREx metadata files beside LAYERS are read without it).")
def engine_report_command(
    layers: Path,
    profile: Path | None,
    onnx_model: Path | None,
    as_json: bool,
    html_out: Path | None,
    show_layers: bool,
    metadata: tuple[Path, ...],
) -> None:
    report = engine_report(layers, profile=profile, onnx_model=onnx_model, metadata=list(metadata))
    if html_out is not None:
        write_html(report, html_out)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.to_text(show_layers=show_layers))
        if html_out is not None:
            click.echo(f"\nHTML report: {html_out}")


@click.command(
    "engine-diff",
    help="""Compare two engines' layer info (and profiles): counts, time, changed layers.

Layers are matched by the ONNX nodes they contain. A side given as an .onnx model stands for the
engine the static analysis predicts for it (diff a prediction against a real dump).

\b
Example:
  qdqsurgeon engine-diff before.layers.json after.layers.json \\
      --profile-a before.profile.json --profile-b after.profile.json
""",
)
@click.argument("layers_a", type=_PATH)
@click.argument("layers_b", type=_PATH)
@click.option("--profile-a", type=_PATH, default=None, help="Profile of engine A.")
@click.option("--profile-b", type=_PATH, default=None, help="Profile of engine B.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the diff as a self-contained HTML page.")
@click.option("--trt-version", "trt_version", default=None,
              help="For an .onnx side (its predicted engine): the TensorRT release the rules follow.")
def engine_diff_command(
    layers_a: Path,
    layers_b: Path,
    profile_a: Path | None,
    profile_b: Path | None,
    as_json: bool,
    html_out: Path | None,
    trt_version: str | None,
) -> None:
    diff = engine_diff(layers_a, layers_b, profile_a=profile_a, profile_b=profile_b, trt_version=trt_version)
    if html_out is not None:
        from qdqsurgeon.trt.html import write_diff_html

        write_diff_html(diff, html_out)
    click.echo(json.dumps(diff.to_dict(), indent=2) if as_json else diff.to_text())
    if html_out is not None and not as_json:
        click.echo(f"\nHTML diff: {html_out}")


COMMANDS: tuple[click.Command, ...] = (build_command, engine_report_command, engine_diff_command)
