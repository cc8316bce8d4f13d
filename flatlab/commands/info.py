"""``flatlab info``: data set, domains, model, algorithm, bits, size of a checkpoint.

Describe a checkpoint without evaluating it.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoint", help="model.pt (or a run folder)")
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.inspect import checkpoint_info

    info = checkpoint_info(args.checkpoint)
    rows = [[k, v] for k, v in info.items() if not isinstance(v, (dict, list)) or k in ("test_envs", "domains", "test_env_names")]
    text = common.table(rows)
    if info.get("layers"):  # quantized: distinct weight values per channel, per layer
        text += "\n\n" + common.table([[r["layer"], r["bits"], r["shape"], r["max_distinct_per_channel"], r["limit"]]
                               for r in info["layers"]],
                              ["quantized layer", "bits", "shape", "max distinct/channel", "limit 2^b"])
    common.emit(args, info, text)
    return 0
