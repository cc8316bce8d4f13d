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
from flatlab.io import atomic_write_text, check_writable


@dataclass(frozen=True)
class DemoSettings:
    """The budget of a demo run (``full`` fits five minutes on 2 CPU cores, ``quick`` a test)."""

    width: int
    steps: int
    eval_every: int
    lr: float
    ensemble_seeds: tuple[int, ...]
    top_k: int
    trace_products: int
    density_steps: int
    max_samples: int
    gammas_rel: str
    flatness_samples: int
    mc_samples: int
    grid_2d: str
    grid_line: str


FULL = DemoSettings(width=16, steps=1500, eval_every=100, lr=2e-3, ensemble_seeds=(0, 1, 2), top_k=5,
                    trace_products=99, density_steps=40, max_samples=1200, gammas_rel="0.02,0.04,0.06,0.08,0.1",
                    flatness_samples=20, mc_samples=10, grid_2d="-1:1:21", grid_line="-0.5:1.5:41")
QUICK = DemoSettings(width=4, steps=120, eval_every=40, lr=3e-3, ensemble_seeds=(0, 1, 2), top_k=2,
                     trace_products=9, density_steps=10, max_samples=200, gammas_rel="0.02,0.05,0.1",
                     flatness_samples=4, mc_samples=2, grid_2d="-1:1:5", grid_line="-0.5:1.5:5")

#: (run name, algorithm, bits, seed)
SINGLE_MODELS = [("erm", "erm", None), ("qat8", "qat", 8), ("qat4", "qat", 4)]


Step = tuple[str, Callable[[], dict[str, Any] | None]]


def plan(directory: Path, s: DemoSettings) -> list[Step]:
    """The demo's steps as (name, call) in order; each call is what the matching command does."""
    from flatlab.ensemble import (
        evaluate_ensemble,
        load_members,
        write_ensemble_record,
        write_ensemble_results,
    )
    from flatlab.measures import (
        DensityConfig,
        LocalFlatnessConfig,
        MeasurementSettings,
        PacBayesConfig,
        TopEigenvaluesConfig,
        TraceConfig,
    )
    from flatlab.pipeline import measure_checkpoint
    from flatlab.surface.runner import SurfaceRequest, run_surface
    from flatlab.train import TrainConfig, train

    runs = directory / "runs"
    results = str(directory / "results.h5")
    provenance = {"command_line": f"flatlab demo --out {directory}{' --quick' if s is QUICK else ''}"}

    def trainer(algorithm: str, bits: int | None, seed: int, out: Path, trial_seed: int | None = None) -> Callable[[], None]:
        flags: dict[str, Any] = {"lr": s.lr, **({"bits": bits} if bits else {})}

        def call() -> None:
            train(TrainConfig(dataset="rotated-digits", test_envs=["0"], algorithm=algorithm, model="cnn",
                              model_options={"width": s.width}, steps=s.steps, eval_every=s.eval_every, seed=seed,
                              trial_seed=trial_seed, hparam_flags=flags, out=str(out), device="cpu", quiet=True))
        return call

    steps: list[Step] = []
    for name, algorithm, bits in SINGLE_MODELS:
        steps.append((f"train {name}", trainer(algorithm, bits, 0, runs / name)))
    members = [runs / "qat4"]
    for seed in s.ensemble_seeds[1:]:
        out = runs / f"qat4-s{seed}"
        members.append(out)
        # EoQ members: independently seeded, on the same in/out split (trial seed 0).
        steps.append((f"train qat4 seed {seed}", trainer("qat", 4, seed, out, trial_seed=0)))
    settings = MeasurementSettings(max_samples=s.max_samples, device="cpu")
    measures = [TopEigenvaluesConfig(top_k=s.top_k), TraceConfig(trace_products=s.trace_products),
                DensityConfig(density_steps=s.density_steps), PacBayesConfig(mc_samples=s.mc_samples),
                LocalFlatnessConfig(gammas_rel=tuple(float(r) for r in s.gammas_rel.split(",")),
                                    samples=s.flatness_samples)]
    for name, _, _ in SINGLE_MODELS:
        def measure(checkpoint: Path = runs / name / "model.pt") -> None:
            measure_checkpoint(checkpoint, measures, settings=settings, results=results, provenance=provenance)
        steps.append((f"sharpness {name}", measure))

    def surface(checkpoint: Path, name: str, **options: Any) -> Callable[[], None]:
        def call() -> None:
            run_surface(SurfaceRequest(checkpoint=str(checkpoint), max_samples=s.max_samples, results=results,
                                       name=name, device="cpu", **options), None, provenance=provenance)
        return call

    steps.append(("surface erm 2d", surface(runs / "erm" / "model.pt", "fp-2d", dims=2, x=s.grid_2d, y=s.grid_2d)))
    # The 4-bit model on the same random draws, re-normalized to its own filters.
    steps.append(("surface qat4 2d", surface(runs / "qat4" / "model.pt", "q4-2d-shared", dims=2, x=s.grid_2d,
                                             y=s.grid_2d, directions=f"{results}#fp-2d")))
    steps.append(("interpolation erm -> qat4", surface(runs / "erm" / "model.pt", "interp-fp-q4", dims=1,
                                                       model2=str(runs / "qat4" / "model.pt"), x=s.grid_line)))

    def ensemble() -> dict[str, Any]:
        loaded = load_members(members)
        result = evaluate_ensemble(loaded, "cpu", 512)
        result["record"] = str(write_ensemble_record(directory / "eoq", result))
        result["run_id"] = write_ensemble_results(results, loaded, result, provenance=provenance)
        return result

    steps.append(("ensemble eoq", ensemble))

    def report() -> None:
        from flatlab.report import build_report, rows_csv

        atomic_write_text(directory / "report.csv", rows_csv(build_report([results])))

    steps.append(("report", report))

    def figures() -> None:
        from flatlab.plots.collect import write_figures
        from flatlab.report import load_inputs

        write_figures(load_inputs([results]), directory / "figures", ["pdf", "png", "html"])

    steps.append(("figures", figures))
    return steps


#: Files at the top of a demo folder, and its sub-folders.
DEMO_FILES = ("demo.json", "summary.json", "results.h5", "report.csv")
DEMO_FOLDERS = ("runs", "eoq", "figures")


def _own_names(names: tuple[str, ...]) -> tuple[set[str], list[str]]:
    from flatlab.io import temp_pattern

    return set(names), [temp_pattern(n) for n in names]


def foreign_entry(directory: Path, s: DemoSettings) -> str | None:
    """The first entry of ``directory`` that the demo did not write (its files, run folders,
    ensemble record, figures, journals and temporary files), or None."""
    import fnmatch

    from flatlab.plots.collect import ALL_FORMATS
    from flatlab.train.trainer import LOCK_FILE, RUN_FILES

    if not directory.is_dir():
        return None
    runs = {name for name, _, _ in SINGLE_MODELS} | {f"qat4-s{seed}" for seed in s.ensemble_seeds[1:]}
    names, patterns = _own_names(DEMO_FILES)
    patterns.append("results.h5*.journal")
    run_names, run_patterns = _own_names((*RUN_FILES, LOCK_FILE))

    def own_file(entry: Path, names: set[str], patterns: list[str]) -> bool:
        return entry.is_file() and not entry.is_symlink() and (
            entry.name in names or any(fnmatch.fnmatchcase(entry.name, p) for p in patterns))

    for entry in sorted(directory.iterdir()):
        if entry.name in DEMO_FOLDERS and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                if entry.name == "runs":
                    if inner.name not in runs or not inner.is_dir() or inner.is_symlink():
                        return str(inner)
                    bad = next((f for f in sorted(inner.iterdir()) if not own_file(f, run_names, run_patterns)), None)
                    if bad is not None:
                        return str(bad)
                elif entry.name == "eoq":
                    if not own_file(inner, *_own_names(("ensemble.json",))):
                        return str(inner)
                elif not (inner.is_file() and not inner.is_symlink() and inner.suffix.lstrip(".") in ALL_FORMATS):
                    return str(inner)
        elif not own_file(entry, names, patterns):
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

    steps = plan(directory, settings)
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
                               "result": payload if name in ("ensemble eoq",) else None}
        atomic_write_text(state_path, json.dumps(state, indent=1))
        bar.update(1)
    bar.close()
    summary = summarize(directory)
    summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
    summary["seconds_total"] = round(sum(v["seconds"] for v in state["done"].values()), 1)
    atomic_write_text(directory / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def summarize(directory: Path) -> dict[str, Any]:
    """A short table of what the demo found, read back from the results file."""
    from flatlab.report import build_report

    report = build_report([str(directory / "results.h5")])
    return {"directory": str(directory), "results": str(directory / "results.h5"),
            "report_csv": str(directory / "report.csv"), "figures": str(directory / "figures"),
            "runs": report["rows"], "correlations": report.get("correlations")}
