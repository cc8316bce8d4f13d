"""`flatlab sweep`: study validation, job expansion, backends, crash recovery, merging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cases import BARRIER_STUDY, CURVATURE_STUDY, DATA_MODEL, refused_study

from flatlab.cli import main

REPO = Path(__file__).resolve().parents[1]

#: A tiny study: 4-bit QAT MLP on 8x8 digits, 1 test domain x 2 seeds, every kind of measurement
#: on a small budget, and an EoQ ensemble over the seeds (3 jobs).
TINY = """
[study]
name = "tiny"

""" + DATA_MODEL + """
[train]
steps = 30
eval_every = 15
seeds = [0, 1]
trial_seed = 0
hparams = { lr = 0.01 }

[[algorithms]]
algorithm = "qat"
bits = [4]
hparams = { quant_start = 10 }

[measure]
max_samples = 100
seed = 0

[measure.curvature]
top_k = 2
trace = true
trace_products = 6

[measure.bounds]
measures = ["pacbayes"]
mc_samples = 2
bisection_depth = 4

[measure.local_flatness]
gammas_rel = [0.05]
samples = 2

[[surfaces]]
name = "line"
dims = 1
x = "-0.5:0.5:3"
max_samples = 50

[[ensembles]]
name = "eoq"
variant = "qat4"
"""

#: Attributes that legitimately differ between two sweeps of one study: paths, the command
#: line, software versions, checkpoint digests (torch.save embeds the temporary file's name) and
#: hashes that include them.
VARYING = {"checkpoint", "checkpoint_sha256", "command_line", "versions", "members", "sha256",
           "settings_fingerprint"}


def _study(tmp_path: Path, text: str = TINY, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


#: Bad studies: (a study, (old, new): its one change, words the refusal must hold).
BAD_STUDIES = [
    # the tiny QAT study: unknown keys, names and domains, solver settings
    (TINY, ("[train]", "[train]\nlearning_rate = 0.1"), "unknown key 'learning_rate' in [train]"),
    (TINY, ("[measure.curvature]", "[measure.curvature]\ntopk = 3"), "unknown key 'topk' in [measure.curvature]"),
    (TINY, ("[study]", "[studies]"), "unknown key 'studies' at the top level"),
    (TINY, ('algorithm = "qat"', 'algorithm = "qatt"'), "unknown algorithm 'qatt'"),
    (TINY, ('dataset = "rotated-digits"', 'dataset = "MNIST-C"'), "unknown data set 'MNIST-C'"),
    (TINY, ('variant = "qat4"', 'variant = "qat8"'), "unknown variant 'qat8'"),
    (TINY, ("test_envs = [0]", "test_envs = [9]"), "unknown domain '9'"),
    (TINY, ("[measure.curvature]", "[measure.curvature]\nrtol = 1e-2\ntol = 1e-6"), "pick different solvers"),
    (TINY, ("[measure.curvature]", "[measure.curvature]\nrtol = 0.0"), "rtol must be greater than 0"),
    # the one-job curvature study: values, devices, measurement and surface settings
    (CURVATURE_STUDY, ('max_samples = 50', 'max_samples = 50\ndevice = "tpu"'), "device = 'tpu'"),
    (CURVATURE_STUDY, ('steps = 10', 'steps = 10\ndevice = "meta9"'), "device = 'meta9'"),
    (CURVATURE_STUDY, ("hparams = { lr = 0.01 }", 'hparams = { lr = "fast" }'), "lr"),
    (CURVATURE_STUDY, ("options = { width = 16, depth = 1 }", 'options = { width = "16", depth = 1 }'), "width"),
    (CURVATURE_STUDY, ("options = { width = 16, depth = 1 }", "options = { width = -3, depth = 1 }"), "width"),
    (CURVATURE_STUDY, ("top_k = 1", "top_k = 0"), "top_k must be at least 1"),
    (CURVATURE_STUDY, ("top_k = 1", 'top_k = "five"'), "top_k"),
    (CURVATURE_STUDY, ("[measure.curvature]", "[measure.curvature]\nsplit = \"test\""), "split must be one of"),
    (CURVATURE_STUDY, ("[measure.curvature]\ntop_k = 1", "[measure.bounds]\nmeasures = [\"pac\"]"), "unknown measure 'pac'"),
    (CURVATURE_STUDY, ("[measure.curvature]\ntop_k = 1", "[measure.local_flatness]\ngammas_rel = [0.1, 0.05]"), "strictly increasing"),
    (CURVATURE_STUDY, ("[measure.curvature]\ntop_k = 1", '[[surfaces]]\nname = "huge"\ndims = 2\nx = "-1:1:100000"\ny = "-1:1:100000"'), "memory"),
    (CURVATURE_STUDY, ("[measure.curvature]\ntop_k = 1", '[[surfaces]]\nname = "../x"\ndims = 1'), "name"),
    # the barrier study: [[barriers]] sections
    (BARRIER_STUDY, ('between = ["fp", "fpb"]\npoints = 3', 'between = ["fp", "qat9"]\npoints = 3'), "unknown variant 'qat9'"),
    (BARRIER_STUDY, ('members = "eoq"', 'members = "nope"'), "members = 'nope' names no [[ensembles]] entry"),
    (BARRIER_STUDY, ('members = "eoq"', 'members = "eoq"\nbetween = ["fp", "fpb"]'), "give either between"),
    (BARRIER_STUDY, ("points = 5", "points = 1"), "points must be an integer of at least 2, got 1"),
    (BARRIER_STUDY, ('between = ["fp", "fpb"]\npoints = 3', 'between = ["fp", "fp"]\npoints = 3'), "two different variants"),
    (BARRIER_STUDY, ("seeds = [0]", "seeds = [7]"), "seeds must be among the study's seeds"),
    (BARRIER_STUDY, ('name = "fp-fpb"\n', 'name = "fp-fpb"\nbn = "repair"\n'), "bn must be one of interpolate, reestimate"),
    (BARRIER_STUDY, ('name = "members"', 'name = "members"\nnumber = 3'), "unknown key 'number' in [barriers]"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("study, change, words", BAD_STUDIES, ids=[words for _, _, words in BAD_STUDIES])
def test_bad_study_is_one_line_exit_2_before_any_work(study: str, change: tuple[str, str], words: str,
                                                      dry_run: bool, tmp_path: Path, capsys):
    # A change that applies nowhere, or in two places, would test something else.
    assert study.count(change[0]) == 1, change[0]
    flags = ["--dry-run"] if dry_run else []  # a real run must be refused before it starts too
    assert words in refused_study(tmp_path, capsys, study.replace(*change), *flags)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_exits_2_quickly(tmp_path):
    path = _study(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flatlab.cli", "sweep", str(path), "--backend", "ray",
                           "--address", f"127.0.0.1:{_closed_port()}", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatlab: error: nothing answers at Ray address 127.0.0.1:")
    # No timing assertion (the machine may be loaded): the address is checked before Ray is
    # imported or started, so nothing was written and no Ray session was left behind.
    assert not (tmp_path / "out").exists()


def _expected_jobs(study: Any) -> int:
    barriers = sum(len(b.get("seeds", study.seeds)) for b in study.barriers if "between" in b)  # [[barriers]] lines
    return (len(study.variants) * len(study.test_envs) * len(study.seeds) + len(study.ensembles) * len(study.test_envs)
            + barriers * len(study.test_envs))


# Study files only: analysis/claims/ holds claims files (tests/test_claims.py checks those).
SHIPPED = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "analysis").rglob("*.toml")
                 if "claims" not in p.relative_to(REPO / "analysis").parts)


def test_shipped_studies_exist():
    names = {Path(p).name for p in SHIPPED}
    assert {"qgen.toml", "qtdog_bits.toml", "algorithms.toml"} <= names
    assert sum(1 for p in SHIPPED if "pacs" in p) >= 3


@pytest.mark.parametrize("relpath", SHIPPED)
def test_shipped_study_dry_run(relpath, tmp_path, capsys, monkeypatch):
    from flatlab import sweep

    study = sweep.load_study(REPO / relpath)
    n = _expected_jobs(study)
    if not study.data_available:  # PACS twins: no data here; skip timing a ResNet-50 on CPU
        monkeypatch.setattr(sweep, "estimate_seconds", lambda s, jobs, w: {
            "per_job": {j.job_id: 0.0 for j in jobs}, "total_seconds": 0.0, "device": "cpu", "note": "test"})
    assert main(["sweep", str(REPO / relpath), "--dry-run", "--json", "--quiet", "--out", str(tmp_path / "o")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["num_jobs"] == len(payload["jobs"]) == n
    assert all(j["status"] == "pending" for j in payload["jobs"])
    if study.data_available:
        assert payload["estimated_seconds"] > 0
    if Path(relpath).name == "qgen.toml" and "pacs" not in relpath:
        assert [v.label for v in study.variants] == ["fp", "qat8", "qat4", "qat2"]
        assert len(study.seeds) >= 10 and len(study.test_envs) >= 2
    if Path(relpath).name == "qtdog_bits.toml" and "pacs" not in relpath:
        assert len(study.test_envs) == 6
    assert not (tmp_path / "o").exists()


# --- running sweeps ------------------------------------------------------------------------------

def _normalized(path: Path, out: Path) -> dict[str, Any]:
    """The merged results keyed by job id, without the attributes that legitimately differ."""
    from flatlab.results import read_results

    view = read_results(path)
    by_run = {run_id: job_id for job_id, run_id in view["attrs"]["sweep_jobs"].items()}
    assert len(by_run) == len(view["attrs"]["sweep_jobs"])

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k not in VARYING}
        if isinstance(node, str):
            return node.replace(str(out.resolve()), "<OUT>").replace(str(out), "<OUT>")
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    runs = {by_run[run_id]: clean(run) for run_id, run in view["runs"].items()}
    attrs = clean({k: v for k, v in view["attrs"].items() if k != "sweep_jobs"})
    return {"attrs": attrs, "runs": runs}


def _assert_same(a: dict[str, Any], b: dict[str, Any], where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    """The tiny study run locally with 2 worker processes (study path, OUT, normalized results)."""
    from flatlab.sweep import load_study, run_sweep

    root = tmp_path_factory.mktemp("sweep")
    path = _study(root)
    out = root / "local"
    summary = run_sweep(load_study(path), out, backend="local", workers=2, quiet=True)
    assert not summary.failed, [(o.job_id, o.error) for o in summary.failed]
    assert [o.status for o in summary.outcomes] == ["done"] * 3
    merged = _normalized(out / "results.h5", out)
    assert len(merged["runs"]) == 3  # 2 trained runs + 1 ensemble
    run = merged["runs"]["qat4-te0-s0"]
    assert {"curvature", "bounds", "local_flatness", "surfaces", "sweep"} <= set(run)
    assert merged["runs"]["eoq-te0"]["attrs"]["algorithm"] == "eoq"
    return path, out, merged


def test_tiny_sweep_gives_the_recorded_numbers(reference):
    """The sweep through the library pipeline gives the numbers it gave through chained CLI
    calls before the redesign (tests/pipeline_record.py)."""
    from pipeline_record import check_against_record

    _, out, _ = reference
    check_against_record("tiny_sweep", out / "results.h5")


def test_rerun_skips_done_jobs(reference, capsys):
    path, out, merged = reference
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/done")}
    assert main(["sweep", str(path), "--out", str(out), "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["counts"] == {"skipped": 3}
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/done")}
    _assert_same(merged, _normalized(out / "results.h5", out))


def test_ray_backend_equals_local(reference, tmp_path):
    """The same sweep on a local Ray instance (loopback only, 2 workers) merges to the same file."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    path, _, merged = reference
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:")
        out = tmp_path / "ray"
        code = main(["sweep", str(path), "--backend", "ray", "--address", address, "--workers", "2",
                     "--out", str(out), "--quiet"])
    finally:
        ray.shutdown()
    assert code == 0
    _assert_same(merged, _normalized(out / "results.h5", out))


def test_sigkill_then_rerun_continues(reference, tmp_path):
    """Kill the driver (and its workers) with SIGKILL after the first finished job; the rerun does
    not redo finished jobs and ends with the same merged results."""
    path, _, merged = reference
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "flatlab.cli", "sweep", str(path), "--workers", "2",
                             "--out", str(out), "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list(out.glob("jobs/*/done")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/done")}
    assert 1 <= len(finished) < 3
    assert not (out / "results.h5").exists()
    time.sleep(0.5)  # let the killed workers' file handles go
    assert main(["sweep", str(path), "--workers", "2", "--out", str(out), "--quiet"]) == 0
    for done, stamp in finished.items():
        assert done.stat().st_mtime_ns == stamp, f"{done.parent.name} was redone"
        assert len((done.parent / "attempts").read_text().splitlines()) == 1
    _assert_same(merged, _normalized(out / "results.h5", out))


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_only_the_driver_stops_its_workers_and_a_rerun_completes(reference, tmp_path):
    """SIGKILL of the sweep driver alone (not its process group): the worker processes notice
    and exit within seconds, the job lock they held is stale, and the same command run again
    takes over and ends with the merged results of an uninterrupted sweep."""
    path, _, merged = reference
    out = tmp_path / "driver-killed"
    proc = subprocess.Popen([sys.executable, "-m", "flatlab.cli", "sweep", str(path), "--workers", "2",
                             "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            workers = [c for c in _children(proc.pid) if "spawn" in Path(f"/proc/{c}/cmdline").read_text()
                       or "multiprocessing" in Path(f"/proc/{c}/cmdline").read_text()]
            if len(workers) >= 2 and list(out.glob("runs/*/run.json")):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()  # the driver only
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before its driver could be killed"
    assert workers, "no worker process was seen"
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "workers outlived their driver"
    assert main(["sweep", str(path), "--workers", "2", "--out", str(out), "--quiet"]) == 0
    _assert_same(merged, _normalized(out / "results.h5", out))


FAILING = """
""" + DATA_MODEL + """
[train]
steps = 20
eval_every = 10
seeds = [0]
hparams = { lr = 0.01 }

[[algorithms]]
algorithm = "erm"

[[algorithms]]
algorithm = "qat"
bits = [4]
hparams = { quant_start = 10 }

[measure.curvature]
top_k = 1

[[surfaces]]
name = "broken"
dims = 1
x = "0:1:2"
directions = "no-such-surface-file.h5"
variants = ["erm"]
"""


def test_failed_job_is_reported_and_others_finish(tmp_path, capsys):
    """A job that fails at run time is reported with its error; the other job finishes; exit 1."""
    path = _study(tmp_path, FAILING)
    out = tmp_path / "out"
    code = main(["sweep", str(path), "--out", str(out), "--json", "--quiet"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1
    assert payload["counts"] == {"done": 1, "failed": 1}
    failed = next(j for j in payload["jobs"] if j["status"] == "failed")
    assert failed["job_id"] == "erm-te0-s0" and "no-such-surface-file.h5" in failed["error"]
    assert (out / "jobs" / "erm-te0-s0" / "error.txt").exists()
    assert (out / "jobs" / "erm-te0-s0" / "curvature.done").exists()  # steps before the failure are kept
    from flatlab.results import read_results

    assert list(read_results(out / "results.h5")["attrs"]["sweep_jobs"]) == ["qat4-te0-s0"]
