"""Fixtures of the tests that run inside the qemu guest (real vcan0 and i2c-stub).

Importing this anywhere else is an error: these tests need the guest's kernel modules and its
read-write share, and on a host they would fail for the wrong reasons or touch real buses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def in_guest() -> bool:
    """True only in the guest that init.sh set up (its kernel command line names the share)."""
    if os.environ.get("PYBMS_KERNEL_GUEST") != "1":
        return False
    try:
        return "PYBMS_SHARE=" in Path("/proc/cmdline").read_text()
    except OSError:
        return False


if not in_guest():
    raise RuntimeError(
        "tests/kernel/guest/ runs only inside the qemu guest (vcan0, i2c-stub); "
        "run tests/kernel/test_kernel_guest.py, which boots the guest and runs them there"
    )

SHARE = Path(os.environ["PYBMS_SHARE"])
LOGS = SHARE / "logs"
"""The stderr of every process a guest test starts, kept for the host to show."""
LOGS.mkdir(exist_ok=True)
RESULTS = Path(os.environ["PYBMS_GUEST_RESULTS"])
"""This pytest run's directory in the share (harness.guest_pytest_script sets it)."""


@pytest.fixture(scope="session")
def metrics():
    """Figures the tests measure (frames/s, losses, transactions/s), written to the share as
    ``RESULTS / "metrics.json"`` for the host to report."""
    figures: dict[str, float] = {}
    yield figures
    (RESULTS / "metrics.json").write_text(json.dumps(figures, indent=2, sort_keys=True))
