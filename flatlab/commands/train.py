"""``flatlab train``: train a model (ERM, QAT, ...) leave-one-domain-out.

Train on the source domains; select by training-domain validation; write OUT/model.pt,
OUT/results.jsonl and OUT/done. Rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flatlab.commands import common

#: (flag, hparam key, type, help) for hyperparameters settable by a flag of their own.
HPARAM_FLAGS: list[tuple[str, str, type, str]] = [
    ("--lr", "lr", float, "learning rate (Adam)"),
    ("--batch-size", "batch_size", int, "batch size per source domain"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--bits", "bits", int, "qat: weight bit-width, 2..8 (default 8)"),
    ("--quant-start", "quant_start", int, "qat: step at which quantization starts (default 40%% of --steps)"),
    ("--act-bits", "act_bits", int, "qat: also quantize layer inputs at this bit-width (default: weights only)"),
    ("--grad-scale-n", "grad_scale_n", str, "qat: N of the LSQ scale-gradient factor, channel (default) or tensor"),
    ("--per-channel", "per_channel", str, "qat: true (default) for one scale per output channel, false for one per tensor"),
    ("--keep-first-fp", "keep_first_fp", str, "qat: true to keep the first conv/linear layer in full precision"),
    ("--quantize-classifier", "quantize_classifier", str, "qat: true to quantize the final classifier too"),
    ("--rho", "rho", float, "sam/sagm/gaqat: perturbation radius (default 0.05)"),
    ("--alpha", "alpha", float, "sagm/gaqat: SAGM's alpha (default 0.001)"),
    ("--freeze-interval", "freeze_interval", int, "gaqat: K, steps between freeze decisions and freeze length (default 50)"),
    ("--disorder-window", "disorder_window", int, "gaqat: n, steps over which disorder is measured (default 10, <= K)"),
    ("--tau", "tau", float, "gaqat: freeze a layer whose disorder is below tau, in [0, 1] (default 0.3)"),
    ("--freeze-part", "freeze_part", str, "gaqat: scale-gradient part frozen, task (default) or smooth"),
    ("--disorder-watch", "disorder_watch", str, "gaqat: gradient whose sign flips define disorder: applied (default), task, smooth"),
    ("--noise-amplitude", "noise_amplitude", float, "noise: U(-a, a) instead of the LSQ step of --bits"),
    ("--swa-start", "swa_start", int, "swa: first averaged step (default: half the steps, or the QAT switch)"),
    ("--bn-update-steps", "bn_update_steps", int, "swa/swad: minibatches to re-estimate BatchNorm statistics (default 50)"),
]

#: (flag, model option, type, help).
MODEL_FLAGS: list[tuple[str, str, type, str]] = [
    ("--width", "width", int, "model width (hidden units for mlp, first-block channels for cnn, hidden size for vit)"),
    ("--depth", "depth", int, "hidden layers (mlp), encoder blocks (vit)"),
    ("--heads", "heads", int, "vit: attention heads (default 4)"),  # ViT options (docs/readme_vit.md)
    ("--patch", "patch", int, "vit: patch side in pixels (default 4)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("--dataset", default="rotated-digits", help="data set name (default rotated-digits)")
    p.add_argument("--data-dir", default=None, help="root folder of a DomainBed-layout data set")
    p.add_argument("--test-env", nargs="+", default=["0"], metavar="DOMAIN", dest="test_envs",
                   help="test domain(s), by index or name (default 0)")
    p.add_argument("--algorithm", default="erm", help="training algorithm (default erm)")
    p.add_argument("--model", default=None, help="model name (default: the data set's, cnn for rotated-digits)")
    for flag, _key, typ, text in MODEL_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--resolution", type=int, default=None, help="image side (rotated-digits: 16; image folders: 224)")
    p.add_argument("--train-bn", action="store_true",
                   help="ResNets: train BatchNorm statistics (default: frozen, as DomainBed/SWAD)")
    p.add_argument("--cache-mb", type=int, default=None, help="image folders: memory budget for decoded images (MB)")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="image folders: threads that decode and augment images")
    common.add_deprecated_alias(p, "--workers", "--decode-threads", "decode_threads", type=int)
    p.add_argument("--pretrained", default=None, metavar="PATH", help="initial weights from a local file")
    p.add_argument("--steps", type=int, default=None, help="training steps (rotated-digits: 1500)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate and save state every N steps (default steps/10, at most 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, sampling and noise; also the default --trial-seed")
    p.add_argument("--trial-seed", type=int, default=None, help="seed of the in/out split (DomainBed trial_seed)")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="share of each domain held out (default 0.2)")
    for flag, _key, typ, text in HPARAM_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--hparams", default=None, metavar="JSON", help="hyperparameters as a JSON object (flags win)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--fresh", action="store_true", help="discard what OUT holds and start over")
    common.add_device_option(p)
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.train import TrainConfig, train

    hparam_flags: dict[str, Any] = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _t, _h in HPARAM_FLAGS}
    model_opts = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _t, _h in MODEL_FLAGS}
    if args.train_bn:
        model_opts["freeze_bn"] = False
    dataset_opts = {k: v for k, v in (("resolution", args.resolution), ("cache_mb", args.cache_mb),
                                      ("workers", args.decode_threads)) if v is not None}
    config = TrainConfig(
        dataset=args.dataset, test_envs=list(args.test_envs), algorithm=args.algorithm, model=args.model,
        model_options={k: v for k, v in model_opts.items() if v is not None}, dataset_options=dataset_opts,
        data_dir=args.data_dir, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
        trial_seed=args.trial_seed, holdout_fraction=args.holdout_fraction,
        hparams_json=common.parse_json_arg(args.hparams, "--hparams") if args.hparams else None,
        hparam_flags=hparam_flags, out=args.out, device=args.device, fresh=args.fresh, quiet=args.quiet,
        pretrained=args.pretrained,
    )
    result = train(config)
    acc = result.selected
    status = "already done" if result.already_done else (
        f"resumed from step {result.resumed_from}" if result.resumed_from else "trained")
    rows = [["run", str(result.out)], ["status", status], ["selected step", result.step],
            ["id_acc (source-out)", acc.get("id_acc")], ["ood_acc (target)", acc.get("ood_acc")],
            ["source_acc (train)", acc.get("source_acc")], ["checkpoint", str(result.checkpoint)]]
    if result.at_chance:
        rows.append(["warning", "at chance level on the source domains"])
    payload = {"out": str(result.out), "checkpoint": str(result.checkpoint), "step": result.step,
               "status": status, **acc, "at_chance": result.at_chance, "warnings": list(result.warnings)}
    if not args.json and args.quiet:
        return 0
    common.emit(args, payload, common.table(rows))
    if not args.json:
        sys.stdout.flush()
    return 0
