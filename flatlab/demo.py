"""``flatlab demo``: the whole study in one command on the built-in RotatedDigits data.

The demo is a fixed pipeline of flatlab commands (train -> sharpness -> surface -> ensemble ->
report -> figures) run in-process, each exactly as a user would type it, so the demo also shows
how to run the study by hand. Progress lives in ``DIR/demo.json``: finished steps are skipped on
a rerun, training resumes from its own state, and surfaces from their journals.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flatlab import __version__
from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_text
from flatlab.pipeline import run_flatlab


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


def plan(directory: Path, s: DemoSettings) -> list[tuple[str, list[str]]]:
    """The demo's steps as (name, argv) in order."""
    runs = directory / "runs"
    results = str(directory / "results.h5")
    common = ["--dataset", "rotated-digits", "--test-env", "0", "--model", "cnn", "--width", str(s.width),
              "--steps", str(s.steps), "--eval-every", str(s.eval_every), "--lr", str(s.lr), "--quiet"]
    steps: list[tuple[str, list[str]]] = []
    for name, algorithm, bits in SINGLE_MODELS:
        extra = ["--bits", str(bits)] if bits else []
        steps.append((f"train {name}", ["train", *common, "--algorithm", algorithm, *extra, "--seed", "0",
                                        "--out", str(runs / name)]))
    members = [str(runs / "qat4")]
    for seed in s.ensemble_seeds[1:]:
        out = runs / f"qat4-s{seed}"
        members.append(str(out))
        # EoQ members: independently seeded, on the same in/out split (trial seed 0).
        steps.append((f"train qat4 seed {seed}", ["train", *common, "--algorithm", "qat", "--bits", "4",
                                                  "--seed", str(seed), "--trial-seed", "0", "--out", str(out)]))
    for name, _, _ in SINGLE_MODELS:
        steps.append((f"sharpness {name}", [
            "sharpness", str(runs / name / "model.pt"), "--top-k", str(s.top_k), "--trace",
            "--trace-products", str(s.trace_products), "--density", "--density-steps", str(s.density_steps),
            "--pacbayes", "--mc-samples", str(s.mc_samples), "--local-flatness", "--gammas-rel", s.gammas_rel,
            "--flatness-samples", str(s.flatness_samples), "--max-samples", str(s.max_samples),
            "--device", "cpu", "--out", results, "--quiet", "--json"]))
    surface_common = ["--max-samples", str(s.max_samples), "--results", results, "--quiet", "--json"]
    steps.append(("surface erm 2d", ["surface", str(runs / "erm" / "model.pt"), "--2d", "--x", s.grid_2d,
                                     "--y", s.grid_2d, "--name", "fp-2d", *surface_common]))
    # The 4-bit model on the same random draws, re-normalized to its own filters.
    steps.append(("surface qat4 2d", ["surface", str(runs / "qat4" / "model.pt"), "--2d", "--x", s.grid_2d,
                                      "--y", s.grid_2d, "--directions", f"{results}#fp-2d",
                                      "--name", "q4-2d-shared", *surface_common]))
    steps.append(("interpolation erm -> qat4", [
        "surface", str(runs / "erm" / "model.pt"), "--1d", "--model2", str(runs / "qat4" / "model.pt"),
        "--x", s.grid_line, "--name", "interp-fp-q4", *surface_common]))
    steps.append(("ensemble eoq", ["ensemble", *members, "--out", str(directory / "eoq"), "--results", results,
                                   "--device", "cpu", "--quiet", "--json"]))
    steps.append(("report", ["report", results, "--csv", str(directory / "report.csv"), "--quiet", "--json"]))
    steps.append(("figures", ["figures", results, "--out", str(directory / "figures"), "--format", "pdf,png,html",
                              "--quiet", "--json"]))
    return steps


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
    if state_path.exists() and not force:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise FlatlabError(f"{state_path} is unreadable: pass --force to start the demo over") from None
        previous = {k: state.get(k) for k in identity}
        if previous != identity:
            what = [k for k in identity if previous.get(k) != identity[k]]
            raise FlatlabError(f"{directory} holds a demo with another {' and '.join(what).replace('_', ' ')}: "
                               "use another --out, or --force to start over")
    elif directory.exists() and any(directory.iterdir()) and not force:
        raise FlatlabError(f"{directory} exists and is not a flatlab demo folder: use another --out or --force")
    else:
        if force and directory.exists():
            import shutil

            shutil.rmtree(directory)
        state = {**identity, "done": {}}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_path, json.dumps(state, indent=1))

    steps = plan(directory, settings)
    start = time.perf_counter()
    bar = tqdm(total=len(steps), disable=quiet, file=sys.stderr, desc="flatlab demo", unit="step")
    for name, argv in steps:
        if name in state["done"]:
            bar.update(1)
            continue
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        payload = run_flatlab(argv)
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
