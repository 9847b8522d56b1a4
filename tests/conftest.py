import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist every worker would start one intra-op thread per core, so 2 workers on
    # 2 cores run 4 threads; the tiny matrices of most tests then spend their time in thread
    # hand-offs (1000 small Adam steps: ~0.7 s on one thread, 5-20 s oversubscribed).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def isolated_plans():
    """The test starts without dispatch plans or disk cache and leaves the process's plans and
    dispatch configuration as it found them."""
    from dataclasses import replace

    from orthotorch.linalg import dispatch

    saved_plans, saved_config = dict(dispatch._PLANS), replace(dispatch._CONFIG)
    dispatch.clear_plans()
    dispatch.configure(cache_path=False)
    yield
    dispatch.clear_plans()
    dispatch._PLANS.update(saved_plans)
    vars(dispatch._CONFIG).update(vars(saved_config))
