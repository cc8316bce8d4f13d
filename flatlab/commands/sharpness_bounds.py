"""Sharpness bounds for ``flatlab sharpness``: PAC-Bayes, magnitude-aware, worst case, local flatness.

Not a sub-command of its own: :mod:`flatlab.commands.sharpness` calls

* :func:`add_arguments` to add the flags below,
* :func:`requested` to see whether any of these measures was asked for,
* :func:`run_bounds` to compute them; it returns ``{measure: {quantity: value}}`` (merged into
  the JSON payload) and, with ``--out``, writes ``/runs/<id>/bounds/<name>`` (every value and input
  as attributes) and ``/runs/<id>/local_flatness`` (gammas, source, source_stderr, target,
  target_stderr) through :mod:`flatlab.results`.

Section-4 measures (PAC-Bayes, magnitude-aware, worst case) use the training set (``source``) and
the BatchNorm-folded, de-quantized model; local flatness perturbs the (de-quantized) model as it
is, on ``source`` and ``target``. The flags ``--seed``, ``--batch-size``, ``--max-samples`` and
``--out`` are the sharpness command's own and are shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flatlab.errors import FlatlabError
from flatlab.io import settings_fingerprint
from flatlab.resume import from_jsonable, stored_attr, to_jsonable

MEASURES = ("pacbayes", "magnitude", "worst_case", "local_flatness")


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    # Flags the host command already defines (e.g. --seed) are shared, not redefined.
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sharpness-bound flags to the ``flatlab sharpness`` parser."""
    group = parser.add_argument_group("sharpness bounds (Jiang et al. 2019) and local flatness (SWAD)")
    group.add_argument("--pacbayes", action="store_true",
                       help="PAC-Bayes orig/init bounds and inv_sigma_sq from the noise search (sigma = noise std)")
    group.add_argument("--magnitude", action="store_true",
                       help="magnitude-aware sigma', its orig/init bounds and inv_sigma_sq")
    group.add_argument("--worst-case", action="store_true",
                       help="worst-case alpha' (plain and magnitude-aware), bounds, inv_alpha_sq, Keskar's sharpness")
    group.add_argument("--local-flatness", action="store_true",
                       help="SWAD's local flatness F_gamma on source and target with Monte Carlo standard errors")
    group.add_argument("--all", action="store_true", help="all four of the above")
    group.add_argument("--target-drop", type=float, default=0.1,
                       help="training-accuracy drop that defines sigma and alpha' (default 0.1)")
    group.add_argument("--drop-tolerance", type=float, default=0.01,
                       help="the search stops once |drop - target| < this (default 0.01)")
    group.add_argument("--mc-samples", type=int, default=10, metavar="K",
                       help="Monte Carlo weight samples per sigma (default 10, reused across steps)")
    group.add_argument("--bisection-depth", type=int, default=15, metavar="D", help="maximum bisection steps (default 15)")
    group.add_argument("--sigma-max", type=float, default=2.0, help="initial bracket [0, sigma_max] for sigma and alpha' (default 2)")
    group.add_argument("--ascent-steps", type=int, default=20,
                       help="projected gradient-ascent steps inside the worst-case searches and for Keskar (default 20)")
    group.add_argument("--keskar-eps", type=float, default=1e-3, help="Keskar's box size epsilon (default 1e-3)")
    radii = group.add_mutually_exclusive_group()
    radii.add_argument("--gammas", default=None, metavar="LIST",
                       help="absolute local-flatness radii, comma separated and increasing (QT-DoG: 0,5,...,60 for ResNet-50)")
    radii.add_argument("--gammas-rel", default=None, metavar="LIST",
                       help="radii relative to ||w|| (default 0,0.02,0.04,0.06,0.08,0.1)")
    group.add_argument("--flatness-samples", type=int, default=100, metavar="N",
                       help="Monte Carlo samples per radius for local flatness (default 100, as SWAD)")
    _add(parser, "--seed", type=int, default=0, help="seeds the noise draws and directions")
    _add(parser, "--batch-size", type=int, default=256, help="samples per forward pass")
    _add(parser, "--max-samples", type=int, default=None, metavar="N", help="measure on a seeded subset")
    _add(parser, "--out", default=None, metavar="RESULTS.h5", help="write the results to this HDF5 file")


def requested(args: argparse.Namespace) -> bool:
    """True if any bound or local flatness was asked for."""
    return bool(getattr(args, "all", False) or any(getattr(args, m, False) for m in MEASURES))


def _wanted(args: argparse.Namespace) -> list[str]:
    return [m for m in MEASURES if getattr(args, "all", False) or getattr(args, m, False)]


def parse_radii(text: str, flag: str) -> list[float]:
    """'0,0.05,0.1' -> [0.0, 0.05, 0.1]; FlatlabError on anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FlatlabError(f"{flag} must be comma-separated numbers, e.g. 0,0.05,0.1; got {text!r}") from None
    from flatlab.sharpness.local_flatness import check_radii

    return check_radii(values, flag)


def _validate(args: argparse.Namespace) -> None:
    from flatlab.sharpness.sigma_search import check_target_drop

    check_target_drop(args.target_drop, args.drop_tolerance)
    for flag, value, low in (("--mc-samples", args.mc_samples, 1), ("--bisection-depth", args.bisection_depth, 1),
                             ("--ascent-steps", args.ascent_steps, 1), ("--flatness-samples", args.flatness_samples, 2)):
        if value < low:
            raise FlatlabError(f"{flag} must be at least {low}, got {value}")
    if not args.sigma_max > 0:
        raise FlatlabError(f"--sigma-max must be positive, got {args.sigma_max}")
    if not args.keskar_eps > 0:
        raise FlatlabError(f"--keskar-eps must be positive, got {args.keskar_eps}")


def _flat_attrs(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and isinstance(v, (int, float, str, bool))}


def run_bounds(args: argparse.Namespace, ckpt: Any, device: Any, splits: Any) -> dict[str, Any]:
    """Compute the requested measures of checkpoint ``ckpt``; write them to ``args.out`` if set.

    Returns:
        ``{"pacbayes": {...}, "magnitude": {...}, "worst_case": {...}, "local_flatness": {...}}``
        with the requested keys only; every value and input named.
    """
    import torch
    from tqdm import tqdm

    from flatlab.results import run_id_for
    from flatlab.sharpness import (
        DEFAULT_RELATIVE_RADII,
        local_flatness,
        magnitude_bounds,
        pacbayes_bounds,
        worst_case_sharpness,
    )

    _validate(args)
    wanted = _wanted(args)
    if args.gammas is not None:
        radii, relative = parse_radii(args.gammas, "--gammas"), False
    elif args.gammas_rel is not None:
        radii, relative = parse_radii(args.gammas_rel, "--gammas-rel"), True
    else:
        radii, relative = list(DEFAULT_RELATIVE_RADII), True
    seed = int(getattr(args, "seed", 0))
    batch_size = int(getattr(args, "batch_size", 256))
    max_samples = getattr(args, "max_samples", None)
    quiet = bool(getattr(args, "quiet", False))

    model = ckpt.build_model(device, effective=True)
    initial = ckpt.build_initial_model(device)
    m = splits.split_size("source")
    source = splits.split_batches("source", batch_size, max_samples, seed, device)
    search = {"target_drop": args.target_drop, "tolerance": args.drop_tolerance, "depth": args.bisection_depth}
    results: dict[str, Any] = {}
    out_path = getattr(args, "out", None)
    run_id = run_id_for(ckpt.path)
    common = {"seed": seed, "batch_size": batch_size, "max_samples": max_samples, "device": torch.device(device).type}
    noise = {"target_drop": args.target_drop, "drop_tolerance": args.drop_tolerance,
             "bisection_depth": args.bisection_depth, "sigma_max": args.sigma_max}
    settings = {"pacbayes": {**common, **noise, "mc_samples": args.mc_samples},
                "magnitude": {**common, **noise, "mc_samples": args.mc_samples},
                "worst_case": {**common, **noise, "ascent_steps": args.ascent_steps, "keskar_eps": args.keskar_eps},
                "local_flatness": {**common, "radii": list(radii), "relative": relative,
                                   "samples": args.flatness_samples}}
    resumed: list[str] = []
    bar = tqdm(total=len(wanted), desc="sharpness bounds", unit="measure", disable=quiet, file=sys.stderr, leave=False)
    try:
        for name in wanted:
            bar.set_postfix_str(name)
            # A measure already in --out with these settings (an earlier or interrupted run) is reused.
            stamp = settings_fingerprint({"measure": name, **settings[name]})
            if stored_attr(out_path, run_id, GROUPS[name], "settings_fingerprint") == stamp:
                text = stored_attr(out_path, run_id, GROUPS[name], "result_json")
                if text:
                    results[name] = from_jsonable(json.loads(text))
                    resumed.append(name)
                    bar.update(1)
                    continue
            if name == "pacbayes":
                results[name] = pacbayes_bounds(model, source, initial, m=m, mc_samples=args.mc_samples,
                                                sigma_max=args.sigma_max, seed=seed, **search)
            elif name == "magnitude":
                results[name] = magnitude_bounds(model, source, initial, m=m, mc_samples=args.mc_samples,
                                                 sigma_max=args.sigma_max, seed=seed, **search)
            elif name == "worst_case":
                results[name] = worst_case_sharpness(model, source, initial, m=m, alpha_max=args.sigma_max,
                                                     ascent_steps=args.ascent_steps, keskar_eps=args.keskar_eps,
                                                     **search)
            else:
                target = splits.split_batches("target", batch_size, max_samples, seed, device)
                out = local_flatness(model, {"source": source, "target": target}, radii, relative=relative,
                                     samples=args.flatness_samples, seed=seed)
                results[name] = {
                    "gammas": out["gammas"], "radii": out["radii"], "relative": out["relative"],
                    "weight_norm": out["weight_norm"], "samples": out["samples"], "antithetic": out["antithetic"],
                    "num_parameters": out["num_parameters"], "seed": seed,
                    "source": out["splits"]["source"]["flatness"], "source_stderr": out["splits"]["source"]["stderr"],
                    "target": out["splits"]["target"]["flatness"], "target_stderr": out["splits"]["target"]["stderr"],
                    "source_loss": out["splits"]["source"]["loss"], "target_loss": out["splits"]["target"]["loss"],
                    "source_n": out["splits"]["source"]["n_eval"], "target_n": out["splits"]["target"]["n_eval"],
                }
            if name != "local_flatness":
                results[name]["quantized"] = bool(ckpt.is_quantized)
            if out_path:
                _write(out_path, ckpt, name, results[name], stamp)
            bar.update(1)
    finally:
        bar.close()
    if resumed:
        results["bounds_resumed"] = resumed
    return results


#: Where each measure lives under /runs/<run_id>/ in a results file.
GROUPS = {"pacbayes": "bounds/pacbayes", "magnitude": "bounds/magnitude", "worst_case": "bounds/worst_case",
          "local_flatness": "local_flatness"}


def _write(path: str, ckpt: Any, name: str, result: dict[str, Any], stamp: str) -> None:
    """Write one measure's group as soon as it is done, with what a rerun needs to reuse it."""
    import numpy as np

    from flatlab.results import run_attrs_from_checkpoint, run_id_for, write_group

    arrays: dict[str, Any] = {}
    attrs = _flat_attrs(result)
    if name == "local_flatness":
        arrays = {key: np.asarray(result[key], dtype=np.float64)
                  for key in ("gammas", "source", "source_stderr", "target", "target_stderr")}
        attrs["radii"] = list(result["radii"])
    attrs.update(settings_fingerprint=stamp, result_json=json.dumps(to_jsonable(result)))
    write_group(path, run_id_for(ckpt.path), run_attrs_from_checkpoint(ckpt), GROUPS[name], arrays, attrs)


def bounds_text(results: dict[str, Any]) -> str:
    """A compact human table of the headline numbers (the host command may print its own)."""
    from flatlab.commands.common import fmt, table

    rows: list[list[Any]] = []
    for name in ("pacbayes", "magnitude"):
        if name in results:
            r = results[name]
            rows.append([name, f"sigma {fmt(r['sigma'])} (std)", fmt(r["orig"]), fmt(r["init"]),
                         fmt(r["inv_sigma_sq"]), fmt(r["passes"]), r["converged"]])
    if "worst_case" in results:
        r = results["worst_case"]
        rows.append(["worst_case", f"alpha {fmt(r['alpha'])}", fmt(r["orig"]), fmt(r["init"]),
                     fmt(r["inv_alpha_sq"]), fmt(r["passes"]), r["converged"]])
        rows.append(["worst_case (magnitude)", f"alpha {fmt(r['magnitude_alpha'])}", "-", "-",
                     fmt(r["magnitude_inv_alpha_sq"]), fmt(r["magnitude_passes"]), r["magnitude_converged"]])
        rows.append(["keskar", f"eps {fmt(r['keskar_epsilon'])}", fmt(r["keskar"]), "-", "-", "-", "-"])
    parts = []
    if rows:
        parts.append(table(rows, ["measure", "radius", "orig", "init", "1/radius^2", "passes", "converged"]))
    if "local_flatness" in results:
        lf = results["local_flatness"]
        lrows = [[fmt(g), f"{fmt(s)} +- {fmt(se)}", f"{fmt(t)} +- {fmt(te)}"]
                 for g, s, se, t, te in zip(lf["gammas"], lf["source"], lf["source_stderr"], lf["target"],
                                            lf["target_stderr"])]
        parts.append(table(lrows, ["gamma", "F source", "F target"]))
    return "\n\n".join(parts)


__all__ = ["MEASURES", "add_arguments", "bounds_text", "parse_radii", "requested", "run_bounds"]
