"""Real kernel buses: boot Debian's kernel under qemu and run tests/kernel/guest/ inside it.

The host's kernel has no CAN and no I2C; the guest has vcan0 and i2c-stub (see README.md).
One boot runs every guest test. A set-up that fails, a guest that does not boot or does not
finish in time, and any failing guest test all fail this test, with the guest's output.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from tests.kernel import harness


def test_guest_tests_pass_on_real_kernel_buses():
    with harness.exclusive():
        image = harness.set_up()
        harness.prepare_share()
        harness.warm_numba_cache()
        run = harness.boot(image, harness.guest_pytest_script([str(harness.GUEST_TESTS)]))
        log_path = harness.SHARE / "pytest.log"
        guest_log = log_path.read_text() if log_path.exists() else "(no pytest log from the guest)"
        metrics_path = harness.SHARE / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        junit_path = harness.SHARE / "junit.xml"
        suite = ET.parse(junit_path).getroot().find("testsuite") if junit_path.exists() else None
    where = (
        f"guest console:\n{run.console_tail()}\n\nguest pytest:\n{guest_log[-12000:]}\n"
        f"(the guest's processes logged into {harness.SHARE / 'logs'})"
    )
    limit_s = harness.BOOT_TIMEOUT_S
    timed_out, exit_code = run.timed_out, run.exit_code
    assert not timed_out, f"the guest did not power off within {limit_s:.0f} s\n{where}"
    assert exit_code is not None, f"the guest never finished its tests\n{where}"
    assert exit_code == 0, f"guest tests failed (pytest exit code {exit_code})\n{where}"
    assert suite is not None and int(suite.get("tests")) > 0, f"the guest ran no test\n{where}"
    print(f"guest run {run.elapsed_s:.1f} s: " + json.dumps(metrics, sort_keys=True))
