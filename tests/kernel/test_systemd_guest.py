"""bms.service under systemd itself: in the qemu guest with the host's systemd as PID 1, check
the unit with systemctl and journalctl there (guest/systemd/systemd_checks.py).

The host's PID 1 is not systemd, so this is where the unit meets a real service manager: its
Type=notify start, WatchdogSec=, Restart=, ExecReload= and ExecStopPost= (see
systemd_guest.py and guest/systemd/). The checks run in the tests' one boot (the
``guest_boot`` fixture, conftest.py), after the guest tests. A set-up that fails, a guest that
does not boot or finish in time, and any failing check all fail this test, with the guest's
output.
"""

from __future__ import annotations

import json

from tests.kernel import harness, systemd_guest


def test_bms_service_under_systemd_as_pid_1(guest_boot):
    logs = (
        f"the whole journal: {systemd_guest.WORK / 'journal.txt'}; the unit's: "
        f"{harness.SHARE / 'logs' / 'bms-service-journal.txt'}"
    )
    metrics = harness.check_guest_run(guest_boot, systemd_guest.CHECK_RESULTS, logs, 80)
    print(f"guest boot {guest_boot.elapsed_s:.1f} s: " + json.dumps(metrics, sort_keys=True))
