"""Where work fans out: in this process, over local processes, or over a Ray cluster.

One small API that every long job uses (``flatlab surface``, ``flatlab sweep``)::

    for index, result in fan_out(setup, setup_arg, work, tasks, backend="local", workers=4):
        ...   # the driver alone writes results (journal, HDF5)

Each worker calls ``state = setup(setup_arg)`` once, then ``work(state, task)`` for every task it
is given; results come back to the driver as they finish, tagged with the task's index. ``setup``
and ``work`` must be module-level functions (they are pickled by reference) and ``setup_arg`` and
the tasks picklable. Workers never write result files.

Backends:

* ``local``: ``workers <= 1`` runs in this process; more start that many fresh processes
  (``spawn``: no forked PyTorch thread pools), each with ``cpu_count // workers`` threads.
  Workers never outlive their driver: a watchdog thread in each one polls its parent pid every
  :data:`WATCHDOG_INTERVAL_S` seconds and ends the worker once the driver is gone (even killed by
  SIGKILL, which runs no cleanup in the driver). Workers ignore SIGINT: Ctrl-C reaches the
  whole process group, but only the driver turns it into a ``KeyboardInterrupt`` (no traceback
  from every worker); the driver then stops its workers at once and re-raises it, so a caller
  can save its progress and stop resumably. Any other early exit of the driver's loop (a task's
  exception, the consumer closing the generator) stops the workers the same way.
* ``ray``: one Ray actor per worker (``num_cpus=1`` each). ``address="HOST:PORT"`` joins a
  running cluster (checked first with a TCP connect of a few seconds: Ray itself retries a dead
  address for minutes); without an address an already initialised Ray session is used, else a
  local one is started for the job and stopped after it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flatlab.errors import ConfigError, FlatlabError

BACKENDS = ("local", "ray")

#: Seconds the TCP check waits for a Ray address to answer.
CONNECT_TIMEOUT_S = 3.0

_WORKER_STATE: dict[str, Any] = {}

#: Seconds between a local worker's checks that its driver still runs.
WATCHDOG_INTERVAL_S = 0.5


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (also ``ray://HOST:PORT``), validating the port."""
    text = str(address).strip()
    if text.startswith("ray://"):
        text = text[len("ray://"):]
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError("address", f"{address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, the head node's GCS port)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError("address", f"{address!r}: the port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError("address", f"{address!r}: port {port} is outside 1..65535")
    return host, port


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> tuple[str, int]:
    """Check that ``HOST:PORT`` accepts a TCP connection within ``timeout`` seconds.

    Raises:
        FlatlabError: the address is malformed, the host unknown, or nothing answers there.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        raise FlatlabError(f"Ray address {address}: unknown host {host!r}") from None
    except (TimeoutError, OSError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise FlatlabError(
            f"nothing answers at Ray address {host}:{port} ({reason} after at most {timeout:g} s): "
            f"start the cluster with `ray start --head --port {port}` or fix --address"
        ) from None
    return host, port


def default_threads(workers: int) -> int:
    """Threads per local worker process: the CPU cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _watch_driver(driver_pid: int, interval: float) -> None:
    """Worker side: end this process once its driver is gone. A dead driver's children are
    re-parented (to init or a subreaper), so ``getppid`` no longer returns the driver's pid;
    the driver's pid may be recycled later, but this process's parent never becomes it again."""
    while True:
        if os.getppid() != driver_pid:
            os._exit(1)  # no cleanup to run: workers write no files (the driver does)
        time.sleep(interval)


def _init_local_worker(setup: Callable[[Any], Any], setup_arg: Any, threads: int,
                       driver_pid: int | None = None) -> None:
    import copy

    import torch

    # Ctrl-C goes to the whole process group; the driver alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if driver_pid is not None:
        threading.Thread(target=_watch_driver, args=(driver_pid, WATCHDOG_INTERVAL_S), daemon=True,
                         name="flatlab-driver-watchdog").start()

    # torch's multiprocessing reductions hand tensors to spawned workers as *shared memory*:
    # without a private copy, workers that write weights in place (surfaces) race each other.
    setup_arg = copy.deepcopy(setup_arg)

    torch.set_num_threads(threads)
    _WORKER_STATE["state"] = setup(setup_arg)


def _run_local_task(work: Callable[[Any, Any], Any], task: Any) -> Any:
    return work(_WORKER_STATE["state"], task)


def fan_out(setup: Callable[[Any], Any], setup_arg: Any, work: Callable[[Any, Any], Any],
            tasks: Sequence[Any], *, backend: str = "local", workers: int | None = 1,
            address: str | None = None, teardown: Callable[[Any], None] | None = None,
            threads_per_worker: int | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``work(setup(setup_arg), task)`` for every task; yield ``(task index, result)`` as done.

    Args:
        setup: builds a worker's state once (module-level function).
        setup_arg: its argument (sent once per worker).
        work: computes one task (module-level function).
        tasks: the tasks.
        backend: ``local`` or ``ray``.
        workers: local processes or Ray actors; ``None`` with Ray: one per CPU of the cluster.
        address: Ray cluster ``HOST:PORT``.
        teardown: called on the state after an in-process run (e.g. to restore a user's model).
        threads_per_worker: PyTorch threads per local worker process (default: cores / workers).

    Raises:
        FlatlabError: unknown backend, bad worker count, unreachable address, Ray not installed.
        Exception: the first exception a task raised (the remaining tasks are cancelled).
    """
    if backend not in BACKENDS:
        raise FlatlabError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    if address is not None and backend != "ray":
        raise ConfigError("address", "names a Ray cluster: use backend ray")
    if backend == "ray":
        yield from _fan_out_ray(setup, setup_arg, work, tasks, workers, address)
        return
    n = workers or 1
    if n == 1 or len(tasks) <= 1:
        state = setup(setup_arg)
        try:
            for i, task in enumerate(tasks):
                yield i, work(state, task)
        finally:
            if teardown is not None:
                teardown(state)
        return
    n = min(n, len(tasks))
    threads = threads_per_worker or default_threads(n)
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"),
                                  initializer=_init_local_worker,
                                  initargs=(setup, setup_arg, threads, os.getpid()))
    finished = False
    try:
        futures = {pool.submit(_run_local_task, work, task): i for i, task in enumerate(tasks)}
        for fut in cf.as_completed(futures):
            yield futures[fut], fut.result()
        finished = True
    finally:
        if finished:
            # Every task is done and returned: the idle workers exit on their own. Waiting for
            # them here cost a sweep up to half a minute (large worker heaps torn down at exit)
            # before its next phase; the interpreter still joins them before it exits.
            pool.shutdown(wait=False)
        else:
            # Interrupted, a task failed, or the consumer stopped early: do not wait for the
            # running tasks (a surface chunk or a sweep job can take minutes).
            _stop_pool(pool)


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate the worker processes and reap them."""
    # ProcessPoolExecutor has no public way to stop running tasks; its worker processes are
    # reachable only through the private ``_processes`` map (stable since Python 3.3).
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FlatlabError("the ray backend needs Ray: pip install 'flatlab[ray]' (or 'ray[default]')") from None
    return ray


class _RayWorker:
    """A Ray actor holding one worker's state (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, setup: Callable[[Any], Any], setup_arg: Any) -> None:
        self.state = setup(setup_arg)

    def run(self, work: Callable[[Any, Any], Any], task: Any) -> Any:
        return work(self.state, task)


def _fan_out_ray(setup: Callable[[Any], Any], setup_arg: Any, work: Callable[[Any, Any], Any],
                 tasks: Sequence[Any], workers: int | None, address: str | None) -> Iterator[tuple[int, Any]]:
    if address is not None:
        check_address(address)
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            if address is not None:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(log_to_driver=False, logging_level="ERROR", include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            text = " ".join(str(exc).split())[:200]
            raise FlatlabError(f"could not join the Ray cluster at {address or 'local'}: {text}") from None
        started_here = True
    try:
        if not tasks:
            return
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(workers, len(tasks))
        actor_cls = ray.remote(num_cpus=1)(_RayWorker)
        arg_ref = ray.put(setup_arg)
        actors = [actor_cls.remote(setup, arg_ref) for _ in range(n)]
        try:
            pending: dict[Any, tuple[int, Any]] = {}
            queue = list(enumerate(tasks))[::-1]
            for actor in actors:
                if queue:
                    i, task = queue.pop()
                    pending[actor.run.remote(work, task)] = (i, actor)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                i, actor = pending.pop(ref)
                result = ray.get(ref)
                if queue:
                    j, task = queue.pop()
                    pending[actor.run.remote(work, task)] = (j, actor)
                yield i, result
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
