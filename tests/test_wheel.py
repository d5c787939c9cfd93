"""A plain (non-editable) install ships everything the package loads at run time (issue 2).

The wheel goes into a new plain venv. The venv sees the running interpreter's installed
dependencies through a ``.pth`` file listing its site-packages folders, but not the checkout:
``--system-site-packages`` is not enough, because inside a venv it exposes the *base*
interpreter's packages, not the venv's (issue 12: ``ModuleNotFoundError: onnx`` when the README's
test command runs in a fresh venv).
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .helpers import REPO


def _dependency_dirs() -> list[str]:
    """Site-packages folders of the running interpreter, without the checkout."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    found: list[str] = []
    for c in candidates:
        p = Path(c).resolve()
        if p.is_dir() and REPO not in (p, *p.parents) and str(p) not in found:
            found.append(str(p))
    return found


def _venv_seeing_dependencies(venv: Path) -> Path:
    """A plain venv whose ``sys.path`` ends with the running interpreter's site-packages.

    A ``.pth`` line naming a folder adds it to ``sys.path`` without running the ``.pth`` files
    inside it, so an editable install of the checkout in the outer environment stays invisible.
    """
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "_outer_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    return py


def test_dependency_dirs_exclude_the_checkout():
    dirs = _dependency_dirs()
    assert dirs, "the running interpreter has no site-packages folder"
    assert all(REPO not in Path(d).parents and Path(d) != REPO for d in dirs)


@pytest.mark.slow
def test_wheel_install_runs_the_example(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("qdqsurgeon-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "qdqsurgeon/examples/example_resnet.onnx" in names
    assert "qdqsurgeon/examples/example_calibration.npz" in names
    venv = tmp_path / "venv"
    py = _venv_seeing_dependencies(venv)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import qdqsurgeon, onnx; print(qdqsurgeon.__file__)"], cwd=work,
                           capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout, where.stdout
    run = subprocess.run([str(venv / "bin" / "qdqsurgeon"), "optimize", "--example", "out.onnx"], cwd=work,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (work / "out.onnx").exists()
    assert "insert-qdq" in run.stdout
