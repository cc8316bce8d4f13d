"""``flatlab evaluate``: accuracy and loss on every domain (id_acc, ood_acc).

Evaluate a checkpoint on the in and out split of every domain.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="model.pt (or a run folder); or your own model with --arch/--model-fn below")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="your own model without --weights: seeds its initialisation")
    common.add_data_dir_option(p)
    common.add_model_source_options(p)
    common.add_device_option(p)
    common.add_output_options(p)
    p.set_defaults(func=run)


def evaluation_table(meta: dict, metrics: dict) -> str:
    rows = []
    for i, name in enumerate(meta["domains"]):
        role = "target" if i in meta["test_envs"] else "source"
        rows.append([i, name, role, metrics[f"env{i}_in_acc"], metrics[f"env{i}_out_acc"],
                     metrics[f"env{i}_in_loss"], metrics[f"env{i}_out_loss"]])
    text = common.table(rows, ["env", "domain", "role", "in_acc", "out_acc", "in_loss", "out_loss"])
    text += (f"\nid_acc (source-out) {metrics['id_acc']:.4f}   ood_acc (target) {metrics['ood_acc']:.4f}"
             f"   source_acc (train) {metrics['source_acc']:.4f}")
    return text


def run(args: argparse.Namespace) -> int:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.evaluate import evaluate_models
    from flatlab.train import resolve_device

    model_source, data_source = common.model_source_from_args(args, args.checkpoint)
    device = resolve_device(args.device)
    if model_source is not None:
        from flatlab.sources import evaluate_source, load_source

        loaded = load_source(model_source, data_source, seed=args.seed, run_id=args.run_id, loss_fn=args.loss_fn)
        metrics = evaluate_source(loaded, args.batch_size, device)
        payload = {"model": model_source.name, "weights": model_source.weights, "run_id": loaded.run_id, **metrics}
        if loaded.splits is not None:
            meta = {"domains": loaded.splits.dataset.domains, "test_envs": loaded.splits.test_envs}
            text = evaluation_table(meta, metrics)
        else:
            rows = [[name, metrics[f"{name}_acc"], metrics[f"{name}_loss"]] for name in loaded.split_names]
            text = common.table(rows, ["split", "acc", "loss"])
        common.emit(args, payload, text)
        return 0
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model(device)
    metrics = evaluate_models(model, ckpt.splits(args.data_dir), args.batch_size, device)
    payload = {"checkpoint": str(ckpt.path), "dataset": ckpt.meta["dataset"], "test_envs": ckpt.meta["test_envs"],
               **metrics}
    common.emit(args, payload, evaluation_table(ckpt.meta, metrics))
    return 0
