"""A plain (non-editable) install ships everything the package loads at run time (issue 2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from .helpers import REPO


@pytest.mark.slow
def test_wheel_install_runs_the_example(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("qdqsurgeon-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "qdqsurgeon/examples/example_resnet.onnx" in names
    assert "qdqsurgeon/examples/example_calibration.npz" in names
    # A venv that sees the installed dependencies but not the checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import qdqsurgeon; print(qdqsurgeon.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert str(venv) in where, where
    run = subprocess.run([str(venv / "bin" / "qdqsurgeon"), "optimize", "--example", "out.onnx"], cwd=work,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (work / "out.onnx").exists()
    assert "insert-qdq" in run.stdout
