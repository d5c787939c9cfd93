"""The ``sparsify`` command: prune weights to 2:4 for TensorRT's sparse kernels (issue 16)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from qdqsurgeon.errors import UsageError

__all__ = ["sparsify_command"]

logger = logging.getLogger(__name__)


@click.command("sparsify")
@click.argument("src", metavar="IN", type=click.Path(readable=False))
@click.argument("dst", metavar="OUT", type=click.Path(readable=False))
@click.option("--exclude", multiple=True, help="Regex over node names to leave dense (repeatable).")
@click.option("--calib", "data_path", type=click.Path(readable=False),
              help="Evaluation data (.npz, folder of .npz/.npy or images): report the accuracy cost, and with --max-drop limit it.")
@click.option("--preprocess", default=None, help="Image preprocessing for --calib, as for optimize.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="Largest loss of top-1 agreement with the dense model, in percentage points; layers whose "
                   "pruning would exceed it stay dense (needs --calib and a class-score output).")
@click.option("--report", "report_path", type=click.Path(readable=False), help="Write what was pruned and skipped as JSON.")
def sparsify_command(src: str, dst: str, exclude: tuple[str, ...], data_path: str | None, preprocess: str | None,
                     max_drop: float | None, report_path: str | None) -> None:
    """Prune IN's weights to 2:4 structured sparsity and write OUT.

    Every Conv/Gemm/MatMul whose weight TensorRT could run on sparse Tensor Cores (input channels
    a multiple of 4, not grouped, constant weight; docs/sparsity.md) is pruned by magnitude: in
    each group of 4 weights along the input channels the 2 largest are kept (m4n2_1d). Pruning
    without fine-tuning costs accuracy: the usual path is to prune and fine-tune in the training
    framework, then run qdqsurgeon. With --calib and --max-drop the most sensitive layers are
    tried last and left dense when they would exceed the budget.

    \b
    Example:
      qdqsurgeon sparsify model.onnx model.sparse.onnx --calib eval.npz --max-drop 1
    """
    from .cli import _checked_regexes, _write_atomic
    from .io import check_output_path, check_readable, load, same_file, save
    from .sparsity import sparsify

    check_readable(src)
    check_output_path(dst, src)
    if report_path and any(same_file(Path(report_path), Path(p)) for p in (src, dst)):
        raise UsageError("--report path is the input or output model; give the report its own file", path=report_path)
    if report_path:
        check_output_path(report_path, src)
    if max_drop is not None and data_path is None:
        raise UsageError("--max-drop needs evaluation data: --calib PATH")
    if data_path is not None and not Path(data_path).exists():
        raise UsageError("no such file or folder", path=data_path)
    exclude = _checked_regexes(exclude)
    model = load(src)
    data = None
    if data_path is not None:
        from .calibration import Preprocess, open_data

        data = open_data(data_path, model, Preprocess.parse(preprocess) if preprocess else None)
    res = sparsify(model, exclude=exclude, data=data, max_drop=max_drop)
    save(res.model, dst, input_path=src)
    if report_path:
        payload = res.to_dict() | {"input": src, "output": dst}
        _write_atomic(Path(report_path), json.dumps(payload, indent=2, allow_nan=False, default=str))
    click.echo(f"qdqsurgeon sparsify: {src} -> {dst}")
    click.echo(f"  pruned to 2:4: {len(res.pruned)} layer(s), {100 * res.macs_pruned_fraction:.1f}% of weighted MACs"
               + (f"; already 2:4: {len(res.already)}" if res.already else ""))
    for name in res.pruned:
        sens = f" (pruned alone: {res.sensitivity[name]:.2f} top-1 points lost)" if name in res.sensitivity else ""
        click.echo(f"    {name}{sens}")
    if res.skipped:
        click.echo(f"  left dense: {len(res.skipped)}")
        for name, why in res.skipped.items():
            click.echo(f"    {name}: {why}")
    if res.top1_agreement is not None:
        click.echo(f"  accuracy cost on {data_path}: top-1 agreement with the dense model {100 * res.top1_agreement:.2f}% "
                   f"(-{res.drop:.2f} points), output SQNR {res.sqnr_db:.2f} dB")
    elif res.sqnr_db is not None:
        click.echo(f"  accuracy cost on {data_path}: output SQNR {res.sqnr_db:.2f} dB against the dense model")
    click.echo("  note: pruning without fine-tuning costs accuracy; prune and fine-tune in the training framework "
               "for a production model")
