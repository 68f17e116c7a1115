"""The tests' one qemu boot: the host's systemd as the guest's PID 1, running the guest tests
(guest/: vcan0, i2c-stub) and then the checks of bms.service (guest/systemd/systemd_checks.py).

The same kernel, initramfs and root as harness.py's boot, with ``PYBMS_GUEST_INIT=systemd`` on
the kernel command line: init.sh loads the modules, creates vcan0 and i2c-stub's chips, runs
``guest/systemd/prepare.sh`` in the overlay root (the user, the config, the unit and its
drop-in, the test's units), then hands PID 1 to ``/lib/systemd/systemd``, which boots
``pybms-systemd-checks.target``. That target starts two oneshot services, one after the other:

- ``pybms-bus-tests.service`` runs the guest tests with pytest (they start their own
  ``bms plant`` and ``bms run`` on vcan0), results into ``BUS_RESULTS``;
- ``pybms-systemd-checks.service``, ordered after it, runs the checks with pytest (they start
  ``bms-plant.service`` and ``bms.service``, also on vcan0: so only once the guest tests and
  whatever they left running are gone), results into ``CHECK_RESULTS``, and powers the guest
  off.

Each part writes its exit code, pytest.log, junit.xml and metrics.json into its own directory,
so each host test (test_kernel_guest.py, test_systemd_guest.py) fails on its own part only.

Written here into ``WORK`` (in the share) before the boot: the service's config, the
environment of the test's units, and the scripts the two services run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import tomli_w

from tests.conftest import merge, sim_config_data
from tests.kernel import harness
from tests.kernel.slow_guest import SLOW_GUEST_CONFIG

GUEST_DIR = harness.GUEST_TESTS / "systemd"
CHECKS = GUEST_DIR / "systemd_checks.py"
WORK = harness.SHARE / "systemd"
"""In the share: pack.toml, guest.env, bus-tests.sh and checks.sh in; journal.txt (the whole
boot's) out."""
BUS_RESULTS = harness.SHARE / "results" / "bus-tests"
"""Where pybms-bus-tests.service leaves the guest tests' exit code and results."""
CHECK_RESULTS = harness.SHARE / "results" / "systemd-checks"
"""Where pybms-systemd-checks.service leaves the checks' exit code and results."""
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

BOOT_CMDLINE = (
    f"PYBMS_GUEST_INIT=systemd systemd.unit={TARGET} "
    # the journal on the console too (not the debug lines the checks turn on): if the checks
    # never write their results, the console still shows what the service and systemd said
    "systemd.journald.forward_to_console=1 systemd.journald.max_level_console=info"
)


def part_script(pytest_args: list[str], results: Path) -> str:
    """The start of what each of the two services runs: pytest, then its exit code into
    ``results`` and into ``$rc``."""
    return (
        harness.guest_pytest_script(pytest_args, results)
        + "rc=$?\n"
        + f'echo "$rc" >{shlex.quote(str(results / "exit_code"))}\n'
    )


def write_share_files() -> None:
    """The config, the units' environment and the two services' scripts, into ``WORK``."""
    WORK.mkdir(parents=True, exist_ok=True)
    for results in (BUS_RESULTS, CHECK_RESULTS):
        results.mkdir(parents=True, exist_ok=True)
    (WORK / "pack.toml").write_text(tomli_w.dumps(merge(sim_config_data(), SERVICE_CONFIG)))
    # the share's path (guest/conftest.py reads it) and the Numba settings of the guest tests
    env = {"PYBMS_SHARE": str(harness.SHARE), **harness.NUMBA_ENV}
    (WORK / "guest.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (WORK / "bus-tests.sh").write_text(
        part_script([str(harness.GUEST_TESTS)], BUS_RESULTS) + 'exit "$rc"\n'
    )
    share = shlex.quote(str(harness.SHARE))
    (WORK / "checks.sh").write_text(
        part_script([str(CHECKS)], CHECK_RESULTS)
        # The checks leave the plant running: stopped here, while journald runs. Left to the
        # power-off, systemd-shutdown waited 90 s for `bms plant` to end.
        + "systemctl stop bms-plant.service\n"
        # what systemd and the services logged, for the host to show after a failure
        + f"journalctl -b --no-pager -o short-monotonic >{share}/systemd/journal.txt 2>&1\n"
        + "sync\n"
        + 'exit "$rc"\n'
    )


def prepare_script() -> str:
    """What init.sh runs before systemd: prepare.sh (its exit code decides whether systemd
    boots at all)."""
    return f"exec /bin/sh {shlex.quote(str(GUEST_DIR / 'prepare.sh'))} {shlex.quote(str(WORK))}\n"


def boot(image: harness.GuestImage) -> harness.GuestRun:
    """Boot the guest once (after ``write_share_files``) and wait for it to power off."""
    return harness.boot(image, prepare_script(), extra_cmdline=BOOT_CMDLINE)
