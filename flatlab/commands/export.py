"""``flatlab export``: pack a quantized checkpoint's weights into b-bit integers.

Write the integer weight codes of a QAT checkpoint packed at b bits, plus the scales and every other
tensor in full precision. The file loads with torch.load(weights_only=True), and `flatlab evaluate
FILE` gives exactly the checkpoint's logits.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoint", help="a quantized model.pt (or its run folder)")
    p.add_argument("--out", required=True, metavar="FILE", help="packed file to write (atomically)")
    p.add_argument("--with-init", action="store_true",
                   help="also store the initial FP weights w0 (needed by measures of distance from init)")
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.quant.export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out, with_init=args.with_init)
    rows = [["packed file", report["out"]], ["bits", report["bits"]],
            ["layers packed", report["layers_packed"]], ["file bytes", report["file_bytes"]],
            ["packed bytes (tensors)", report["packed_bytes"]], ["FP32 bytes", report["fp32_bytes"]],
            ["size ratio", report["size_ratio"]], ["expected ratio", report["expected_size_ratio"]],
            ["identical weights on reload", report["verified"]]]
    common.emit(args, report, common.table(rows))
    return 0
