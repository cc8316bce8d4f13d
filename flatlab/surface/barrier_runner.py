r"""Loss barriers between checkpoints as a library call: checkpoints in, a results group out.

:func:`run_barrier` measures the line between two flatlab checkpoints,

.. math::

    B = \max_{\alpha \in \text{grid}} L\big((1-\alpha) w_1 + \alpha w_2\big)
        - \big[(1-\alpha) L(w_1) + \alpha L(w_2)\big]

on the first checkpoint's splits (:func:`flatlab.surface.barrier.loss_barrier`: the loss and
error barriers with their paired standard errors, BatchNorm statistics interpolated or
re-estimated), and :func:`run_member_barriers` the matrix over every pair of an ensemble's
members (:func:`flatlab.surface.barrier.pairwise_barriers`). Both models enter with their
effective (de-quantized, deployed) weights, so an FP model and a quantized one of the same
architecture share a line.

With ``results`` the outcome is written to ``/runs/<run_id>/barriers/<name>`` of that results
file (atomically, :func:`flatlab.results.write_group`; the layout is in
:mod:`flatlab.measures.barriers`): the run of the first checkpoint for a line, the ensemble's
run (:func:`flatlab.ensemble.ensemble_id` of the members) for a matrix. The group records both
models (paths, SHA-256, run ids, labels), every setting and a ``settings_fingerprint`` over the
settings and the checkpoints' SHA-256: a rerun with the same fingerprint reads the stored group
back instead of recomputing (``reused``); other settings replace it.

Refused with one error (before anything is computed or written): two checkpoints of different
architectures, data sets or test domains, the same checkpoint twice, a bad setting.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.io import settings_fingerprint, sha256_file
from flatlab.measures.barriers import BARRIER_SPLITS, GROUP
from flatlab.surface.barrier import BN_MODES, DEFAULT_NUM_POINTS, BarrierConfig

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
#: Checkpoint metadata two models must share for one line to be measured on one data split.
_SAME_DATA = (("dataset", "data sets"), ("dataset_options", "data-set options"), ("domains", "domain lists"),
              ("test_envs", "test domains"), ("num_classes", "numbers of classes"))


@dataclass(kw_only=True)
class BarrierSettings:
    """What every barrier measurement takes (``flatlab barrier``'s flags, a study's ``[[barriers]]``).

    Attributes:
        bn: ``interpolate`` (BatchNorm statistics move on the line) or ``reestimate`` (reset and
            re-estimated on the source split's batches at every point).
        points: evenly spaced grid points on [0, 1], both ends included.
        splits: the splits measured (``source``, ``source-out``, ``target``).
        max_samples: a seeded random subset of this many samples per split (default: all).
        batch_size: samples per forward pass.
        seed: seeds the subsets.
        bn_batches: re-estimation batches (the first ones; default all).
        device: where the models are evaluated (``cpu``, ``cuda``, ``cuda:N``, ``auto``).
        results: a results file to write ``/runs/<id>/barriers/<name>`` into, and to reuse from.
        name: the barrier's name in ``results``.
        data_dir: where a folder data set lives now, if it moved.
    """

    bn: str = "interpolate"
    points: int = DEFAULT_NUM_POINTS
    splits: tuple[str, ...] = ("source", "target")
    max_samples: int | None = None
    batch_size: int = 512
    seed: int = 0
    bn_batches: int | None = None
    device: str = "cpu"
    results: str | None = None
    name: str | None = None
    data_dir: str | None = None

    def config(self) -> BarrierConfig:
        """The library config (validated), on the CPU; the runner moves it to ``device``."""
        return BarrierConfig(num_points=self.points, bn=self.bn, bn_num_batches=self.bn_batches)

    def fingerprint_settings(self) -> dict[str, Any]:
        """What the numbers depend on (the checkpoints are added by the runner)."""
        return {"bn": self.bn, "points": self.points, "splits": list(self.splits), "max_samples": self.max_samples,
                "batch_size": self.batch_size, "seed": self.seed, "bn_batches": self.bn_batches,
                "device": str(self.device).split(":")[0]}


@dataclass(kw_only=True)
class BarrierRequest(BarrierSettings):
    """The line between ``checkpoint1`` (alpha = 0) and ``checkpoint2`` (alpha = 1)."""

    checkpoint1: str
    checkpoint2: str


@dataclass(kw_only=True)
class MemberBarrierRequest(BarrierSettings):
    """Every pair of ``members`` (e.g. an EoQ ensemble); stored under ``run_id`` (default: the
    ensemble id of the members)."""

    members: Sequence[str] = ()
    run_id: str | None = None


@dataclass
class BarrierOutcome:
    """What a barrier run produced.

    Attributes:
        summary: JSON view (``flatlab barrier --json``): barriers with stderr and alpha per split,
            the models, every setting.
        node: the stored group as arrays and ``attrs`` (what :mod:`flatlab.measures.barriers`
            reads).
        run_id, path, group: where it was written (None without ``results``).
        reused: read back from ``results`` (same fingerprint) instead of computed.
        notes: anything to know about the numbers.
    """

    summary: dict[str, Any]
    node: dict[str, Any]
    run_id: str | None = None
    path: Path | None = None
    group: str | None = None
    reused: bool = False
    notes: list[str] = field(default_factory=list)


def validate_settings(s: BarrierSettings) -> BarrierConfig:
    """Check every setting without touching a file; return the library config.

    Raises:
        FlatlabError: naming the setting in the caller's words.
    """
    if s.bn not in BN_MODES:
        raise FlatlabError(f"bn must be one of {', '.join(BN_MODES)}, got {s.bn!r}")
    for key, low in (("points", 2), ("batch_size", 1), ("max_samples", 1), ("bn_batches", 1)):
        value = getattr(s, key)
        if value is None and key in ("max_samples", "bn_batches"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FlatlabError(f"{key} must be an integer of at least {low}, got {value!r}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int):
        raise FlatlabError(f"seed must be an integer, got {s.seed!r}")
    splits = tuple(s.splits)
    if not splits or any(sp not in BARRIER_SPLITS for sp in splits) or len(set(splits)) != len(splits):
        raise FlatlabError(f"splits must be distinct names among {', '.join(BARRIER_SPLITS)}, got {list(splits)}")
    s.splits = splits
    if s.name is not None and (not s.name or set(s.name) - _NAME_CHARS):
        raise FlatlabError(f"name must be made of letters, digits, - and _, got {s.name!r}")
    if not isinstance(s.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|auto", s.device):
        raise FlatlabError(f"device must be cpu, cuda, cuda:N or auto, got {s.device!r}")
    return s.config()


def model_label(ckpt: Any) -> str:
    """``<algorithm> <fp|Nb> s<seed>`` of a checkpoint (what the report calls the run)."""
    meta = ckpt.meta
    bits = meta.get("bits")
    return f"{meta.get('algorithm', '?')} {'fp' if bits is None else f'{bits}b'} s{meta.get('seed', '?')}"


def check_pair(first: Any, second: Any, labels: tuple[str, str]) -> list[str]:
    """Refuse two checkpoints that cannot share a line on one data split; return notes.

    Raises:
        FlatlabError: different architectures, data sets or test domains; the same file twice.
    """
    a, b = labels
    if first.path is not None and second.path is not None and sha256_file(first.path) == sha256_file(second.path):
        raise FlatlabError(f"{a} and {b} are the same checkpoint ({first.path}): a barrier needs two models")
    m1, m2 = first.meta, second.meta
    arch1 = (m1.get("model"), m1.get("model_options"), list(m1.get("input_shape") or []))
    arch2 = (m2.get("model"), m2.get("model_options"), list(m2.get("input_shape") or []))
    if arch1 != arch2:
        raise FlatlabError(f"{a} and {b} have different architectures ({a}: {arch1[0]} {arch1[1]} on inputs "
                           f"{arch1[2]}; {b}: {arch2[0]} {arch2[1]} on inputs {arch2[2]}): a barrier interpolates "
                           "two models of one architecture")
    for key, what in _SAME_DATA:
        if m1.get(key) != m2.get(key):
            raise FlatlabError(f"{a} and {b} mix {what} ({key} {m1.get(key)!r} vs {m2.get(key)!r}): the line is "
                               "measured on one data set's splits")
    notes = []
    if (m1.get("trial_seed"), m1.get("holdout_fraction")) != (m2.get("trial_seed"), m2.get("holdout_fraction")):
        notes.append(f"{a} and {b} use different in/out splits (trial_seed {m1.get('trial_seed')} vs "
                     f"{m2.get('trial_seed')}): the line is measured on {a}'s splits, part of which {b} trained on")
    return notes


def _existing_node(path: Path, run_id: str, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the stored barrier group, the run's attributes), None where absent."""
    from flatlab.results import is_results_file, read_results

    if not path.exists():
        return None, None
    if not is_results_file(path):
        raise FlatlabError(f"{path} exists and is not a flatlab results file: choose another results file")
    run = read_results(path)["runs"].get(run_id)
    if not isinstance(run, dict):
        return None, None
    node = run.get(GROUP, {}).get(name) if isinstance(run.get(GROUP), dict) else None
    return (node if isinstance(node, dict) else None), dict(run.get("attrs", {}))


def _split_batches(ckpt: Any, s: BarrierSettings, device: Any) -> tuple[dict[str, list[Any]], list[Any] | None]:
    splits = ckpt.splits(s.data_dir)
    data = {name: splits.split_batches(name, s.batch_size, s.max_samples, s.seed, device) for name in s.splits}
    bn_data = None
    if s.bn == "reestimate":
        bn_data = data["source"] if "source" in data else splits.split_batches("source", s.batch_size, s.max_samples,
                                                                                 s.seed, device)
    return data, bn_data


def _setting_attrs(s: BarrierSettings, fingerprint: str) -> dict[str, Any]:
    attrs = {k: v for k, v in s.fingerprint_settings().items() if v is not None}
    attrs["settings_fingerprint"] = fingerprint
    return attrs


def _model_attrs(prefix: str, ckpt: Any) -> dict[str, Any]:
    from flatlab.results import run_id_for

    return {f"{prefix}_checkpoint": str(Path(ckpt.path).resolve()), f"{prefix}_sha256": sha256_file(ckpt.path),
            f"{prefix}_run_id": run_id_for(ckpt.path), f"{prefix}_label": model_label(ckpt),
            f"{prefix}_algorithm": ckpt.meta.get("algorithm"), f"{prefix}_bits": ckpt.meta.get("bits"),
            f"{prefix}_seed": ckpt.meta.get("seed")}


def line_node(result: Any) -> dict[str, Any]:
    """Arrays and barrier attributes of a :class:`~flatlab.surface.barrier.BarrierResult`."""
    node: dict[str, Any] = {"alphas": np.asarray(result.alphas, dtype=np.float64)}
    attrs: dict[str, Any] = {"kind": "line", "splits": list(result.splits), "bn_layers": int(result.bn_layers),
                             "bn_batches_used": int(result.bn_batches)}
    for split, prof in result.splits.items():
        node[split] = {key: np.asarray(getattr(prof, key), dtype=np.float64)
                       for key in ("losses", "accuracies", "loss_gaps", "loss_gap_stderrs", "error_gaps",
                                   "error_gap_stderrs")}
        for quantity in ("loss", "error"):
            attrs[f"{quantity}_barrier_{split}"] = float(getattr(prof, f"{quantity}_barrier"))
            attrs[f"{quantity}_barrier_{split}_stderr"] = float(getattr(prof, f"{quantity}_barrier_stderr"))
            attrs[f"{quantity}_barrier_{split}_alpha"] = float(getattr(prof, f"{quantity}_barrier_alpha"))
        attrs[f"endpoint_losses_{split}"] = [float(v) for v in prof.endpoint_losses]
        attrs[f"endpoint_accuracies_{split}"] = [float(v) for v in prof.endpoint_accuracies]
        attrs[f"num_samples_{split}"] = int(prof.num_samples)
    node["attrs"] = attrs
    return node


def pairwise_node(result: Any) -> dict[str, Any]:
    """Arrays and attributes of a :class:`~flatlab.surface.barrier.PairwiseBarriers`."""
    pairs = sorted(result.pairs)
    first = result.pairs[pairs[0]]
    node: dict[str, Any] = {"labels": np.asarray(result.labels, dtype=object),
                            "pairs": np.asarray(pairs, dtype=np.int64).reshape(len(pairs), 2),
                            "alphas": np.asarray(first.alphas, dtype=np.float64)}
    attrs: dict[str, Any] = {"kind": "pairwise", "splits": list(result.loss_barriers), "pairs_count": len(pairs),
                             "bn_layers": int(first.bn_layers), "bn_batches_used": int(first.bn_batches)}
    for split in result.loss_barriers:
        node[split] = {
            "loss_barriers": np.asarray(result.loss_barriers[split]),
            "loss_barrier_stderrs": np.asarray(result.loss_barrier_stderrs[split]),
            "error_barriers": np.asarray(result.error_barriers[split]),
            "error_barrier_stderrs": np.asarray(result.error_barrier_stderrs[split]),
            "pair_losses": np.stack([result.pairs[p].splits[split].losses for p in pairs]),
            "pair_loss_barrier_alphas": np.asarray([result.pairs[p].splits[split].loss_barrier_alpha for p in pairs]),
        }
        for quantity in ("loss", "error"):
            values = np.asarray([getattr(result.pairs[p].splits[split], f"{quantity}_barrier") for p in pairs])
            errors = np.asarray([getattr(result.pairs[p].splits[split], f"{quantity}_barrier_stderr") for p in pairs])
            attrs[f"{quantity}_barrier_{split}"] = float(values.mean())
            attrs[f"{quantity}_barrier_{split}_stderr"] = float(errors.mean())  # an upper bound (module docs)
            attrs[f"{quantity}_barrier_{split}_max"] = float(values.max())
        attrs[f"num_samples_{split}"] = int(first.splits[split].num_samples)
    node["attrs"] = attrs
    return node


def summarize(node: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON view of a stored (or just computed) barrier group."""
    attrs = dict(node.get("attrs", {}))
    out: dict[str, Any] = {"kind": attrs.get("kind"), "alphas": np.asarray(node["alphas"]).tolist()}
    for split in attrs.get("splits", []):
        entry = {}
        for quantity in ("loss", "error"):
            for suffix in ("", "_stderr", "_alpha", "_max"):
                key = f"{quantity}_barrier_{split}{suffix}"
                if key in attrs:
                    entry[f"{quantity}_barrier{suffix}"] = attrs[key]
        if attrs.get("kind") == "line":
            sub = node.get(split, {})
            entry["losses"] = np.asarray(sub.get("losses", [])).tolist()
            entry["accuracies"] = np.asarray(sub.get("accuracies", [])).tolist()
            entry["endpoint_losses"] = attrs.get(f"endpoint_losses_{split}")
        else:
            sub = node.get(split, {})
            entry["loss_barriers"] = np.asarray(sub.get("loss_barriers", [])).tolist()
            entry["loss_barrier_stderrs"] = np.asarray(sub.get("loss_barrier_stderrs", [])).tolist()
        entry["num_samples"] = attrs.get(f"num_samples_{split}")
        out[split] = entry
    if attrs.get("kind") == "pairwise":
        out["labels"] = [str(v) for v in np.asarray(node.get("labels", []), dtype=object).ravel()]
    out["settings"] = {k: attrs[k] for k in ("bn", "points", "splits", "max_samples", "batch_size", "seed",
                                             "bn_batches", "device") if k in attrs}
    out["models"] = {k: v for k, v in attrs.items() if k.startswith(("model1_", "model2_")) or k == "members"}
    return out


def _resolve_device(name: str) -> Any:
    from flatlab.train import resolve_device

    return resolve_device(name)


def run_barrier(req: BarrierRequest, provenance: Mapping[str, Any] | None = None) -> BarrierOutcome:
    """The loss and error barriers on the line from ``req.checkpoint1`` to ``req.checkpoint2``.

    Args:
        req: the two checkpoints (model files or run folders) and the settings.
        provenance: attributes recorded with the run (e.g. ``{"command_line": ...}``).

    Raises:
        FlatlabError: a bad setting, an unreadable checkpoint, two checkpoints that cannot share
            a line (see :func:`check_pair`); nothing is written then.
    """
    from flatlab.checkpoint import load_checkpoint
    from flatlab.measures.context import checkpoint_path
    from flatlab.results import run_attrs_from_checkpoint, run_id_for, write_group
    from flatlab.surface.barrier import loss_barrier

    config = validate_settings(req)
    first = load_checkpoint(checkpoint_path(req.checkpoint1))
    second = load_checkpoint(checkpoint_path(req.checkpoint2))
    notes = check_pair(first, second, ("CKPT1", "CKPT2"))
    run_id, other = run_id_for(first.path), run_id_for(second.path)
    name = req.name or f"vs-{other[:8]}"
    stamp = settings_fingerprint({"kind": "line", "model1": sha256_file(first.path),
                                  "model2": sha256_file(second.path), **req.fingerprint_settings()})
    path = Path(req.results) if req.results else None
    group = f"{GROUP}/{name}" if path is not None else None
    if path is not None:
        stored, _ = _existing_node(path, run_id, name)
        if stored is not None and stored.get("attrs", {}).get("settings_fingerprint") == stamp:
            return BarrierOutcome(summarize(stored), stored, run_id, path, group, reused=True, notes=notes)
    device = _resolve_device(req.device)
    m1, m2 = first.build_model(device, effective=True), second.build_model(device, effective=True)
    data, bn_data = _split_batches(first, req, device)
    result = loss_barrier(m1, m2, data, config=dataclasses.replace(config, device=str(device)), bn_data=bn_data)
    node = line_node(result)
    node["attrs"].update({**_model_attrs("model1", first), **_model_attrs("model2", second),
                          **_setting_attrs(req, stamp), "name": name})
    if notes:
        node["attrs"]["notes"] = notes
    if path is not None:
        attrs = {k: v for k, v in node["attrs"].items() if v is not None}
        write_group(path, run_id, {**run_attrs_from_checkpoint(first), **dict(provenance or {})}, group,
                    {k: v for k, v in node.items() if k != "attrs"}, attrs)
    return BarrierOutcome(summarize(node), node, run_id if path is not None else None, path, group, notes=notes)


def ensemble_run_attrs(members: Sequence[Any]) -> dict[str, Any]:
    """Run attributes for an ensemble's run when the results file does not hold it yet: the
    first member's provenance with the ensemble's algorithm and members (as
    :func:`flatlab.ensemble.write_ensemble_results` writes them, without accuracies)."""
    from flatlab.results import run_attrs_from_checkpoint

    attrs = run_attrs_from_checkpoint(members[0])
    for key in ("checkpoint", "checkpoint_sha256", "seed", "step", "val_acc", "source_acc", "id_acc", "ood_acc",
                "per_domain_accuracies"):
        attrs.pop(key, None)
    attrs["algorithm"] = "eoq" if all(c.is_quantized for c in members) else "ensemble"
    attrs["members"] = [{"checkpoint": str(c.path), "sha256": sha256_file(c.path)} for c in members]
    bits = {c.meta.get("bits") for c in members}
    if len(bits) == 1 and None not in bits:
        attrs["bits"] = next(iter(bits))
    else:
        attrs.pop("bits", None)
    return attrs


def run_member_barriers(req: MemberBarrierRequest, provenance: Mapping[str, Any] | None = None,
                        run_attrs: Mapping[str, Any] | None = None) -> BarrierOutcome:
    """The barrier matrix over every pair of ``req.members`` (e.g. an EoQ ensemble's).

    Stored under ``req.run_id`` (default: the members' :func:`~flatlab.ensemble.ensemble_id`,
    the run ``flatlab ensemble --results`` writes); ``run_attrs`` are that run's attributes
    (default: the ones the results file already holds for it, else
    :func:`ensemble_run_attrs`).

    Raises:
        FlatlabError: fewer than two members, members that cannot form an ensemble (data, split),
            different architectures, a bad setting.
    """
    from flatlab.ensemble import ensemble_id, load_members
    from flatlab.results import write_group
    from flatlab.surface.barrier import pairwise_barriers

    config = validate_settings(req)
    if len(req.members) < 2:
        raise FlatlabError(f"pairwise barriers need at least two members, got {len(req.members)}")
    members = load_members(list(req.members))
    for i, other in enumerate(members[1:], start=2):
        check_pair(members[0], other, ("member 1", f"member {i}"))
    digests = [sha256_file(c.path) for c in members]
    run_id = req.run_id or ensemble_id(digests)
    name = req.name or "members"
    stamp = settings_fingerprint({"kind": "pairwise", "members": digests, **req.fingerprint_settings()})
    path = Path(req.results) if req.results else None
    group = f"{GROUP}/{name}" if path is not None else None
    existing_attrs = None
    if path is not None:
        stored, existing_attrs = _existing_node(path, run_id, name)
        if stored is not None and stored.get("attrs", {}).get("settings_fingerprint") == stamp:
            return BarrierOutcome(summarize(stored), stored, run_id, path, group, reused=True)
    device = _resolve_device(req.device)
    models = [c.build_model(device, effective=True) for c in members]
    data, bn_data = _split_batches(members[0], req, device)
    labels = [model_label(c) for c in members]
    result = pairwise_barriers(models, data, config=dataclasses.replace(config, device=str(device)),
                               bn_data=bn_data, labels=labels)
    node = pairwise_node(result)
    node["attrs"].update({**_setting_attrs(req, stamp), "name": name,
                          "members": [{"checkpoint": str(Path(c.path).resolve()), "sha256": d, "label": lab}
                                      for c, d, lab in zip(members, digests, labels)]})
    if path is not None:
        attrs = run_attrs if run_attrs is not None else (existing_attrs or ensemble_run_attrs(members))
        write_group(path, run_id, {**dict(attrs), **dict(provenance or {})}, group,
                    {k: v for k, v in node.items() if k != "attrs"}, node["attrs"])
    return BarrierOutcome(summarize(node), node, run_id if path is not None else None, path, group)


__all__ = ["BarrierOutcome", "BarrierRequest", "BarrierSettings", "MemberBarrierRequest", "check_pair",
           "ensemble_run_attrs", "line_node", "model_label", "pairwise_node", "run_barrier", "run_member_barriers",
           "summarize", "validate_settings"]
