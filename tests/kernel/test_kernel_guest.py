"""Real kernel buses: run tests/kernel/guest/ inside a qemu guest with Debian's kernel.

The host's kernel has no CAN and no I2C; the guest has vcan0 and i2c-stub (see README.md).
The tests' one boot (the ``guest_boot`` fixture, conftest.py) runs every guest test before the
systemd checks. A set-up that fails, a guest that does not boot or does not finish in time,
and any failing guest test all fail this test, with the guest's output.
"""

from __future__ import annotations

import json

from tests.kernel import harness, systemd_guest


def test_guest_tests_pass_on_real_kernel_buses(guest_boot):
    logs = f"the guest's processes logged into {harness.SHARE / 'logs'}"
    metrics = harness.check_guest_run(guest_boot, systemd_guest.BUS_RESULTS, logs)
    print(f"guest boot {guest_boot.elapsed_s:.1f} s: " + json.dumps(metrics, sort_keys=True))
