"""The fan-out module: local processes and Ray give the driver the same results as one process."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from flatlab.errors import FlatlabError
from flatlab.parallel import check_address, fan_out, parse_address


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_offset(offset: int) -> int:
    return offset


def _work_square(offset: int, task: int) -> tuple[int, int]:
    return task, task * task + offset


def test_dead_address_fails_fast():
    start = time.monotonic()
    with pytest.raises(FlatlabError, match="nothing answers"):
        check_address(f"127.0.0.1:{_closed_port()}", timeout=2.0)
    with pytest.raises(FlatlabError, match="nothing answers"):
        list(fan_out(_setup_offset, 1, _work_square, [1, 2], backend="ray", address=f"127.0.0.1:{_closed_port()}"))
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("text", ["localhost", "127.0.0.1:", "127.0.0.1:abc", "127.0.0.1:70000", ":6379"])
def test_malformed_address(text):
    with pytest.raises(FlatlabError, match="address"):
        parse_address(text)


def test_bad_options():
    with pytest.raises(FlatlabError, match="backend"):
        list(fan_out(_setup_offset, 0, _work_square, [1], backend="mpi"))
    with pytest.raises(FlatlabError, match="workers"):
        list(fan_out(_setup_offset, 0, _work_square, [1], workers=0))
    with pytest.raises(FlatlabError, match="--backend ray"):
        list(fan_out(_setup_offset, 0, _work_square, [1], address="127.0.0.1:1"))


def test_local_processes_equal_in_process():
    tasks = list(range(7))
    inline = dict(fan_out(_setup_offset, 3, _work_square, tasks))
    spread = dict(fan_out(_setup_offset, 3, _work_square, tasks, workers=2))
    assert inline == spread == {i: (i, i * i + 3) for i in tasks}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance on the loopback interface, started and stopped here (once)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1, not the LAN's
    # Ray's workers import this module's task functions: put the tests folder on their path.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


def test_ray_surface_equals_one_worker(ray_cluster, mlp_run, tmp_path):
    """The same surface through `--backend ray --address` (a second driver joining the cluster)
    and in one local process, and the fan-out used directly on the running session."""
    import subprocess
    import sys

    from flatlab.cli import main

    tasks = list(range(5))
    assert dict(fan_out(_setup_offset, 1, _work_square, tasks, backend="ray", workers=2)) == \
        {i: (i, i * i + 1) for i in tasks}

    common = ["surface", str(mlp_run), "--x", "-1:1:4", "--y", "0:1:3", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one.h5")]) == 0
    proc = subprocess.run([sys.executable, "-m", "flatlab.cli", *common, "--backend", "ray", "--address", ray_cluster,
                           "--workers", "2", "--out", str(tmp_path / "ray.h5")],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same(tmp_path / "one.h5", tmp_path / "ray.h5")


def _assert_same(a: Path, b: Path) -> None:
    from flatlab.surface.io import read_surface_file

    fa, fb = read_surface_file(a), read_surface_file(b)
    assert fa["attrs"] == fb["attrs"]
    assert set(fa["arrays"]) == set(fb["arrays"])
    for key, arr in fa["arrays"].items():
        np.testing.assert_array_equal(arr, fb["arrays"][key], err_msg=key)
