"""Options and printing shared by the sub-commands.

Output contract: ``--json`` prints exactly one JSON object on stdout and nothing else there;
tables and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from flatlab.io import dumps_json
from flatlab.text import fmt, table  # noqa: F401  (the commands print with these)


def add_command(sub: argparse._SubParsersAction, doc: str | None) -> argparse.ArgumentParser:
    """A sub-command's parser, declared by its module docstring.

    The docstring's first paragraph is ````flatlab NAME``: one-line help.``; the paragraphs after
    it are the ``--help`` description (argparse rewraps them). One text serves the reader of the
    code and the user of the command, so the two cannot drift apart.
    """
    paragraphs = [" ".join(p.split()) for p in (doc or "").strip().split("\n\n")]
    m = re.fullmatch(r"``flatlab ([a-z-]+)``: (.+?)\.?", paragraphs[0])
    if m is None:
        raise ValueError(f"a command's docstring starts with ``flatlab NAME``: help, got {paragraphs[0]!r}")
    return sub.add_parser(m.group(1), help=m.group(2), description=" ".join(paragraphs[1:]) or m.group(2))


def add_results_inputs(parser: argparse.ArgumentParser, *, inputs: str, use: str, claims: str) -> None:
    """The inputs of the commands that read results (``report``, ``figures``): the RESULTS
    files and which of their measure columns, local-flatness radii and claims to take up.

    ``inputs`` says what RESULTS may be, ``use`` what the columns are for (``show``), ``claims``
    what a claims file adds.
    """
    parser.add_argument("results", nargs="+", metavar="RESULTS", help=inputs)
    parser.add_argument("--measures", default=None, metavar="LIST",
                        help=f"comma-separated measure columns to {use} (default: every measure present), e.g. "
                             "top_eigenvalue,trace,pacbayes_inv_sigma_sq,local_flatness_target@0.1rel")
    parser.add_argument("--radii", default=None, metavar="LIST",
                        help=f"local-flatness radii to {use}, as stored (relative or absolute); default: the "
                             "largest radius every measured run shares")
    parser.add_argument("--claims", action="append", default=[], metavar="FILE",
                        help=f"a claims file (TOML, docs/claims.md): {claims}; repeat for several files "
                             "(each file is its own Holm family)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (tables go to stderr)")
    parser.add_argument("--quiet", action="store_true", help="nothing for humans: no progress bars, no tables (errors still print)")


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N or auto (CUDA when available); default {default}")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination, with a note on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stderr.write(f"flatlab: note: {option_string} is deprecated here; use {self.new} "
                         f"(the old spelling is accepted until flatlab {DEPRECATED_UNTIL})\n")
        setattr(namespace, self.dest, values)


#: Old flag spellings are accepted until this release.
DEPRECATED_UNTIL = "0.3"


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a deprecated spelling of ``new`` (same destination), hidden from --help."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def command_line() -> str:
    """The flatlab command being run, as the user typed it (provenance of what it writes)."""
    from pathlib import Path

    return " ".join(["flatlab" if Path(sys.argv[0]).name in ("flatlab", "__main__.py", "cli.py") else
                     Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "flatlab"


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="root of a folder data set, if it moved since training (checked against the stored hash); "
                             "with --dataset: the data set's root")


def add_model_source_options(parser: argparse.ArgumentParser, loss: bool = True) -> None:
    """The flags that give a model flatlab did not train, and its data, instead of a checkpoint
    (:mod:`flatlab.sources`); read back by :func:`model_source_from_args`."""
    model = parser.add_argument_group(
        "your own model (instead of CKPT)",
        "a torchvision or flatlab architecture by name, or your function, with a state-dict file "
        "(torch.load(weights_only=True) only)")
    model.add_argument("--arch", default=None, metavar="NAME",
                       help="torchvision architecture (resnet18, vit_b_16, ...) or flatlab model (mlp, cnn, vit); "
                            "flatlab:NAME / torchvision:NAME where both know the name (default torchvision)")
    model.add_argument("--model-fn", default=None, metavar="MODULE:FUNCTION",
                       help="function returning an nn.Module: pkg.module:build or path/to/file.py:build")
    model.add_argument("--model-args", default=None, metavar="JSON",
                       help="keyword arguments of --arch or --model-fn, e.g. '{\"width\": 64}'")
    model.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help="classifier outputs (--arch: default the data set's classes; --model-fn: passed as num_classes)")
    model.add_argument("--weights", default=None, metavar="FILE",
                       help="state dict (or a dict with it under 'state_dict'/'model') loaded strictly into the model")
    model.add_argument("--run-id", default=None, metavar="NAME",
                       help="the run's name in --results (default: a hash of the model, weights, data and loss)")
    if loss:
        model.add_argument("--loss-fn", default=None, metavar="MODULE:FUNCTION",
                           help="mean-reduction loss(outputs, y) (default cross-entropy)")
    data = parser.add_argument_group(
        "data of your own model", "a built-in or DomainBed data set split as flatlab train splits it, or your function")
    data.add_argument("--dataset", default=None, metavar="NAME",
                      help="rotated-digits, PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, folder (with --data-dir)")
    data.add_argument("--test-env", nargs="+", default=None, metavar="DOMAIN", dest="test_envs",
                      help="with --dataset: test domain(s), by index or name")
    data.add_argument("--resolution", type=int, default=None, help="with --dataset: image side (rotated-digits: 16)")
    data.add_argument("--trial-seed", type=int, default=None,
                      help="with --dataset: seed of the in/out split, as given to flatlab train (default 0)")
    data.add_argument("--holdout-fraction", type=float, default=None,
                      help="with --dataset: share of each domain held out as source-out (default 0.2)")
    data.add_argument("--data-fn", default=None, metavar="MODULE:FUNCTION",
                      help="function returning named splits {'source': ..., 'target': ...}, each a list of "
                           "(x, y) batches or a DataLoader")
    data.add_argument("--data-args", default=None, metavar="JSON", help="keyword arguments of --data-fn")


#: Flags of :func:`add_model_source_options` that only a user's model takes (destination -> flag).
_USER_ONLY = {"run_id": "--run-id", "loss_fn": "--loss-fn"}


def model_source_from_args(args: argparse.Namespace, checkpoint: str | None) -> tuple[Any, Any]:
    """(ModelSource, DataSource) from the flags, or (None, None) for a checkpoint.

    Raises:
        FlatlabError: a checkpoint together with a model, neither of them, a model without data,
            data flags for a checkpoint, bad JSON.
    """
    from flatlab.sources import DataSource, ModelSource, check_model_choice

    model_given = any(getattr(args, k, None) is not None for k in ("arch", "model_fn", "model_args", "num_classes",
                                                                   "weights"))
    data_given = any(getattr(args, k, None) is not None for k in ("dataset", "data_fn", "data_args", "test_envs",
                                                                  "resolution", "trial_seed", "holdout_fraction"))
    model = data = None
    if model_given:
        model = ModelSource(arch=args.arch, model_fn=args.model_fn,
                            model_args=parse_json_arg(args.model_args, "--model-args") if args.model_args else {},
                            num_classes=args.num_classes, weights=args.weights)
    if data_given:
        options = {"resolution": args.resolution} if args.resolution is not None else {}
        data = DataSource(dataset=args.dataset, test_envs=tuple(args.test_envs or ()), data_dir=args.data_dir,
                          dataset_options=options, trial_seed=0 if args.trial_seed is None else args.trial_seed,
                          holdout_fraction=0.2 if args.holdout_fraction is None else args.holdout_fraction,
                          data_fn=args.data_fn,
                          data_args=parse_json_arg(args.data_args, "--data-args") if args.data_args else {})
    user_only = [k for k in _USER_ONLY if getattr(args, k, None) is not None]
    check_model_choice(checkpoint, model, data, user_only)
    return model, data


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as JSON on stdout (``--json``), or ``text`` (a table) for humans.

    One meaning of ``--quiet`` in every command: nothing for humans (no table, no progress).
    Without ``--json`` the text goes to stdout so it can be piped; with ``--json`` the text
    goes to stderr.
    """
    quiet = getattr(args, "quiet", False)
    if getattr(args, "json", False):
        sys.stdout.write(dumps_json(payload) + "\n")
        if not quiet:
            sys.stderr.write(text.rstrip() + "\n")
    elif not quiet:
        sys.stdout.write(text.rstrip() + "\n")
    sys.stdout.flush()


def parse_json_arg(text: str, flag: str) -> dict[str, Any]:
    """A flag's JSON object (``--hparams``, ``--model-args``), or one error line naming the flag."""
    from flatlab.errors import FlatlabError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlatlabError(f"{flag} is not valid JSON ({exc.msg} at character {exc.pos}): e.g. '{{\"lr\": 0.001}}'") from None
    if not isinstance(value, dict):
        raise FlatlabError(f"{flag} must be a JSON object, e.g. '{{\"lr\": 0.001}}'")
    return value
