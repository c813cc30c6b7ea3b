"""The reliability suite's markers and fixtures (helpers: ``dmb_reliability.py``)."""

from __future__ import annotations

import pytest
from dmb_reliability import broker_proc, log_dir, workers  # noqa: F401 - fixtures


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: a long reliability run; only with DMB_SOAK=1 (make soak)")
    config.addinivalue_line("markers", "slow: a test that takes more than about 10 seconds")
