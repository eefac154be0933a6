"""Shared fixtures for the tests of training, evaluation, configs and checkpoints.

Tests marked ``slow`` (subprocess runs of train.py/eval.py that take more than a few seconds, DDP,
sweeps, the mutation check) are skipped unless a marker expression is given, so plain ``pytest``
stays fast. The slow tests that take many minutes each are also marked ``long``: the mutation check
(``scripts/mutation_check.py``), the GPU check's rehearsal, the kernels' compilation for GPUs.
``.ci/run`` runs the default suite (``pytest``) and then ``pytest -m "slow and not long"``;
``pytest -m slow`` (or ``.ci/run --all``) runs them all.

Shared code lives in the package ``tests/helpers`` (``from tests.helpers.runs import TINY_TRAIN, run_script``),
not here. Test data outside the repository: ``../shared`` beside the checkout (``DLSN_TEST_SHARED`` overrides
it, e.g. for a git worktree elsewhere); tests that need it skip with the path in the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import BENCHMARK_DIR, TINY_TRAIN, run_script  # noqa: F401


def pytest_collection_modifyitems(config, items):
    # markers, not keywords: a parameter id or a file name "long" is a keyword too
    unmarked = [item.nodeid for item in items if item.get_closest_marker("long") and not item.get_closest_marker("slow")]
    if unmarked:  # plain `pytest` would run them
        raise pytest.UsageError(f"tests marked long must be marked slow too: {', '.join(unmarked)}")
    if config.option.markexpr:
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with `pytest -m slow`")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_train_run(tmp_path_factory) -> Path:
    """One tiny training run (2 epochs), shared by the tests that read its checkpoints and logs."""
    run_dir = tmp_path_factory.mktemp("tiny_train") / "run"
    run_script("train.py", run_dir, *TINY_TRAIN, "trainer.max_epochs=2")
    return run_dir


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not (BENCHMARK_DIR / "Set5" / "HR").is_dir():
        pytest.skip(f"benchmark images not found at {BENCHMARK_DIR} (set DLSN_TEST_BENCHMARKS to <dir>/Set5/HR ...)")
    return BENCHMARK_DIR
