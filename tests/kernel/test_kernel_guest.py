"""Real kernel buses: boot Debian's kernel under qemu and run tests/kernel/guest/ inside it.

The host's kernel has no CAN and no I2C; the guest has vcan0 and i2c-stub (see README.md).
One boot runs every guest test. A set-up that fails, a guest that does not boot or does not
finish in time, and any failing guest test all fail this test, with the guest's output.
"""

from __future__ import annotations

import json

from tests.kernel import harness


def test_guest_tests_pass_on_real_kernel_buses():
    with harness.exclusive():
        image = harness.set_up()
        harness.prepare_share()
        harness.warm_numba_cache()
        run = harness.boot(image, harness.guest_pytest_script([str(harness.GUEST_TESTS)]))
        logs = f"the guest's processes logged into {harness.SHARE / 'logs'}"
        metrics = harness.check_guest_run(run, harness.BOOT_TIMEOUT_S, logs)
    print(f"guest run {run.elapsed_s:.1f} s: " + json.dumps(metrics, sort_keys=True))
