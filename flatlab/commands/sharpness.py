"""``flatlab sharpness``: Hessian spectrum, trace, density, per-layer curvature, bounds and local
flatness of a checkpoint.

Measures of a checkpoint's loss on its own data splits, in eval mode: top Hessian eigenvalues by
Lanczos with residuals, trace (Hutch++) with standard error, spectral density, per-layer curvature,
PAC-Bayes/magnitude/worst-case bounds, local flatness. Without measure flags: --top-k 5 --trace.
With --results, each measure is stored as soon as it is done and a rerun computes only what is
missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from flatlab.commands import common

DEFAULT_REQUEST = {"top_eigenvalues": 5, "trace": True}


def _specs() -> tuple[list[Any], list[Any]]:
    from flatlab.measures import FAMILIES, MeasurementSettings
    from flatlab.measures.registry import family_settings

    per_family = [(family, family_settings(name)) for name, family in FAMILIES.items()]
    return per_family, MeasurementSettings.setting_specs()


def _dest(family: str | None, name: str) -> str:
    """The argparse destination of a setting: ``<family>.<name>``, or ``name`` for the
    measurement settings every family shares."""
    return name if family is None else f"{family}.{name}"


def _argument(group: Any, spec: Any, family: str | None, request_value: bool = False) -> None:
    kind = spec.kind.removeprefix("optional ")
    kwargs: dict[str, Any] = {"help": spec.help, "dest": _dest(family, spec.name)}
    if kind == "bool":
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = {"int": int, "float": float}.get(kind, str)
        kwargs["default"] = None
        if spec.choices:
            kwargs["choices"] = spec.choices
        if kind in ("floats", "strs"):
            kwargs["metavar"] = "LIST"
            kwargs.pop("choices", None)  # checked element by element by the config
            if spec.choices:
                kwargs["help"] = f"{kwargs['help']} (comma-separated, from {','.join(map(str, spec.choices))})"
        elif kind == "int":
            kwargs["metavar"] = "K" if request_value else "N"
        elif not spec.choices:
            kwargs["metavar"] = spec.name.upper()  # not the namespaced destination
        if spec.default is not None and not request_value and "default" not in spec.help:
            shown = ",".join(map(str, spec.default)) if isinstance(spec.default, tuple) else common.fmt(spec.default)
            kwargs["help"] = f"{kwargs['help']} (default {shown})"
    group.add_argument(spec.flag, **kwargs)


def register(sub: argparse._SubParsersAction) -> None:
    """The parser. The model is a flatlab checkpoint (CKPT) or a user's model and data
    (``--arch``/``--model-fn``, ``--weights``, ``--dataset``/``--data-fn``: :mod:`flatlab.sources`, the flags of
    :func:`~flatlab.commands.common.add_model_source_options`).

    The flags are derived from the measure registry (:mod:`flatlab.measures`): each measure's
    request flag (``--top-k K``, ``--trace``, ``--pacbayes``, ...) and every setting of its family
    (one flag per setting, shared by the measures that share it). Flags are unique across families
    (:func:`~flatlab.measures.registry.check_registry`); setting names need not be (curvature's
    ``top_k`` is ``--top-k``, per-domain curvature's ``--per-domain-top-k``), so each family's values
    are parsed into their own namespace (argparse destination ``<family>.<setting>``) and handed to
    that family's configs only. The command builds the configs, calls
    :func:`flatlab.pipeline.measure_checkpoint` and prints. With no measure flag at all, the top-5
    eigenvalues and the trace are computed.
    """
    from flatlab.measures import MEASURES

    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="model.pt (or a run folder); or your own model with --arch/--model-fn below")
    per_family, shared = _specs()
    for family, specs in per_family:
        group = p.add_argument_group(family.title)
        value_fields = {m.value_field: m for m in MEASURES.values() if m.family == family.name and m.value_field}
        for measure in (m for m in MEASURES.values() if m.family == family.name):
            if measure.value_field:
                spec = next(s for s in specs if s.name == measure.value_field)
                _argument(group, spec, family.name, request_value=True)
            else:
                group.add_argument(measure.request_flag, action="store_true", help=measure.summary,
                                   dest=f"want_{measure.name}")
        if family.name == "bounds":
            group.add_argument("--all", action="store_true",
                               help="every measure marked for --all: " + ", ".join(
                                   m.request_flag for m in MEASURES.values() if m.in_all))
        for spec in specs:
            if spec.name not in value_fields:
                _argument(group, spec, family.name)
    shared_group = p.add_argument_group("shared by every measure")
    for spec in shared:
        _argument(shared_group, spec, None)
    shared_group.add_argument("--results", default=None, metavar="RESULTS.h5",
                        help="write /runs/<run_id>/... to this HDF5 results file (with provenance) and resume from it")
    common.add_deprecated_alias(p, "--out", "--results", "results", metavar="RESULTS.h5")
    common.add_data_dir_option(p)
    common.add_model_source_options(p)
    common.add_output_options(p)
    p.set_defaults(func=run)


def _flag_names(family: str | None = None) -> dict[str, str]:
    """Setting name -> flag: the measurement settings and ``family``'s settings (every family's,
    first declaration winning, when the family is not known)."""
    per_family, shared = _specs()
    names: dict[str, str] = {s.name: s.flag for s in shared}
    for fam, specs in per_family:  # a family's own setting wins over a shared one of its name
        if fam.name == family:
            names.update({s.name: s.flag for s in specs})
        elif family is None:
            for s in specs:
                names.setdefault(s.name, s.flag)
    return names


def in_flag_words(exc: Exception) -> Exception:
    """A :class:`~flatlab.errors.ConfigError` reworded with command-line flags: those of the
    family of the measure that raised it (every family's when it is not known), also when the
    configs are built for another command, as ``report --measure-args`` does."""
    from flatlab.errors import ConfigError
    from flatlab.measures import get_measure

    if not isinstance(exc, ConfigError):
        return exc
    family = None
    if exc.measure:
        try:
            family = get_measure(exc.measure).family
        except Exception:  # noqa: BLE001 - an unknown name: fall back to every family's flags
            family = None
    return exc.renamed(_flag_names(family))


def requested_measures(args: argparse.Namespace) -> list[str]:
    """The measures the flags ask for (the default pair when none)."""
    from flatlab.measures import MEASURES

    wanted = []
    for measure in MEASURES.values():
        if measure.value_field:
            asked = getattr(args, _dest(measure.family, measure.value_field), None) is not None
        else:
            asked = bool(getattr(args, f"want_{measure.name}", False))
        if asked or (getattr(args, "all", False) and measure.in_all):
            wanted.append(measure.name)
    return wanted


def configs_from_args(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """(measure configs, measurement settings) from the parsed flags.

    Raises:
        FlatlabError: a bad value, worded with the flag.
    """
    from flatlab.measures import ConfigError, MeasurementSettings, get_measure
    from flatlab.measures.registry import configs_from_values, measures_of

    per_family, shared = _specs()

    def given(family: str | None, specs: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in specs:
            value = getattr(args, _dest(family, spec.name), None)
            if value is None or (spec.kind == "bool" and value is False):
                continue
            values[spec.name] = spec.parse_text(value) if spec.kind.endswith(("floats", "strs")) else value
        return values

    try:
        shared_values = given(None, shared)
        wanted = requested_measures(args)
        defaulted = not wanted
        if defaulted:
            wanted = list(DEFAULT_REQUEST)
        configs = []
        for family, specs in per_family:
            try:
                values = given(family.name, specs)
            except ConfigError as exc:  # a value that does not parse: worded with this family's flags
                exc.measure = exc.measure or measures_of(family.name)[0].name
                raise
            mine = [m for m in wanted if get_measure(m).family == family.name]
            if not mine:
                continue
            if defaulted and family.name == "curvature":
                values.setdefault("top_k", DEFAULT_REQUEST["top_eigenvalues"])
            configs += configs_from_values(mine, values)
        settings = MeasurementSettings(**shared_values)
    except Exception as exc:  # noqa: BLE001 - reworded, then raised again
        raise in_flag_words(exc) from None
    return configs, settings


def payload_of(measurement: Any, checkpoint: Any) -> dict[str, Any]:
    """The JSON output: provenance, the curvature results merged at the top level, every other
    family's results under the measure's name (as ``flatlab sharpness`` always printed them).

    ``checkpoint`` is a :class:`~flatlab.checkpoint.Checkpoint`, or a user's model
    (:class:`~flatlab.sources.LoadedSource`: then ``model`` and ``weights`` instead of ``checkpoint``)."""
    from flatlab.measures import FAMILIES, get_measure

    if hasattr(checkpoint, "run_attrs"):  # a user's model
        subject: dict[str, Any] = {"model": checkpoint.model_source.name, "weights": checkpoint.model_source.weights,
                                   "quantized": False}
    else:
        subject = {"checkpoint": str(checkpoint.path), "quantized": bool(checkpoint.is_quantized)}
    payload: dict[str, Any] = {**subject, "run_id": measurement.run_id, "seed": measurement.settings.seed,
                               "device": measurement.device}
    curvature = [r for r in measurement.results.values() if get_measure(r.measure).family == "curvature"]
    if curvature:
        attrs = measurement.group_attrs.get("curvature", {})
        payload.update({k: attrs.get(k) for k in ("curvature", "mode", "split", "wrt", "params", "solver",
                                                  "n_samples", "num_params", "hvp_method", "hvps")})
    for result in measurement.results.values():
        family = FAMILIES[get_measure(result.measure).family]
        if family.nest:
            payload[result.measure] = result.payload
        else:
            payload.update(result.payload)
    if "density" in measurement.results:
        payload["density_stored"] = measurement.path is not None
    if measurement.resumed:
        payload["resumed"] = list(measurement.resumed)
    if measurement.notes:
        payload["notes"] = list(measurement.notes)
    if measurement.path is not None:
        payload["results"] = str(measurement.path)
    return payload


def curvature_table(payload: dict[str, Any]) -> str:
    subject = (f"checkpoint {payload['checkpoint']}" if "checkpoint" in payload else
               f"model {payload['model']}, weights {payload.get('weights') or 'as built (none loaded)'}")
    lines = [subject,
             f"{payload.get('curvature', 'hessian')} ({payload.get('mode', 'eval')} mode) on split {payload['split']} "
             f"({payload.get('n_samples', '-')} samples), wrt {payload['wrt']}, params {payload['params']} "
             f"({payload.get('num_params', '-')}), solver {payload['solver']}, {payload.get('hvps', 0)} products"]
    if "top_eigenvalues" in payload:
        rows = [[i + 1, v, r] for i, (v, r) in enumerate(zip(payload["top_eigenvalues"], payload["residuals"]))]
        lines += ["", common.table(rows, ["k", "eigenvalue", "residual ||Hv - lv||"])]
        if "eigen_method" in payload:
            lanczos = payload["eigen_method"] == "lanczos"
            rule = f"rtol {payload['rtol']:g}" if lanczos else f"tol {payload['tol']:g}"
            lines.append(f"eigenvalues: {'early-stopping Lanczos' if lanczos else 'ARPACK'} "
                         f"({rule}), {payload['eigen_hvps']} products"
                         + ("" if payload.get("converged", True) else ", NOT converged"))
        if "eigen_note" in payload:
            lines.append(f"note: {payload['eigen_note']}")
    if "note" in payload:
        lines.append(f"note: {payload['note']}")
    if "trace" in payload:
        lines += ["", f"trace {common.fmt(payload['trace'])} +- {common.fmt(payload['trace_stderr'])} (standard error; "
                      f"{payload['trace_method']}, {payload['trace_hvps']} products)"]
    if "density" in payload:
        grid = payload["density_grid"]
        where = "stored in --results" if payload.get("density_stored") else "in the JSON output (--json) or --results"
        lines += ["", f"spectral density on [{common.fmt(grid[0])}, {common.fmt(grid[-1])}], sigma {common.fmt(payload['density_sigma'])}, "
                      f"{payload['density_hvps']} products: {where}"]
    if "per_layer" in payload:
        rows = [[L["layer"], L["num_params"], L["top_eigenvalue"], L["trace"], L["trace_stderr"]] for L in payload["per_layer"]]
        lines += ["", common.table(rows, ["layer", "params", "top eigenvalue", "trace", "trace stderr"])]
    return "\n".join(lines)


def _pairs(values: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    for key, inner in values.items():
        if isinstance(inner, (int, float, str, bool)) or inner is None:
            yield key, inner


def nested_table(payload: dict[str, Any], names: list[str]) -> str:
    """measure / quantity / value rows for the nested (non-curvature) measures; local flatness
    as F_gamma +- stderr per radius."""
    from flatlab.measures import get_measure

    rows: list[list[Any]] = []
    parts = []
    for name in names:
        values = payload[name]
        measure = get_measure(name)
        if measure.table is not None:  # the measure's own rows (quantity, value)
            rows += [[name, *row] for row in measure.table(values)]
            continue
        if name == "local_flatness":
            lrows = [[common.fmt(g), f"{common.fmt(s)} +- {common.fmt(se)}", f"{common.fmt(t)} +- {common.fmt(te)}"]
                     for g, s, se, t, te in zip(values["gammas"], values["source"], values["source_stderr"],
                                                values["target"], values["target_stderr"])]
            parts.append(f"local flatness F_gamma ({values['samples']} samples per radius):\n"
                         + common.table(lrows, ["gamma", "F source", "F target"]))
            continue
        rows += [[name, key, inner] for key, inner in _pairs(values)]
    if rows:
        parts.insert(0, common.table(rows, ["measure", "quantity", "value"]))
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.measures import FAMILIES, get_measure
    from flatlab.measures.context import checkpoint_path
    from flatlab.pipeline import measure_checkpoint, measure_source

    configs, settings = configs_from_args(args)
    model_source, data_source = common.model_source_from_args(args, args.checkpoint)
    provenance = {"command_line": common.command_line()}
    if model_source is not None:
        from flatlab.results import check_results_target
        from flatlab.sources import load_source

        if args.results is not None:
            check_results_target(args.results)  # before the model and data are loaded
        # Outside the rewording below: a ConfigError of the source names a flag of this parser.
        ckpt: Any = load_source(model_source, data_source, seed=settings.seed, run_id=args.run_id,
                                loss_fn=args.loss_fn)
    else:
        ckpt = load_checkpoint(checkpoint_path(args.checkpoint))
    try:
        if model_source is not None:
            measurement = measure_source(ckpt, configs, settings=settings, results=args.results,
                                         provenance=provenance, progress=not args.quiet)
        else:
            measurement = measure_checkpoint(ckpt, configs, settings=settings, results=args.results,
                                             data_dir=args.data_dir, provenance=provenance,
                                             progress=not args.quiet)
    except Exception as exc:  # noqa: BLE001 - a ConfigError is reworded with flags
        raise in_flag_words(exc) from None
    payload = payload_of(measurement, ckpt)
    parts = []
    if any(get_measure(n).family == "curvature" for n in measurement.results):
        parts.append(curvature_table(payload))
    nested = [n for n in measurement.results if FAMILIES[get_measure(n).family].nest]
    if nested:
        parts.append(nested_table(payload, nested))
    if measurement.resumed:
        parts.append(f"taken from {measurement.path} (computed earlier with these settings): "
                     f"{', '.join(measurement.resumed)}")
    for note in measurement.notes:
        parts.append(f"note: {note}")
    common.emit(args, payload, "\n\n".join(parts))
    if args.quiet and not args.json:
        sys.stdout.flush()
    return 0
