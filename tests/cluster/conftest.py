from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_session():
    """One real local Ray per test module: Ray is heavy on a 2-core machine."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="v2gfleet",
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()
