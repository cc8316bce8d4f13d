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
    with pytest.raises(FlatlabError, match="backend ray"):
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


# --- workers never outlive their driver; Ctrl-C stops cleanly ----------------------------------

_DRIVER = '''
import os, sys, time
from pathlib import Path


def setup(folder):
    return folder


def work(folder, task):
    Path(folder, f"{os.getpid()}.pid").write_text(str(task))
    time.sleep(120)  # far longer than the test: only the driver's death can end it early
    return task


if __name__ == "__main__":
    from flatlab.parallel import fan_out

    try:
        for i, r in fan_out(setup, sys.argv[1], work, [0, 1, 2, 3], workers=2, threads_per_worker=1):
            print(i, r, flush=True)
    except KeyboardInterrupt:
        sys.stderr.write("driver: interrupted\\n")
        sys.exit(130)
'''


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _start_driver(tmp_path: Path):
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    folder = tmp_path / "pids"
    folder.mkdir()
    # Its own session: the test can signal the driver's process group like a terminal would.
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while len(list(folder.glob("*.pid"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    pids = [int(p.stem) for p in folder.glob("*.pid")]
    assert len(pids) == 2, "the two workers did not start"
    return proc, pids


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to watch the worker processes")
def test_workers_exit_when_their_driver_is_killed(tmp_path: Path):
    import signal

    proc, pids = _start_driver(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: no cleanup can run in it
        proc.wait()
        left = _wait_gone(pids, 10.0)
        assert not left, f"workers {left} outlived their killed driver"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to watch the worker processes")
def test_ctrl_c_reaches_the_driver_as_keyboard_interrupt_without_worker_tracebacks(tmp_path: Path):
    import signal

    proc, pids = _start_driver(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert err == "driver: interrupted\n", err  # no traceback from any worker
        assert not _wait_gone(pids, 10.0)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

