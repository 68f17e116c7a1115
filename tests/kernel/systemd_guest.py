"""Host side of the systemd boot: the guest's PID 1 is the host's systemd, running bms.service.

The same kernel, initramfs and root as the other guest boot (harness.py), with
``PYBMS_GUEST_INIT=systemd`` on the kernel command line: init.sh runs
``guest/systemd/prepare.sh`` in the overlay root (the user, the config, the unit and its
drop-in, the test's units), then hands PID 1 to ``/lib/systemd/systemd``, which boots
``pybms-systemd-checks.target``. Its service runs ``guest/systemd/systemd_checks.py`` with
pytest, writes the exit code into the share and powers the guest off.

Written here into ``WORK`` (in the share) before the boot: the service's config, the
environment of the test's units, and the script the checks service runs.
"""

from __future__ import annotations

import os
import shlex

import tomli_w

from tests.conftest import merge, sim_config_data
from tests.kernel import harness
from tests.kernel.slow_guest import SLOW_GUEST_CONFIG

GUEST_DIR = harness.GUEST_TESTS / "systemd"
CHECKS = GUEST_DIR / "systemd_checks.py"
WORK = harness.SHARE / "systemd"
"""In the share: pack.toml, guest.env and checks.sh in; journal.txt (the whole boot's) out."""
TARGET = "pybms-systemd-checks.target"

STATE = "/var/lib/pybms"
SERVICE_CONFIG = merge(
    SLOW_GUEST_CONFIG,
    {
        "can": {"interface": "socketcan", "channel": "vcan0"},
        # the plant starts beside the service and takes a while to send its first frames
        "loop": {"startup_timeout_s": 120.0},
        # where systemd/README.md puts them: the unit's StateDirectory= and RuntimeDirectory=
        "protection": {"latch_file": f"{STATE}/latched.json"},
        "store": {"path": f"{STATE}/pybms.sqlite"},
        "service": {"control_socket": "/run/pybms/control.sock"},
    },
)
"""config/sim.toml with these changes is /etc/pybms/pack.toml in the guest."""

BOOT_TIMEOUT_S = float(os.environ.get("PYBMS_KERNEL_SYSTEMD_TIMEOUT_S", "900"))
"""Hard limit on this boot. It starts the service twice and runs two Python processes beside
each start (the plant, the fail-safe): about 4 min on a quiet host, more on a busy one."""

BOOT_CMDLINE = (
    f"PYBMS_GUEST_INIT=systemd systemd.unit={TARGET} "
    # the journal on the console too (not the debug lines the checks turn on): if the checks
    # never write their results, the console still shows what the service and systemd said
    "systemd.journald.forward_to_console=1 systemd.journald.max_level_console=info"
)


def write_share_files() -> None:
    """The config, the units' environment and the checks' script, into ``WORK``."""
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "pack.toml").write_text(tomli_w.dumps(merge(sim_config_data(), SERVICE_CONFIG)))
    # the share's path (guest/conftest.py reads it) and the Numba settings of the guest tests
    env = {"PYBMS_SHARE": str(harness.SHARE), **harness.NUMBA_ENV}
    (WORK / "guest.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    share = shlex.quote(str(harness.SHARE))
    (WORK / "checks.sh").write_text(
        harness.guest_pytest_script([str(CHECKS)])
        + "rc=$?\n"
        # what systemd and the service logged, for the host to show after a failure
        + f"journalctl -b --no-pager -o short-monotonic >{share}/systemd/journal.txt 2>&1\n"
        + f'echo "$rc" >{share}/exit_code\n'
        + "sync\n"
        + 'exit "$rc"\n'
    )


def prepare_script() -> str:
    """What init.sh runs before systemd: prepare.sh (its exit code decides whether systemd
    boots at all)."""
    return f"exec /bin/sh {shlex.quote(str(GUEST_DIR / 'prepare.sh'))} {shlex.quote(str(WORK))}\n"


def boot(image: harness.GuestImage) -> harness.GuestRun:
    """Boot the systemd guest once (after ``write_share_files``) and wait for it to power off."""
    return harness.boot(
        image,
        prepare_script(),
        timeout_s=BOOT_TIMEOUT_S,
        extra_cmdline=BOOT_CMDLINE,
        console_name="console-systemd.log",
    )
