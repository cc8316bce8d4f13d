"""From results to figures: pick what the inputs hold and build every figure that fits.

Used by ``flatlab figures`` and the scripts in ``figures/``. Reads results only (through
:func:`flatlab.report.load_inputs`); never recomputes a measurement.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.plots import barriers as bplots
from flatlab.plots import measures as mplots
from flatlab.plots import surfaces as splots
from flatlab.plots.style import color, save_figure
from flatlab.report import (
    Collection,
    RunRecord,
    SurfaceRecord,
    bits_label,
    build_rows,
    grouped_means,
    rank_correlation,
)

#: Output formats ``flatlab figures`` knows: matplotlib files, plotly HTML (3D surfaces), VTK (2D surfaces).
FIGURE_FORMATS = ("pdf", "png", "svg")
ALL_FORMATS = (*FIGURE_FORMATS, "html", "vtp")

def measure_axis_label(name: str) -> str:
    """A measure column's axis label, from its declaration in the measure registry."""
    from flatlab.measures.registry import axis_label

    return axis_label(name)


def parse_formats(text: str) -> list[str]:
    """'pdf,png' -> ['pdf', 'png']; FlatlabError on an unknown format."""
    formats = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad or not formats:
        raise FlatlabError(f"unknown figure format {', '.join(bad) or repr(text)}: use a comma-separated subset of "
                           f"{','.join(ALL_FORMATS)}")
    return list(dict.fromkeys(formats))


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def run_slug(run: RunRecord) -> str:
    a = run.attrs
    parts = [str(a.get("algorithm", "run")), bits_label(a.get("bits"))]
    if a.get("seed") is not None:
        parts.append(f"s{a['seed']}")
    from flatlab.report import test_domain

    domain = test_domain(a)
    if domain:
        parts.append(domain)
    parts.append(run.run_id[:6])
    return slug("-".join(parts))


def surface_slug(s: SurfaceRecord, collection: Collection) -> str:
    if s.run_id is not None and s.run_id in collection.runs:
        return slug(f"{run_slug(collection.runs[s.run_id])}-{s.name}")
    return slug(f"{Path(s.source).stem}-{s.name}")


@dataclass
class FigureJob:
    """A figure to write: its kind, file stem (no extension), and how to build it."""

    kind: str
    stem: str
    build: Callable[[], Any] | None = None  # -> matplotlib Figure
    html: Callable[[], str] | None = None
    vtp: Callable[[Path], list[Path]] | None = None
    data: dict[str, Any] = field(default_factory=dict)


# --- selection of data -------------------------------------------------------------------------

def interpolation_marks(surface: SurfaceRecord, collection: Collection) -> list[tuple[float, str]]:
    """For an interpolation line (kind ``line``): ``[(0, "model 1: ..."), (1, "model 2: ...")]``.

    A model is named by the run of the same checkpoint (SHA-256) when the inputs hold it, else by
    its file's folder name.
    """
    if str(surface.attrs.get("kind")) != "line":
        return []
    by_sha = {str(r.attrs.get("checkpoint_sha256")): r for r in collection.runs.values()
              if r.attrs.get("checkpoint_sha256")}
    marks = []
    for x, key in ((0.0, "checkpoint"), (1.0, "checkpoint2")):
        run = by_sha.get(str(surface.attrs.get(f"{key}_sha256")))
        if run is not None:
            name = run.title.split(", test ")[0]
        else:
            path = Path(str(surface.attrs.get(key, "?")))
            name = path.parent.name if path.name == "model.pt" else path.name
        marks.append((x, f"model {int(x) + 1}: {name}"))
    return marks


def density_curves(collection: Collection) -> list[mplots.DensityCurve]:
    """Every run's stored spectral density (curvature/density_grid, density)."""
    out = []
    for run in sorted(collection.runs.values(), key=lambda r: (r.quantized, r.label)):
        node = run.groups.get("curvature")
        if isinstance(node, dict) and "density_grid" in node and "density" in node:
            out.append(mplots.DensityCurve(run.title, np.asarray(node["density_grid"], dtype=np.float64).ravel(),
                                           np.asarray(node["density"], dtype=np.float64).ravel(), run.quantized,
                                           f"{run.attrs.get('algorithm', '?')} {bits_label(run.attrs.get('bits'))}"))
    return out


def flatness_series(collection: Collection) -> tuple[list[mplots.FlatnessSeries], bool]:
    """Local flatness per (algorithm, bits), and whether the x axis is relative to ||w||.

    Runs of one group with the same radii are averaged, with the standard error over runs and,
    per radius, the 95% stratified bootstrap CI of the mean over seeds (resampled within test
    domains, :func:`flatlab.stats.summarize_group`); a single run keeps its Monte Carlo standard
    errors (drawn as +-1.96 s.e.); runs whose radii differ are drawn one by one.
    """
    from flatlab.report import test_domain
    from flatlab.stats import summarize_group

    found = []
    for run in collection.runs.values():
        node = run.groups.get("local_flatness")
        if not isinstance(node, dict) or "gammas" not in node:
            continue
        attrs = node.get("attrs", {})
        gammas = np.asarray(node["gammas"], dtype=np.float64).ravel()
        radii = np.asarray(attrs.get("radii", gammas), dtype=np.float64).ravel()
        relative = bool(attrs.get("relative", False)) and radii.shape == gammas.shape
        found.append((run, gammas, radii if relative else gammas, relative, node))
    if not found:
        return [], False
    relative = all(f[3] for f in found)
    groups: dict[tuple[str, str], list[tuple]] = {}
    for run, gammas, radii, _, node in found:
        x = radii if relative else gammas
        key = (str(run.attrs.get("algorithm")), bits_label(run.attrs.get("bits")))
        groups.setdefault(key, []).append((run, x, node))
    series = []
    for (alg, bits), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        label = alg if bits == "fp" else f"{alg} {bits}"
        same = all(len(m[1]) == len(members[0][1]) and np.allclose(m[1], members[0][1]) for m in members)

        def arr(node: dict[str, Any], key: str, n: int) -> np.ndarray:
            return np.asarray(node[key], dtype=np.float64).ravel() if key in node else np.full(n, np.nan)

        if len(members) == 1 or not same:
            for run, x, node in members:
                n = len(x)
                series.append(mplots.FlatnessSeries(
                    label if len(members) == 1 else run.title, x, arr(node, "source", n), arr(node, "source_stderr", n),
                    arr(node, "target", n), arr(node, "target_stderr", n), 1))
            continue
        x = members[0][1]
        n = len(x)
        stacked = {k: np.stack([arr(m[2], k, n) for m in members]) for k in ("source", "target")}
        k = len(members)
        domains = [str(test_domain(m[0].attrs) or "-") for m in members]
        cis = {}
        for split, values in stacked.items():
            ci = np.full((2, n), np.nan)
            for j in range(n):
                col = values[:, j]
                keep = np.isfinite(col)
                if keep.sum() >= 2:
                    g = summarize_group(col[keep], [d for d, kk in zip(domains, keep) if kk])
                    ci[:, j] = (g.ci_low, g.ci_high)
            cis[split] = ci
        series.append(mplots.FlatnessSeries(
            label, x, stacked["source"].mean(0), stacked["source"].std(0, ddof=1) / math.sqrt(k),
            stacked["target"].mean(0), stacked["target"].std(0, ddof=1) / math.sqrt(k), k,
            source_ci=cis["source"], target_ci=cis["target"]))
    return series, relative


def shared_direction_groups(collection: Collection) -> list[list[SurfaceRecord]]:
    """2D surfaces computed on the same random draws and the same grid, two or more per group.

    A surface that made its own draws is keyed by the hash of its ``raw_directions``; one that
    reused draws (``flatlab surface --directions``) records that hash as ``directions_sha256``.
    Within a group full-precision models come first, then by label.
    """
    groups: dict[tuple[str, tuple[float, ...], tuple[float, ...]], list[SurfaceRecord]] = {}
    for s in collection.surfaces:
        if s.dims != 2 or s.ycoordinates is None:
            continue
        key = s.attrs.get("directions_sha256") or s.attrs.get("raw_directions_sha256")
        if not key:
            continue
        grid = (tuple(np.round(s.xcoordinates, 12)), tuple(np.round(s.ycoordinates, 12)))
        groups.setdefault((str(key), *grid), []).append(s)
    return [sorted(members, key=lambda c: (bool(c.quantized), c.label)) for members in groups.values()
            if len(members) >= 2]


def shared_group_slug(members: Sequence[SurfaceRecord], collection: Collection) -> str:
    """A file-name stem for a shared-direction group: its models' run slugs joined by ``-vs-``, then
    the first surface's name (two groups of the same models differ in it)."""
    parts = [run_slug(collection.runs[m.run_id]) if m.run_id in collection.runs else slug(Path(m.source).stem)
             for m in members]
    return slug(f"{'-vs-'.join(parts)}-{members[0].name}")


def correlation_with_intervals(rows: Sequence[dict[str, Any]], measure: str, target: str = "ood_acc") -> dict[str, Any]:
    """Pooled Kendall tau and Spearman rho of ``measure`` against ``target`` over the rows where
    both are finite, with p-values (n >= 5) and 95% percentile bootstrap CIs over runs resampled
    within test domains (``kendall_ci``, ``spearman_ci``; NaN for n < 5)."""
    from flatlab.stats import correlation_with_ci

    pts = [r for r in rows if math.isfinite(r.get(measure, math.nan)) and math.isfinite(r.get(target, math.nan))]
    x, y = [r[measure] for r in pts], [r[target] for r in pts]
    corr = rank_correlation(x, y)
    strata = [str(r.get("test_domain") or "-") for r in pts]
    for method, key in (("kendall", "kendall_ci"), ("spearman", "spearman_ci")):
        corr[key] = [math.nan, math.nan]
        if len(pts) >= 2:
            c = correlation_with_ci(x, y, method=method, strata=strata, n_resamples=1999)
            corr[key] = [c.ci_low, c.ci_high]
    return corr


def claims_forest_job(results: Sequence[dict[str, Any]], stem: str = "claims_forest",
                      title: str | None = None) -> FigureJob:
    """The forest plot of claims results (:func:`flatlab.claims.evaluate_claims`) as a figure job."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return FigureJob("claims_forest", stem, build=lambda: mplots.claims_forest(results, title),
                     data={"tests": len(results), "counts": counts})


def _strings(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values, dtype=object).ravel()]


def overlap_maps(collection: Collection) -> list[tuple[RunRecord, dict[str, Any]]]:
    """Every run's stored per-domain curvature with its overlap matrix (``per_domain`` group):
    ``(run, {"overlap", "domains", "targets", "k"})``."""
    out = []
    for run in sorted(collection.runs.values(), key=lambda r: (r.quantized, r.label)):
        node = run.groups.get("per_domain")
        if not isinstance(node, dict) or "overlap" not in node or "domains" not in node:
            continue
        domains = _strings(node["domains"])
        flags = np.asarray(node.get("is_target", np.zeros(len(domains), dtype=bool)), dtype=bool).ravel()
        overlap = np.asarray(node["overlap"], dtype=np.float64)
        if overlap.shape != (len(domains), len(domains)) or flags.shape != (len(domains),):
            continue
        k = node.get("attrs", {}).get("top_k")
        out.append((run, {"overlap": overlap, "domains": domains, "k": int(k) if k is not None else None,
                          "targets": [d for d, t in zip(domains, flags) if t]}))
    return out


def barrier_records(collection: Collection) -> list[tuple[RunRecord, str, dict[str, Any]]]:
    """Every stored barrier group: ``(run it is stored under, name, node)``."""
    from flatlab.measures.barriers import barrier_groups

    out = []
    for run in sorted(collection.runs.values(), key=lambda r: (r.quantized, r.label)):
        for name, node in sorted(barrier_groups(run.groups).items()):
            if "alphas" in node and node.get("attrs", {}).get("kind") in ("line", "pairwise"):
                out.append((run, name, dict(node)))
    return out


def _barrier_job(run: RunRecord, name: str, node: dict[str, Any]) -> FigureJob:
    attrs = node.get("attrs", {})
    splits = [s for s in attrs.get("splits", []) if isinstance(node.get(s), dict)]
    stem = slug(f"{run_slug(run)}-{name}")
    if attrs.get("kind") == "line":
        losses = {s: np.asarray(node[s]["losses"], dtype=np.float64) for s in splits}
        barriers = {s: (float(attrs.get(f"loss_barrier_{s}", np.nan)), float(attrs.get(f"loss_barrier_{s}_stderr", np.nan)),
                        float(attrs.get(f"loss_barrier_{s}_alpha", np.nan))) for s in splits}
        labels = (str(attrs.get("model1_label", "model 1")), str(attrs.get("model2_label", "model 2")))
        title = f"loss barrier {name}: {labels[0]} → {labels[1]} (bn {attrs.get('bn', '?')})"
        return FigureJob("barrier_line", f"barrier_{stem}",
                         build=lambda a=node["alphas"], lo=losses, b=barriers, la=labels, t=title:
                         bplots.barrier_line(a, lo, b, la, t), data={"barrier": name, "run_id": run.run_id})
    labels = _strings(node.get("labels", []))
    matrices = {s: np.asarray(node[s]["loss_barriers"], dtype=np.float64) for s in splits}
    errors = {s: np.asarray(node[s]["loss_barrier_stderrs"], dtype=np.float64) for s in splits
              if "loss_barrier_stderrs" in node[s]}
    title = f"{name}: pairwise loss barriers between the members (bn {attrs.get('bn', '?')})"
    return FigureJob("barrier_matrix", f"barrier_matrix_{stem}",
                     build=lambda m=matrices, la=labels, e=errors, t=title: bplots.barrier_matrix(m, la, e, t),
                     data={"barrier": name, "run_id": run.run_id})


# --- jobs --------------------------------------------------------------------------------------

def figure_jobs(collection: Collection, measures: Sequence[str] | None = None,
                radii: Sequence[float] | None = None, *, titles: bool = True, z_scale: str = "linear",
                clip_quantile: float = 0.95) -> tuple[list[FigureJob], list[dict[str, str]]]:
    """Every figure the collection supports, and the ones skipped (with the reason).

    Args:
        collection: :func:`flatlab.report.load_inputs`'s result.
        measures, radii: the measure columns of the measure figures (:func:`flatlab.report.build_rows`).
        titles: False builds every figure without titles (suptitle, axes titles, the HTML page's
            title), for a paper whose captions say what the figures are.
        z_scale, clip_quantile: the z axis of the 3D surfaces, static and HTML
            (:func:`flatlab.plots.surfaces.scaled_z`: ``linear``, ``log`` or ``clip``).

    Raises:
        ConfigError: a bad ``z_scale`` or ``clip_quantile`` (before anything is built).
    """
    splots.check_z_scale(z_scale, clip_quantile)
    jobs, skipped = _figure_jobs(collection, measures, radii, titles, z_scale, clip_quantile)
    if not titles:
        for job in jobs:
            job.build = _untitled(job.build)
    return jobs, skipped


def _untitled(build: Callable[[], Any] | None) -> Callable[[], Any] | None:
    """``build`` with every title of its figure removed (the surface builders also move the split
    into their labels themselves; the others' panels keep their axis labels)."""
    if build is None:
        return None
    from flatlab.plots.style import drop_titles

    return lambda: drop_titles(build())


def _figure_jobs(collection: Collection, measures: Sequence[str] | None, radii: Sequence[float] | None,
                 titles: bool, z_scale: str, clip_quantile: float) -> tuple[list[FigureJob], list[dict[str, str]]]:
    jobs: list[FigureJob] = []
    skipped: list[dict[str, str]] = []

    # 1D loss curves: every 1D surface of one name on one axis (FP and quantized together).
    by_name: dict[str, list[SurfaceRecord]] = {}
    for s in collection.surfaces:
        if s.dims == 1:
            by_name.setdefault(s.name, []).append(s)
    for name, curves in by_name.items():
        curves = sorted(curves, key=lambda c: (bool(c.quantized), c.label))
        marks = interpolation_marks(curves[0], collection) if len(curves) == 1 else []
        if marks:  # one line through two models: name it for what it is
            curves = [replace(curves[0], run_label="interpolation, model 1 → model 2", quantized=None)]
        jobs.append(FigureJob("loss_curves_1d", f"loss_1d_{slug(name)}",
                              build=lambda c=curves, n=name, m=marks: splots.loss_curves_1d(c, f"1D loss: {n}", m,
                                                                                           titles=titles),
                              data={"surfaces": [c.label for c in curves]}))

    z = {"z_scale": z_scale, "clip_quantile": clip_quantile, "titles": titles}
    for s in collection.surfaces:
        if s.dims != 2:
            continue
        stem = surface_slug(s, collection)
        jobs.append(FigureJob("contour_2d", f"contour_{stem}",
                              build=lambda s=s: splots.contour_2d(s, f"{s.label}: loss contours (log-spaced levels)",
                                                                  titles=titles)))
        jobs.append(FigureJob("surface_3d", f"surface3d_{stem}",
                              build=lambda s=s: splots.surface_3d(s, f"{s.label}: loss surface", **z),
                              html=lambda s=s: splots.surface_html(s, f"{s.label}: loss surface", **z),
                              vtp=lambda base, s=s: [splots.write_vtp(f"{base}_{split}.vtp", s, split)
                                                     for split, prefix in splots.SPLITS
                                                     if f"{prefix}_loss" in s.values]))

    for members in shared_direction_groups(collection):
        names = " vs ".join(m.run_label or m.label for m in members)
        jobs.append(FigureJob("contour_2d_shared", f"contour_shared_{shared_group_slug(members, collection)}",
                              build=lambda m=members, t=names: splots.contour_2d_shared(
                                  m, f"{t}: loss contours on shared directions (one colour scale)", titles=titles),
                              data={"surfaces": [m.label for m in members]}))

    curves = density_curves(collection)
    if curves:
        jobs.append(FigureJob("spectral_density", "spectral_density",
                              build=lambda: mplots.spectral_density(curves)))
    else:
        skipped.append({"figure": "spectral_density", "reason": "no run holds curvature/density (flatlab sharpness --density)"})

    series, relative = flatness_series(collection)
    if series:
        jobs.append(FigureJob("local_flatness", "local_flatness",
                              build=lambda: mplots.local_flatness(series, relative)))
    else:
        skipped.append({"figure": "local_flatness", "reason": "no run holds local_flatness (flatlab sharpness --local-flatness)"})

    for run, found in overlap_maps(collection):
        from flatlab.plots.overlap import overlap_heatmap

        jobs.append(FigureJob("eigenspace_overlap", f"overlap_{run_slug(run)}",
                              build=lambda f=found, r=run: overlap_heatmap(
                                  f["overlap"], f["domains"], k=f["k"], targets=f["targets"],
                                  title=f"{r.title}: per-domain Hessian top-{f['k']} eigenspace overlap"),
                              data={"run_id": run.run_id}))

    for run, name, node in barrier_records(collection):
        jobs.append(_barrier_job(run, name, node))

    if collection.runs:
        rows, names = build_rows(collection, measures, radii)
        colors = {alg: color(i) for i, alg in enumerate(sorted({str(r["algorithm"]) for r in rows}))}
        for name in names:
            pts = [r for r in rows if math.isfinite(r[name]) and math.isfinite(r["ood_acc"])]
            if len(pts) < 2:
                skipped.append({"figure": f"measure_vs_ood_{name}", "reason": f"{len(pts)} run(s) with {name} and ood_acc; need 2"})
                continue
            corr = correlation_with_intervals(pts, name)
            jobs.append(FigureJob("measure_vs_ood", f"measure_vs_ood_{slug(name)}",
                                  build=lambda n=name, c=corr: mplots.measure_vs_ood(rows, n, measure_axis_label(n), c,
                                                                                 colors=colors),
                                  data={"measure": name, "correlation": corr}))
        bit_widths = {r["bits_label"] for r in rows if math.isfinite(r["ood_acc"])}
        if len(bit_widths) >= 2:
            cols = ["ood_acc", *names]
            groups = grouped_means(rows, cols)
            jobs.append(FigureJob("bits_vs_ood", "bits_vs_ood_acc",
                                  build=lambda: mplots.bits_sweep(groups, ["ood_acc"], ["OOD accuracy (%)"],
                                                                  "bit width vs OOD accuracy (mean over seeds, 95% "
                                                                  "bootstrap CI)", colors)))
            sharp = [n for n in names if sum(g["stats"][n]["n"] for g in groups) > 0][:4]
            if sharp:
                jobs.append(FigureJob("bits_vs_sharpness", "bits_vs_sharpness",
                                      build=lambda s=sharp: mplots.bits_sweep(
                                          groups, s, [measure_axis_label(n) for n in s],
                                          "bit width vs sharpness (mean over seeds, 95% bootstrap CI; larger = "
                                          "sharper)", colors)))
        else:
            skipped.append({"figure": "bits_vs_ood", "reason": f"{len(bit_widths)} bit width(s) among the runs; need 2"})
    return jobs, skipped


def write_figures(collection: Collection, out_dir: str | os.PathLike[str], formats: Sequence[str],
                  measures: Sequence[str] | None = None, radii: Sequence[float] | None = None,
                  progress: Callable[[str], None] | None = None,
                  claims: Sequence[dict[str, Any]] = (), *, titles: bool = True, z_scale: str = "linear",
                  clip_quantile: float = 0.95) -> dict[str, Any]:
    """Build and write every figure the collection supports, plus one forest plot per claims
    report in ``claims`` (:func:`flatlab.claims.evaluate_claims` results).

    ``titles``, ``z_scale`` and ``clip_quantile`` as in :func:`figure_jobs` (file names keep
    the runs' slugs either way).

    Returns:
        ``{"out_dir", "formats", "figures": [{"kind", "stem", "files"}], "skipped": [...]}``.

    Raises:
        FlatlabError: nothing in the inputs can be drawn in the requested formats.
    """
    out = Path(out_dir)
    jobs, skipped = figure_jobs(collection, measures, radii, titles=titles, z_scale=z_scale,
                                clip_quantile=clip_quantile)
    for report in claims:
        name = Path(str(report.get("file", "claims"))).stem
        job = claims_forest_job(report["results"], f"claims_forest_{slug(name)}",
                                f"claims of {report.get('source') or name}: effect and interval per test")
        if not titles:
            job.build = _untitled(job.build)
        jobs.append(job)
    fig_formats = [f for f in formats if f in FIGURE_FORMATS]
    written = []
    for job in _wanted(jobs, formats):
        if progress is not None:
            progress(job.stem)
        files: list[Path] = []
        base = out / job.stem
        if job.build is not None and fig_formats:
            files += save_figure(job.build(), base, fig_formats)
        if job.html is not None and "html" in formats:
            from flatlab.io import atomic_write_text

            atomic_write_text(f"{base}.html", job.html())
            files.append(Path(f"{base}.html"))
        if job.vtp is not None and "vtp" in formats:
            files += job.vtp(base)
        if files:
            written.append({"kind": job.kind, "stem": job.stem, "files": [str(f) for f in files], **job.data})
    if not written:
        kinds = sorted({j.kind for j in jobs})
        raise FlatlabError("nothing to draw in the formats " + ",".join(formats) + " from these inputs"
                           + (f" (they support {', '.join(kinds)})" if kinds else
                              ": they hold no surface, spectral density, local flatness, per-domain overlap, "
                              "barrier, measure on 2+ runs, or bit-width sweep"))
    return {"out_dir": str(out), "formats": list(formats), "figures": written, "skipped": skipped}


def _wanted(jobs: Sequence[FigureJob], formats: Sequence[str]) -> Iterator[FigureJob]:
    fig = any(f in FIGURE_FORMATS for f in formats)
    for job in jobs:
        if (fig and job.build is not None) or ("html" in formats and job.html) or ("vtp" in formats and job.vtp):
            yield job


__all__ = ["ALL_FORMATS", "FIGURE_FORMATS", "FigureJob", "barrier_records", "claims_forest_job",
           "correlation_with_intervals", "density_curves", "figure_jobs", "flatness_series", "measure_axis_label",
           "overlap_maps", "parse_formats", "slug", "write_figures"]


def script_main(doc: str, draw: Callable[..., list[Path]], argv: Sequence[str] | None = None, *,
                add_options: Callable[[Any], None] | None = None) -> None:
    """Entry point of a ``figures/`` script: ``python figures/fig_X.py RESULTS... OUTDIR [--format pdf,png]``.

    ``draw(collection, out_dir, formats, **options)`` builds the figure(s) with the package's
    builders and returns the files written; ``add_options(parser)`` adds a script's own options,
    which ``draw`` receives by their argparse destination. Bad input ends with one ``error:``
    line and exit status 2.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    parser.add_argument("results", nargs="+", help="results file(s) or surface files")
    parser.add_argument("out_dir", help="folder for the figure files")
    parser.add_argument("--format", default="pdf,png", help="comma-separated formats (default pdf,png)")
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("results", "out_dir", "format")}
    try:
        formats = parse_formats(args.format)
        out = Path(args.out_dir)
        files = draw(load_inputs_for_script(args.results), out, formats, **options)
        if not files:
            raise FlatlabError(f"the inputs hold nothing for this figure ({Path(sys.argv[0]).name})")
    except FlatlabError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(2)
    for f in files:
        sys.stdout.write(f"{f}\n")
    sys.exit(0)


def load_inputs_for_script(paths: Sequence[str]) -> Collection:
    from flatlab.report import load_inputs

    return load_inputs(paths)


def figure_formats(formats: Sequence[str]) -> list[str]:
    """The matplotlib formats among ``formats`` (pdf, png, svg)."""
    return [f for f in formats if f in FIGURE_FORMATS]
