"""``flatlab sweep``: run a study (TOML): every algorithm x bits x seed x test domain, trained and
measured.

Expand the study into jobs (algorithm variant x seed x test domain, plus ensembles), train and
measure each in OUT/runs and OUT/jobs, and merge everything into OUT/results.h5 for `flatlab report`
and `flatlab figures`. Jobs already done are skipped; rerun the same command after a crash to
continue. A failed job does not stop the others (exit status 1 at the end, with a summary).
"""

from __future__ import annotations

import argparse
import sys

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("study", help="study file (TOML), e.g. analysis/qgen.toml")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep folder (default: sweep-<study name>)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local processes (default) or a Ray cluster")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="Ray cluster to join (with --backend ray; checked first); default: a local Ray instance")
    p.add_argument("--workers", type=int, default=1,
                   help="jobs run at the same time (local processes or Ray actors; default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and an estimated running time; run nothing")
    common.add_output_options(p)
    p.set_defaults(func=run)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flatlab.errors import FlatlabError
    from flatlab.sweep import estimate_seconds, expand_jobs, job_status, load_study, run_sweep

    if args.workers < 1:
        raise FlatlabError(f"--workers must be at least 1, got {args.workers}")
    if args.address is not None and args.backend != "ray":
        raise FlatlabError("--address names a Ray cluster: add --backend ray")
    study = load_study(args.study)
    out = Path(args.out) if args.out else Path(f"sweep-{study.name}")
    jobs = expand_jobs(study)
    if args.dry_run:
        estimate = estimate_seconds(study, jobs, args.workers)
        rows, listed = [], []
        for job in jobs:
            status = job_status(out, job)
            seconds = estimate["per_job"][job.job_id]
            rows.append([job.job_id, job.kind, job.variant, "+".join(study.domains[e] for e in job.test_envs),
                         "-" if job.seed is None else job.seed, status, _duration(seconds),
                         ", ".join(job.steps) or "-"])
            listed.append({"job_id": job.job_id, "kind": job.kind, "variant": job.variant, "test_envs": job.test_envs,
                           "seed": job.seed, "status": status, "estimated_seconds": round(seconds, 1),
                           "steps": job.steps, "members": job.members})
        total = estimate["total_seconds"]
        payload = {"study": study.name, "out": str(out), "jobs": listed, "num_jobs": len(jobs),
                   "workers": args.workers, "estimated_seconds": round(total, 1), "estimate_device": estimate["device"],
                   "estimate_note": estimate["note"], "notes": study.notes}
        text = common.table(rows, ["job", "kind", "variant", "test domains", "seed", "status", "estimate", "measurements"])
        text += (f"\n\n{len(jobs)} jobs ({sum(1 for r in listed if r['status'] == 'done')} done); estimated "
                 f"{_duration(total)} with {args.workers} worker(s) on {estimate['device']} "
                 f"({estimate['note']})")
        for note in study.notes:
            text += f"\nnote: {note}"
        common.emit(args, payload, text)
        return 0
    summary = run_sweep(study, out, backend=args.backend, workers=args.workers, address=args.address,
                        quiet=args.quiet)
    payload = summary.as_dict()
    counts = payload["counts"]
    lines = [f"sweep {study.name}: {len(summary.outcomes)} jobs in {out} ("
             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"), {common.fmt(summary.seconds)} s this run",
             f"results: {summary.results}" if summary.results else "results: none yet (no job finished)"]
    for o in summary.failed:
        lines.append(f"{o.status}: {o.job_id}: {o.error} (details in {out / 'jobs' / o.job_id / 'error.txt'})"
                     if o.status == "failed" else f"{o.status}: {o.job_id}: {o.error}")
    if args.json or not args.quiet:
        common.emit(args, payload, "\n".join(lines))
    elif summary.failed:
        sys.stderr.write("\n".join(lines) + "\n")
    return 1 if summary.failed else 0
