"""sensitivity --ray on a throwaway local Ray head: the same figures as the local path, and one line when unreachable."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import qdqsurgeon
from qdqsurgeon.calibration import open_data
from qdqsurgeon.cli import cli
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.sensitivity import analyze

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1.0).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A one-CPU Ray head on loopback, in its own process group, ended by its id (not ``ray stop``, which ends
    every Ray process on the machine, other users' too)."""
    # Ray's socket paths must stay under 107 characters, so not pytest's long tmp_path.
    temp = tempfile.mkdtemp(prefix="qdqray")
    gcs, client = _free_port(), _free_port()
    cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--ray-client-server-port", str(client),
           "--num-cpus", "1", "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"]
    for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"):
        cmd += [flag, str(_free_port())]
    # No PYTHONPATH for the cluster: the workers must get this package from the driver (py_modules).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # else SIGTERM waits 30 s for the node to drain
    # Token authentication off on both ends: Ray 2.5x turns it on when ~/.ray/auth_token exists, and another
    # process on the machine can create that file between this head's start and the driver's connection.
    env["RAY_AUTH_MODE"] = "disabled"
    driver_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _answers(client):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"gcs": f"127.0.0.1:{gcs}", "client": f"ray://127.0.0.1:{client}"}
    finally:
        head.terminate()  # ray start --block ends the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of its process group outlived it
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if driver_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = driver_mode


@pytest.fixture(scope="module")
def quantized():
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    return model, qdqsurgeon.optimize(model, ranges=ranges).model


def _figures(report) -> dict:
    data = report.to_dict()
    for key in ("seconds", "workers"):  # where and how fast it ran
        data.pop(key)
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)  # a cluster that never schedules the actors must not hang the suite
def test_ray_cluster_gives_the_local_figures(ray_head, quantized, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "")
    model, q = quantized

    def run(**where):
        return analyze(q, open_data(example_calibration(), model), progress=False, **where)

    # --jobs 2 and the Ray workers both run one intra-op thread per session: the figures are equal, not close
    local = _figures(run(jobs=2))
    assert local["groups"] == len(local["ranked"]) > 3
    for form in ("gcs", "client"):
        report = run(ray_address=ray_head[form])
        assert report.workers == f"Ray cluster at {ray_head[form]}, 1 worker"
        assert _figures(report) == local, form
        assert not ray.is_initialized()  # the connection qdqsurgeon opened is closed


@pytest.mark.parametrize("form", ["host:port", "ray://host:port", "auto"])
def test_ray_unreachable_address_is_one_line(form, monkeypatch):
    nowhere = f"127.0.0.1:{_free_port()}"  # bound and released: nothing listens there
    address = {"host:port": nowhere, "ray://host:port": f"ray://{nowhere}", "auto": "auto"}[form]
    monkeypatch.setenv("RAY_ADDRESS", nowhere if form == "auto" else "")
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["sensitivity", str(example_model()), "--calib", str(example_calibration()),
                                   "--ray", address])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: cannot reach the Ray cluster at {address}") and "refused" in res.stderr
    assert time.monotonic() - t0 < 30  # checked before calibration; Ray alone waits minutes
