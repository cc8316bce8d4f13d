"""The library pipeline: measure a checkpoint (or any model and data) with a list of measures.

:func:`measure_checkpoint`, :func:`measure_source` (a user's model and data, :mod:`flatlab.sources`)
and :func:`measure_model` are what ``flatlab sharpness``, ``flatlab
sweep``, ``flatlab demo`` and ``flatlab report --measure`` call. Given measure configs (see
:mod:`flatlab.measures`), they

1. check that every measure writing to one results group shares that group's settings (one
   curvature group holds one split, one parameter set, one solver);
2. with ``results``: read back what an earlier, possibly interrupted run stored there with the
   same fingerprint (every setting, the subset, batch size, seed, device type; the checkpoint is
   covered by the run id) and reuse it instead of computing it again;
3. run every requested measure's input check (``Measure.check``: a layer name, a subset size,
   anything that needs the model or the data) before computing anything, so a bad input is
   refused before a group is written;
4. compute the rest in registry order, writing each measure's group as soon as it is done
   (atomically, through :mod:`flatlab.results`), so a kill loses at most the measure in progress;
5. return a :class:`Measurement` holding one typed
   :class:`~flatlab.measures.base.MeasureResult` per measure.

What a result depends on besides its settings is recorded with it: every group written gets
the environment record of :func:`flatlab.environment.environment` as attributes
(``torch_threads``, ``device``, ``device_name``, ``torch_version``, ``flatlab_version``,
``cpu``, ``cpu_flags``, ``machine``, ``python_version``); a resume under another thread count,
torch or flatlab version, device or instruction set says so in a note (on stderr from the CLI):
floating-point sums, hence the last digits, depend on them. The provenance a result records
(the command that made it) is passed in by the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.measures import (
    MEASURES,
    ConfigError,
    MeasureConfig,
    MeasurementSettings,
    MeasureResult,
)
from flatlab.measures.context import (
    CheckpointContext,
    MeasureContext,
    ModelContext,
    checkpoint_path,
)
from flatlab.measures.registry import fingerprint, get_measure
from flatlab.resume import from_jsonable, stored_attr, to_jsonable

#: Group attribute holding each measure's resume record: {measure: {fingerprint, payload, arrays, attrs, products}}.
RECORDS_ATTR = "measures_json"
#: Attribute of a group that sums the operator products of its measures (curvature: Hessian-vector products).
PRODUCTS_ATTR = {"curvature": "hvps"}


@dataclass
class Measurement:
    """The results of one :func:`measure_checkpoint` / :func:`measure_model` call.

    ``results`` maps measure names to their :class:`MeasureResult` in registry order;
    ``resumed`` lists the measures taken from the results file; ``run_attrs`` the provenance of
    the run (a checkpoint's, :func:`flatlab.results.run_attrs_from_checkpoint`) and ``records``
    each measure's resume record (its settings fingerprint and result), which
    :func:`flatlab.store.write_result` stores so that a later call with ``results`` reuses them.
    """

    results: dict[str, MeasureResult]
    settings: MeasurementSettings
    device: str
    run_id: str | None = None
    path: Path | None = None
    resumed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    group_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_attrs: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def groups(self) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """``{group: (arrays, attrs)}``: what the results file holds for these results, exactly as
        :func:`measure_model` with ``results`` writes it (every measure's arrays of a group, the
        group's attributes and the measures' resume records)."""
        out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        names_of: dict[str, list[str]] = {}
        for name, result in self.results.items():
            names_of.setdefault(get_measure(name).group_for(result.config), []).append(name)
        for group, names in names_of.items():
            arrays: dict[str, Any] = {}
            for name in names:
                arrays.update(self.results[name].arrays)
            records = {n: self.records[n] for n in names if n in self.records}
            out[group] = (arrays, {**self.group_attrs.get(group, {}), RECORDS_ATTR: json.dumps(records)})
        return out

    def __getitem__(self, name: str) -> MeasureResult:
        return self.results[name]

    def __contains__(self, name: object) -> bool:
        return name in self.results

    def estimates(self) -> dict[str, Any]:
        """Every report column of these results, with its standard error (read back from the
        groups as they would be stored)."""
        run: dict[str, Any] = {}
        for name, result in self.results.items():
            group = get_measure(name).group_for(result.config)
            node = run
            for part in group.split("/"):
                node = node.setdefault(part, {"attrs": {}})
            node.update(result.arrays)
            node["attrs"].update(result.attrs)
        from flatlab.measures.registry import read_columns

        return read_columns(run)


def _check_groups(configs: Sequence[MeasureConfig]) -> None:
    """Measures that share a results group must agree on the settings they share."""
    by_group: dict[str, MeasureConfig] = {}
    for config in configs:
        measure = get_measure(config.measure)
        first = by_group.setdefault(measure.group_for(config), config)
        if first is config:
            continue
        shared = {s.name for s in config.setting_specs() if s.shared} & {s.name for s in first.setting_specs() if s.shared}
        for name in sorted(shared):
            a, b = getattr(first, name), getattr(config, name)
            if a != b:
                raise FlatlabError(f"{first.measure} and {config.measure} write one results group ({measure.group_for(config)}) "
                                   f"but differ in {name} ({a!r} vs {b!r}): measure them in separate calls")
    names = [c.measure for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FlatlabError(f"measure {twice[0]} is asked for twice: give each measure once")


def _stored_records(path: Path | None, run_id: str | None, group: str) -> dict[str, Any]:
    if path is None or run_id is None:
        return {}
    text = stored_attr(path, run_id, group, RECORDS_ATTR)
    if not text:
        return {}
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return records if isinstance(records, dict) else {}


def _environment_note(path: Path | None, run_id: str | None, group: str, device: torch.device) -> str | None:
    """A note if ``group`` was stored under another environment than this one (None otherwise)."""
    from flatlab.environment import REPRODUCIBILITY_KEYS, environment, environment_note

    if path is None or not run_id:
        return None
    stored = {key: stored_attr(path, run_id, group, key) for key in REPRODUCIBILITY_KEYS}
    stored = {k: v for k, v in stored.items() if v is not None}
    return environment_note(stored, environment(device), group) if stored else None


def _run(ctx: MeasureContext, configs: Sequence[MeasureConfig], results: str | os.PathLike[str] | None,
         run_id: str | None, run_attrs: Mapping[str, Any] | None, progress: bool) -> Measurement:
    from tqdm import tqdm

    from flatlab.results import write_group

    _check_groups(configs)
    order = {name: i for i, name in enumerate(MEASURES)}
    configs = sorted(configs, key=lambda c: order[c.measure])
    path = Path(results) if results is not None else None
    context_part = ctx.settings.fingerprint_part(ctx.device)
    groups: dict[str, list[MeasureConfig]] = {}
    for config in configs:
        groups.setdefault(get_measure(config.measure).group_for(config), []).append(config)
    stored = {group: _stored_records(path, run_id, group) for group in groups}
    for config in configs:
        measure = get_measure(config.measure)
        if measure.check is not None:
            with _named(measure.name):
                measure.check(ctx, config)
    done: dict[str, dict[str, Any]] = {group: {} for group in groups}  # group -> measure -> record
    out = Measurement({}, ctx.settings, ctx.device.type, run_id, path, run_attrs=dict(run_attrs or {}))
    notes = {g: _environment_note(path, run_id, g, ctx.device) for g in groups}

    bar = tqdm(total=len(configs), desc="measures", unit="measure", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    status = {"measure": "", "products": 0}

    def tick() -> None:  # one operator product (Hessian-vector, ...) done
        status["products"] += 1
        if progress and status["products"] % 5 == 0:
            bar.set_postfix_str(f"{status['measure']}, {status['products']} products")

    ctx.progress = tick
    try:
        for config in configs:
            measure = get_measure(config.measure)
            group = measure.group_for(config)
            status["measure"] = measure.name
            bar.set_postfix_str(measure.name)
            stamp = fingerprint(config, context_part)
            record = stored[group].get(measure.name)
            if isinstance(record, dict) and record.get("fingerprint") == stamp:
                result = MeasureResult(measure.name, config, from_jsonable(record["payload"]),
                                       from_jsonable(record["arrays"]), dict(record["attrs"]),
                                       int(record.get("products", 0)), resumed=True)
                out.resumed.append(measure.name)
                if notes.get(group):
                    out.notes.append(notes[group])  # type: ignore[arg-type]
                    notes[group] = None
            else:
                with _named(measure.name):
                    result = measure.compute(ctx, config)
                record = {"fingerprint": stamp, "payload": to_jsonable(result.payload),
                          "arrays": to_jsonable(result.arrays), "attrs": to_jsonable(result.attrs),
                          "products": int(result.products)}
            out.results[measure.name] = result
            out.records[measure.name] = record
            done[group][measure.name] = record
            attrs = _group_attrs(measure.family, [out.results[n] for n in done[group]], ctx)
            attrs["complete"] = len(done[group]) == len(groups[group])
            out.group_attrs[group] = attrs
            if path is not None and run_id is not None and not result.resumed:
                arrays: dict[str, Any] = {}
                for name in done[group]:
                    arrays.update(out.results[name].arrays)
                write_group(path, run_id, run_attrs or {}, group, arrays,
                            {**attrs, RECORDS_ATTR: json.dumps(done[group])})
            bar.update(1)
        # A group whose measures were all resumed is rewritten only if its completeness changed.
        if path is not None and run_id is not None:
            for group, names in done.items():
                if all(out.results[n].resumed for n in names) and stored_attr(path, run_id, group, "complete") != "True":
                    arrays = {}
                    for name in names:
                        arrays.update(out.results[name].arrays)
                    write_group(path, run_id, run_attrs or {}, group, arrays,
                                {**out.group_attrs[group], RECORDS_ATTR: json.dumps(done[group])})
    finally:
        bar.close()
        ctx.progress = None
    return out


@contextlib.contextmanager
def _named(measure: str) -> Iterator[None]:
    """A ConfigError raised while checking or computing ``measure`` says whose setting it names."""
    try:
        yield
    except ConfigError as exc:
        if exc.measure is None:
            exc.measure = measure
        raise


def _group_attrs(family: str, results: Sequence[MeasureResult], ctx: MeasureContext) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if family == "curvature":
        from flatlab.measures.curvature import common_attrs

        attrs.update(common_attrs(ctx, results[0].config))  # type: ignore[arg-type]
    for result in results:
        attrs.update(result.attrs)
    if family in PRODUCTS_ATTR:
        attrs[PRODUCTS_ATTR[family]] = int(sum(r.products for r in results))
    from flatlab.environment import environment

    attrs.update(environment(ctx.device))
    return attrs


def measurement_of(results: Sequence[MeasureResult], settings: MeasurementSettings | None = None,
                   device: str = "cpu") -> Measurement:
    """A :class:`Measurement` of results computed outside :func:`measure_model` (e.g. with
    :func:`flatlab.measures.curvature.result_of` from a curvature function's result), with the
    group attributes and resume records :func:`measure_model` would give them: each result's
    attributes, a curvature result's settings (matrix, mode, solver, split, ...), the operator
    products, the environment (:func:`flatlab.environment.environment`), and a fingerprint of
    its config and ``settings`` (subset, batch size, seed: what the caller used).

    Raises:
        FlatlabError: two results of one measure, or results of one group with different shared
            settings.
    """
    from flatlab.environment import environment

    settings = settings or MeasurementSettings()
    _check_groups([r.config for r in results])
    context_part = settings.fingerprint_part(torch.device(device))
    out = Measurement({}, settings, torch.device(device).type)
    by_group: dict[str, list[MeasureResult]] = {}
    order = {name: i for i, name in enumerate(MEASURES)}
    for result in sorted(results, key=lambda r: order[r.measure]):
        measure = get_measure(result.measure)
        out.results[result.measure] = result
        out.records[result.measure] = {"fingerprint": fingerprint(result.config, context_part),
                                       "payload": to_jsonable(result.payload), "arrays": to_jsonable(result.arrays),
                                       "attrs": to_jsonable(result.attrs), "products": int(result.products)}
        by_group.setdefault(measure.group_for(result.config), []).append(result)
    for group, members in by_group.items():
        family = get_measure(members[0].measure).family
        attrs: dict[str, Any] = {}
        if family == "curvature":
            from flatlab.measures.curvature import config_attrs

            attrs.update(config_attrs(members[0].config))  # type: ignore[arg-type]
            attrs["seed"] = settings.seed
        for result in members:
            attrs.update(result.attrs)
        if family in PRODUCTS_ATTR:
            attrs[PRODUCTS_ATTR[family]] = int(sum(r.products for r in members))
        attrs.update(environment(device))
        attrs["complete"] = True
        out.group_attrs[group] = attrs
    return out


def merge_group(existing: Mapping[str, Any] | None, arrays: Mapping[str, Any], attrs: Mapping[str, Any],
                shared: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A measures group to write over ``existing`` (the group as stored, read by
    :func:`flatlab.results.read_results`, or None): the measures stored there that ``attrs``'
    records do not replace are kept (their arrays, attributes and records), so results written
    one at a time into one group (a trace, then the eigenvalues) add up.

    Args:
        existing: the stored group, or None.
        arrays, attrs: the new group's (``attrs`` holds its records under :data:`RECORDS_ATTR`).
        shared: the shared settings of the new results (``split``, ``curvature``, ...): a kept
            measure must have been stored with the same ones.
        where: the group's place, for messages.

    Raises:
        FlatlabError: a kept measure was stored with other shared settings.
    """
    new_records = json.loads(attrs[RECORDS_ATTR])
    stored = (existing or {}).get("attrs", {}).get(RECORDS_ATTR)
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError:
            stored = None
    kept = {k: v for k, v in (stored or {}).items() if k not in new_records and isinstance(v, dict)} \
        if isinstance(stored, dict) else {}
    if not kept:
        return dict(arrays), dict(attrs)
    old_attrs = dict(existing["attrs"])  # type: ignore[index]
    for key, value in shared.items():
        if key in old_attrs and str(old_attrs[key]) != str(value):
            raise FlatlabError(f"{where} holds {', '.join(sorted(kept))} measured with {key} {old_attrs[key]!r}; "
                               f"this result has {key} {value!r}: one group holds one setting of {key}. Write it "
                               "under another run_id, or pass merge=False to replace the group")
    merged_arrays: dict[str, Any] = {}
    for record in kept.values():
        merged_arrays.update(from_jsonable(record.get("arrays", {})))
    merged_arrays.update(arrays)
    merged_attrs = {k: v for k, v in old_attrs.items() if k != RECORDS_ATTR}
    merged_attrs.update(attrs)
    records = {**kept, **new_records}
    family_products = [a for g, a in PRODUCTS_ATTR.items() if a in merged_attrs]
    for attr in family_products:  # the group's products add up over every measure it holds
        merged_attrs[attr] = int(sum(int(r.get("products", 0)) for r in records.values()))
    order = {name: i for i, name in enumerate(MEASURES)}
    merged_attrs[RECORDS_ATTR] = json.dumps(dict(sorted(records.items(), key=lambda kv: order.get(kv[0], 99))))
    return merged_arrays, merged_attrs


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    from flatlab.train import resolve_device as _resolve

    return _resolve(name)


def measure_checkpoint(checkpoint: str | os.PathLike[str] | Any, measures: Sequence[MeasureConfig], *,
                       settings: MeasurementSettings | None = None, results: str | os.PathLike[str] | None = None,
                       data_dir: str | None = None, provenance: Mapping[str, Any] | None = None,
                       progress: bool = False) -> Measurement:
    """Measure a flatlab checkpoint on its own data splits.

    Args:
        checkpoint: a ``model.pt`` path, a run folder, or a loaded
            :class:`~flatlab.checkpoint.Checkpoint`.
        measures: configs of the measures to compute (each at most once).
        settings: subset, batch size, seed and device shared by the measures.
        results: an HDF5 results file to write ``/runs/<run_id>/...`` into (created if absent)
            and to resume from.
        data_dir: where a folder data set lives now, if it moved since training.
        provenance: attributes recorded with the run (e.g. ``{"command_line": ...}``).
        progress: show a progress bar on stderr.

    Raises:
        FlatlabError: a checkpoint that cannot be read, data that are not there, settings the
            model cannot take (e.g. ``top_k`` above the number of parameters).
    """
    from flatlab.checkpoint import Checkpoint, load_checkpoint
    from flatlab.results import check_results_target, run_attrs_from_checkpoint, run_id_for

    settings = settings or MeasurementSettings()
    if results is not None:
        check_results_target(results)  # before any work: a path that cannot take results fails now
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint_path(checkpoint))
    device = resolve_device(settings.device)
    ctx = CheckpointContext(ckpt, settings, device, data_dir)
    run_id = run_id_for(ckpt.path) if ckpt.path is not None else None
    # Kept on the Measurement too, so that flatlab.store.write_result can file it later.
    run_attrs = {**run_attrs_from_checkpoint(ckpt), **dict(provenance or {})}
    if results is not None and run_id is None:
        raise FlatlabError("a checkpoint held in memory has no run id: save it to a file to write results")
    return _run(ctx, measures, results, run_id, run_attrs, progress)


def measure_model(model: nn.Module, data: Mapping[str, Sequence[Any]], measures: Sequence[MeasureConfig], *,
                  initial_model: nn.Module | None = None, train_size: int | None = None,
                  loss_fn: Callable[..., torch.Tensor] | None = None, settings: MeasurementSettings | None = None,
                  results: str | os.PathLike[str] | None = None, run_id: str | None = None,
                  provenance: Mapping[str, Any] | None = None, progress: bool = False,
                  domains: Mapping[str, Sequence[Any]] | None = None,
                  target_domains: Sequence[str] | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> Measurement:
    """Measure any model on named lists of ``(x, y)`` batches (``{"source": ..., "target": ...}``).

    The batches may be lists or DataLoaders (read once, moved to the model's device);
    ``output_fn`` maps the model's output (a dict, a tuple) to the tensor ``loss_fn`` takes, e.g.
    ``output_fn=lambda out: out["logits"]``; ``loss_fn`` (default cross-entropy) may be any
    mean-reduction loss, a regression loss too. On a model without accuracy (outputs other than
    ``(B, C)`` logits with integer targets) the accuracy-based bounds (pacbayes, magnitude,
    worst_case) are refused with a FlatlabError before anything is computed; the loss-based
    measures work. The models are measured in eval mode on their own device; every module's
    train/eval mode is restored on return.

    ``initial_model`` (w0) enables the PAC-Bayes "init" bounds; ``train_size`` is m (default:
    the number of samples in ``data["source"]``). Per-domain measures use ``domains`` (name ->
    batches; default: the named splits of ``data``) with ``target_domains`` naming the targets
    (default ``"target"`` if present). With ``results``, ``run_id`` names the run (letters,
    digits, - and _) and ``provenance`` its attributes.
    """
    if results is not None:
        from flatlab.results import check_group_name, check_results_target

        if not run_id:
            raise FlatlabError("results needs a run_id naming the run, e.g. run_id='my-resnet'")
        check_group_name(run_id, "run_id")
        check_results_target(results)
    from flatlab.outputs import preserved_modes

    ctx = ModelContext(model, data, settings=settings, initial_model=initial_model, train_size=train_size,
                       loss_fn=loss_fn, domains=domains, target_domains=target_domains, output_fn=output_fn)
    with preserved_modes(model, initial_model):  # the context measures them in eval mode
        return _run(ctx, measures, results, run_id, dict(provenance or {}), progress)


def measure_source(source: Any, measures: Sequence[MeasureConfig], *, settings: MeasurementSettings | None = None,
                   results: str | os.PathLike[str] | None = None, provenance: Mapping[str, Any] | None = None,
                   progress: bool = False) -> Measurement:
    """Measure a model flatlab did not train, loaded by :func:`flatlab.sources.load_source`.

    On a registered data set the splits, subsets and per-domain batches are a checkpoint's
    (:class:`~flatlab.measures.context.SplitsContext`); on a ``data_fn``'s splits they are
    :func:`measure_model`'s (with ``max_samples`` taking a seeded subset). With ``results``, the
    run is ``/runs/<source.run_id>`` and its attributes are the source's provenance (model,
    weights and their SHA-256, data) plus ``provenance``.

    Args:
        source: a :class:`~flatlab.sources.LoadedSource`.
        measures, settings, results, provenance, progress: as for :func:`measure_checkpoint`.

    Raises:
        FlatlabError: as :func:`measure_checkpoint`.
    """
    settings = settings or MeasurementSettings()
    if results is not None:
        from flatlab.results import check_results_target

        check_results_target(results)
    ctx = source.context(settings, resolve_device(settings.device))
    run_attrs = {**source.run_attrs, **dict(provenance or {})}
    return _run(ctx, measures, results, source.run_id, run_attrs, progress)


__all__ = ["Measurement", "measure_checkpoint", "measure_model", "measure_source", "measurement_of",
           "merge_group"]
