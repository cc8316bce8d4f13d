"""Shared, session-scoped fixtures: trained runs that many test files reuse.

Training happens once per test session; tests read the run folders and never modify them
(copy a run into ``tmp_path`` first when a test needs to write).

Areas add their fixtures at the end of this file (append; do not rewrite the others).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores: keep every test process on a predictable, small thread count.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits():
    """The built-in RotatedDigits data set at the default 16x16 resolution."""
    from flatlab.data import RotatedDigits

    return RotatedDigits()


def _train(out: Path, **kwargs) -> Path:
    from flatlab.train import TrainConfig, train

    train(TrainConfig(out=str(out), quiet=True, **kwargs))
    return out


@pytest.fixture(scope="session")
def erm_run(tmp_path_factory) -> Path:
    """A CNN (width 8, with BatchNorm) trained with ERM for 400 steps at lr 3e-3, test domain 0."""
    out = tmp_path_factory.mktemp("runs") / "erm-cnn"
    return _train(out, steps=400, eval_every=100, model="cnn", model_options={"width": 8}, seed=0,
                  hparam_flags={"lr": 3e-3})


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory) -> Path:
    """A tiny MLP (8x8 inputs, width 8, depth 1: 602 parameters) for dense-Hessian checks."""
    out = tmp_path_factory.mktemp("runs") / "erm-mlp"
    return _train(out, steps=200, eval_every=100, model="mlp", model_options={"width": 8, "depth": 1},
                  dataset_options={"resolution": 8}, seed=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With FLATLAB_FAIL_ON_SKIP=1 (CI), any skip whose reason is not "needs CUDA" fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FLATLAB_FAIL_ON_SKIP") == "1" and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "needs CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped for a reason other than 'needs CUDA': {reason}"


@pytest.fixture(scope="session")
def qat_run(tmp_path_factory) -> Path:
    """A CNN (width 8) trained with QAT at 4 bits: 400 steps, FP warm-up until step 200."""
    out = tmp_path_factory.mktemp("runs") / "qat-cnn"
    return _train(out, steps=400, eval_every=100, model="cnn", model_options={"width": 8}, seed=0,
                  algorithm="qat", hparam_flags={"bits": 4, "quant_start": 200})


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine it beats two (no
    spin-waiting threads). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
