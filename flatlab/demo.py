"""``flatlab demo``: the whole study in one command on the built-in RotatedDigits data.

The demo is a fixed chain of library calls (train -> measure -> surfaces -> ensemble -> report
-> figures), each the call the matching command makes, so the README shows the same study by
hand as commands. Progress lives in ``DIR/demo.json``: finished steps are skipped on a rerun,
training resumes from its own state, and surfaces from their journals.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flatlab import __version__
from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_text, check_writable, dumps_json


@dataclass(frozen=True)
class DemoSettings:
    """The budget of a demo run (``full`` fits five minutes on 2 CPU cores, ``quick`` a test).

    The demo is a small QGen / QT-DoG study: FP (``erm``), 8-bit and 4-bit QAT, each at every seed
    of ``seeds`` on test domain 0 degrees, measured, then EoQ over ``ensemble_seeds`` of the 4-bit
    models. Seeds buy the verdicts: with n paired seeds the exact sign-flip test cannot go below
    p = 2^-n, so n = 8 is the least that survives Holm over the demo's direction tests.
    """

    width: int
    steps: int
    eval_every: int
    lr: float
    quant_start: int
    seeds: tuple[int, ...]
    ensemble_seeds: tuple[int, ...]
    workers: int
    top_k: int
    rtol: float | None
    trace_products: int
    density_steps: int
    max_samples: int
    gammas_rel: tuple[float, ...]
    flatness_samples: int
    mc_samples: int
    fixed_draws: bool
    grid_2d: str
    grid_line: str


FULL = DemoSettings(width=8, steps=600, eval_every=300, lr=3e-3, quant_start=200, seeds=tuple(range(8)),
                    ensemble_seeds=(0, 1, 2), workers=2, top_k=3, rtol=1e-2, trace_products=20, density_steps=20,
                    max_samples=600, gammas_rel=(0.02, 0.05, 0.1), flatness_samples=10, mc_samples=4,
                    fixed_draws=False, grid_2d="-1:1:21", grid_line="-0.5:1.5:41")
QUICK = DemoSettings(width=4, steps=120, eval_every=40, lr=3e-3, quant_start=40, seeds=(0, 1, 2),
                     ensemble_seeds=(0, 1, 2), workers=1, top_k=2, rtol=None, trace_products=9, density_steps=10,
                     max_samples=200, gammas_rel=(0.02, 0.05, 0.1), flatness_samples=4, mc_samples=2,
                     fixed_draws=True, grid_2d="-1:1:5", grid_line="-0.5:1.5:5")

#: The demo's variants: (sweep label, algorithm, bits).
VARIANTS = [("erm", "erm", None), ("qat8", "qat", 8), ("qat4", "qat", 4)]
#: The claims file the demo decides (package data; the paper claims it can test at its scale).
CLAIMS_FILE = Path(__file__).resolve().parent / "demo_claims.toml"


def _toml_list(values: tuple[Any, ...]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def study_text(s: DemoSettings) -> str:
    """The study file the demo sweeps (``DIR/study.toml``): run it by hand with ``flatlab sweep``."""
    bounds = '["pacbayes", "magnitude"]'
    return f"""# The study `flatlab demo` runs, written by flatlab {__version__}. By hand:
#   flatlab sweep study.toml --out sweep --workers {s.workers}
# FP vs 8-bit and 4-bit QAT (full-precision warm-up, then LSQ) at {len(s.seeds)} seeds on test domain 0
# degrees, every model measured; EoQ over the 4-bit models of seeds {list(s.ensemble_seeds)}.

[study]
name = "demo"
description = "flatlab demo: FP vs 8/4-bit QAT at {len(s.seeds)} seeds, measured, plus EoQ"

[data]
dataset = "rotated-digits"
test_envs = [0]

[model]
name = "cnn"
options = {{ width = {s.width} }}

[train]
steps = {s.steps}
eval_every = {s.eval_every}
seeds = {_toml_list(s.seeds)}
trial_seed = 0                # one in/out split for every seed, so EoQ members can be combined
device = "cpu"
hparams = {{ lr = {s.lr} }}

[[algorithms]]
label = "erm"
algorithm = "erm"

[[algorithms]]
algorithm = "qat"
bits = [8, 4]
hparams = {{ quant_start = {s.quant_start} }}

[measure]
max_samples = {s.max_samples}
seed = 0
device = "cpu"

[measure.curvature]
top_k = {s.top_k}
{"" if s.rtol is None else f"rtol = {s.rtol}"}
trace = true
trace_products = {s.trace_products}
density = true
density_steps = {s.density_steps}

[measure.bounds]
measures = {bounds}
mc_samples = {s.mc_samples}
fixed_draws = {str(s.fixed_draws).lower()}

[measure.local_flatness]
gammas_rel = {_toml_list(s.gammas_rel)}
samples = {s.flatness_samples}

[[ensembles]]
name = "eoq"
variant = "qat4"
seeds = {_toml_list(s.ensemble_seeds)}
"""


Step = tuple[str, Callable[[], dict[str, Any] | None]]


def plan(directory: Path, s: DemoSettings, quiet: bool = True) -> list[Step]:
    """The demo's steps as (name, call) in order; each call is what the matching command does:
    ``flatlab sweep`` (train and measure every model, EoQ), ``flatlab surface`` (three surfaces
    of the seed-0 models), merging, ``flatlab report --claims`` and ``flatlab figures --claims``."""
    from flatlab.results import merge_results
    from flatlab.surface.runner import SurfaceRequest, run_surface

    sweep_dir = directory / "sweep"
    surfaces = str(directory / "surfaces.h5")
    results = directory / "results.h5"
    provenance = {"command_line": f"flatlab demo --out {directory}{' --quick' if s is QUICK else ''}"}

    def sweep() -> dict[str, Any]:
        from flatlab.sweep import load_study, run_sweep

        summary = run_sweep(load_study(directory / "study.toml"), sweep_dir, workers=s.workers, quiet=quiet)
        failed = [o for o in summary.outcomes if o.status not in ("done", "skipped")]
        if failed:
            raise FlatlabError(f"demo: {len(failed)} job(s) of the sweep failed, first {failed[0].job_id}: "
                               f"{failed[0].error} (rerun flatlab demo to retry them)")
        return {"jobs": len(summary.outcomes), "seconds": round(summary.seconds, 1)}

    def model(variant: str) -> str:
        return str(sweep_dir / "runs" / f"{variant}-te0-s{s.seeds[0]}" / "model.pt")

    def surface(checkpoint: str, name: str, **options: Any) -> Callable[[], None]:
        def call() -> None:
            run_surface(SurfaceRequest(checkpoint=checkpoint, max_samples=s.max_samples, results=surfaces,
                                       name=name, device="cpu", **options), None, provenance=provenance)
        return call

    def merge() -> None:
        merge_results(results, [sweep_dir / "results.h5", surfaces], attrs={"study": "demo"})

    def report() -> dict[str, Any]:
        from flatlab.claims import claims_text, evaluate_claims, load_claims
        from flatlab.report import build_report, load_inputs, report_text, rows_csv

        collection = load_inputs([results])
        built = build_report([results], collection=collection)
        verdicts = evaluate_claims(load_claims(CLAIMS_FILE), collection)
        built["claims"] = [verdicts]
        atomic_write_text(directory / "report.csv", rows_csv(built))
        atomic_write_text(directory / "report.txt", report_text(built) + "\n\n" + claims_text(verdicts) + "\n")
        atomic_write_text(directory / "report.json", dumps_json(built))
        return {"counts": verdicts["counts"]}

    def figures() -> None:
        from flatlab.plots.collect import write_figures
        from flatlab.report import load_inputs

        verdicts = json.loads((directory / "report.json").read_text())["claims"]
        write_figures(load_inputs([results]), directory / "figures", ["pdf", "png", "html"], claims=verdicts)

    return [
        ("sweep", sweep),
        ("surface erm 2d", surface(model("erm"), "fp-2d", dims=2, x=s.grid_2d, y=s.grid_2d)),
        # The 4-bit model on the same random draws, re-normalized to its own filters.
        ("surface qat4 2d", surface(model("qat4"), "q4-2d-shared", dims=2, x=s.grid_2d, y=s.grid_2d,
                                    directions=f"{surfaces}#fp-2d")),
        ("interpolation erm -> qat4", surface(model("erm"), "interp-fp-q4", dims=1, model2=model("qat4"),
                                              x=s.grid_line)),
        ("merge", merge),
        ("report", report),
        ("figures", figures),
    ]


#: Files at the top of a demo folder, and its sub-folders (``sweep`` is a ``flatlab sweep`` folder).
DEMO_FILES = ("demo.json", "summary.json", "study.toml", "results.h5", "surfaces.h5", "report.csv", "report.txt",
              "report.json")
DEMO_FOLDERS = ("sweep", "figures")
#: What a sweep writes in a job's folder (its steps' files are ``<step>.h5`` and ``<step>.done``).
JOB_FILES = ("job.json", "attempts", "done", "error.txt")


def _own_names(names: tuple[str, ...]) -> tuple[set[str], list[str]]:
    from flatlab.io import temp_pattern

    return set(names), [temp_pattern(n) for n in names]


def job_ids(s: DemoSettings) -> set[str]:
    """The sweep's job ids (``flatlab.sweep.expand_jobs`` names them so)."""
    return {f"{label}-te0-s{seed}" for label, _, _ in VARIANTS for seed in s.seeds} | {"eoq-te0"}


def foreign_entry(directory: Path, s: DemoSettings) -> str | None:
    """The first entry of ``directory`` that the demo did not write (its files, the sweep's run and
    job folders, figures, journals, locks and temporary files), or None."""
    import fnmatch

    from flatlab.plots.collect import ALL_FORMATS
    from flatlab.train.trainer import LOCK_FILE, RUN_FILES

    if not directory.is_dir():
        return None
    jobs = job_ids(s)
    h5 = ["*.h5.journal", "*.h5.lock", ".*.h5.*.tmp"]
    names, patterns = _own_names(DEMO_FILES)
    run_names, run_patterns = _own_names((*RUN_FILES, LOCK_FILE))
    job_names, job_patterns = _own_names(JOB_FILES)
    job_patterns += ["*.h5", "*.done", ".*.done.*.tmp", *h5]

    def own_file(entry: Path, names: set[str], patterns: list[str]) -> bool:
        return entry.is_file() and not entry.is_symlink() and (
            entry.name in names or any(fnmatch.fnmatchcase(entry.name, p) for p in patterns))

    def own_folder(entry: Path, allowed: set[str], names: set[str], patterns: list[str]) -> str | None:
        for inner in sorted(entry.iterdir()):
            if inner.name not in allowed or not inner.is_dir() or inner.is_symlink():
                return str(inner)
            bad = next((f for f in sorted(inner.iterdir()) if not own_file(f, names, patterns)), None)
            if bad is not None:
                return str(bad)
        return None

    for entry in sorted(directory.iterdir()):
        if entry.name in DEMO_FOLDERS and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                if entry.name == "sweep":
                    if inner.name in ("runs", "jobs") and inner.is_dir() and not inner.is_symlink():
                        bad = (own_folder(inner, jobs, run_names, run_patterns) if inner.name == "runs" else
                               own_folder(inner, jobs, job_names, job_patterns))
                        if bad is not None:
                            return bad
                    elif not own_file(inner, *_own_names(("study.toml", "results.h5"))) and not any(
                            fnmatch.fnmatchcase(inner.name, p) for p in h5):
                        return str(inner)
                elif not (inner.is_file() and not inner.is_symlink() and inner.suffix.lstrip(".") in ALL_FORMATS):
                    return str(inner)
        elif not own_file(entry, names, patterns + h5):
            return str(entry)
    return None


def clear_demo_folder(directory: Path, s: DemoSettings) -> None:
    """Delete a demo folder's own content (``force``), after checking that it holds nothing else."""
    import shutil

    foreign = foreign_entry(directory, s)
    if foreign is not None:
        raise FlatlabError(f"refusing to clear {directory}: it holds {foreign}, which the demo did not write")
    for entry in sorted(directory.iterdir()):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_demo(directory: str | Path = "flatlab-demo", quick: bool = False, force: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) the demo in ``directory``; return a summary (also written as JSON).

    Raises:
        FlatlabError: ``directory`` holds a demo of another flatlab version or other settings
            (pass ``force=True`` to start it over), or a step fails.
    """
    directory = Path(directory)
    settings = QUICK if quick else FULL
    # Through JSON so that tuples compare equal to the lists a stored demo.json gives back.
    identity = json.loads(json.dumps({"flatlab_version": __version__, "mode": "quick" if quick else "full",
                                      "settings": asdict(settings)}))
    state_path = directory / "demo.json"
    check_writable(directory, "folder")
    foreign = foreign_entry(directory, settings)
    if state_path.exists() and not force:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise FlatlabError(f"{state_path} is unreadable: pass --force to start the demo over") from None
        previous = {k: state.get(k) for k in identity}
        if previous != identity:
            what = [k for k in identity if previous.get(k) != identity[k]]
            advice = "use another --out" + (", or --force to start over" if foreign is None else
                                             f" (it also holds {foreign}, which the demo did not write)")
            raise FlatlabError(f"{directory} holds a demo with another {' and '.join(what).replace('_', ' ')}: {advice}")
    elif foreign is not None:
        # --force never deletes what the demo did not write (a thesis next to a stale demo).
        raise FlatlabError(f"{directory} holds {foreign}, which is not part of a flatlab demo: use another --out "
                           "(an existing folder must be empty or hold a demo)")
    else:
        if force and directory.exists():
            clear_demo_folder(directory, settings)
        state = {**identity, "done": {}}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_path, json.dumps(state, indent=1))

    atomic_write_text(directory / "study.toml", study_text(settings))
    steps = plan(directory, settings, quiet)
    start = time.perf_counter()
    bar = tqdm(total=len(steps), disable=quiet, file=sys.stderr, desc="flatlab demo", unit="step")
    for name, call in steps:
        if name in state["done"]:
            bar.update(1)
            continue
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        payload = call()
        state["done"][name] = {"seconds": round(time.perf_counter() - t0, 2),
                               "result": payload}
        atomic_write_text(state_path, json.dumps(state, indent=1))
        bar.update(1)
    bar.close()
    summary = summarize(directory)
    summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
    summary["seconds_total"] = round(sum(v["seconds"] for v in state["done"].values()), 1)
    atomic_write_text(directory / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def summarize(directory: Path) -> dict[str, Any]:
    """What the demo found, read back from its report (``report.json``): the runs, each variant's
    mean with its bootstrap interval over seeds, the comparisons with the reference and the
    verdicts of the claims file."""
    report = json.loads((directory / "report.json").read_text())
    return {"directory": str(directory), "results": str(directory / "results.h5"),
            "report_csv": str(directory / "report.csv"), "report_text": str(directory / "report.txt"),
            "figures": str(directory / "figures"), "runs": report["rows"], "variants": report["variants"],
            "comparisons": report["comparisons"], "correlations": report.get("correlations"),
            "claims": report["claims"][0]}
