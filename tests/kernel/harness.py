"""Host side of the kernel tests: set-up, a Numba cache for the guest, and one qemu boot.

The guest is Debian's stock amd64 kernel under qemu with software emulation (TCG: nested KVM is
not usable on the CI machines). Its root file system is the host's ``/``, shared read-only
over 9p, so it runs this checkout with the host's Python and ``.venv``; a second 9p share,
``SHARE`` (read-write), carries the script to run in and the results out. ``setup.sh`` fetches
and builds what the boot needs; ``init.sh`` is the guest's PID 1, which either runs the script
and powers off (the busybox boot of benchmarks/bench_kernel_buses.py) or hands PID 1 to systemd
(the one boot of the tests, systemd_guest.py).

Everything in the guest runs 15-40 times slower than here, and Numba would take minutes to
compile the estimator's kernels there. So the kernels are compiled here, once, into a cache in
the share (``NUMBA_CACHE_DIR``) for the CPU model ``generic`` (``NUMBA_CPU_NAME``), which both
sides then use: Numba reuses a cache only where the CPU name and features it was compiled for
match, and ``generic`` (with no extra features) matches everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from tests.conftest import REPO, merge, sim_config_data

KERNEL_TESTS = Path(__file__).resolve().parent
GUEST_TESTS = KERNEL_TESTS / "guest"
CACHE = Path(os.environ.get("PYBMS_KERNEL_CACHE", KERNEL_TESTS / ".cache")).resolve()
SHARE = CACHE / "share"
"""Shared read-write with the guest, at the same path on both sides."""
NUMBA_ENV = {"NUMBA_CACHE_DIR": str(SHARE / "numba"), "NUMBA_CPU_NAME": "generic"}

I2C_STUB_ADDRESSES = (0x40, 0x41)
"""The chips i2c-stub emulates in the guest (INA228 addresses with A1/A0 strapped 00 and 01)."""

SETUP_TIMEOUT_S = 900.0
"""A cold set-up downloads about 90 MB; a warm one takes about a second."""
BOOT_TIMEOUT_S = float(os.environ.get("PYBMS_KERNEL_TIMEOUT_S", "1380"))
"""Hard limit on one boot, from qemu's start to its exit. The tests' boot runs the guest tests
(about 2.5 min on a quiet host) and then the systemd checks (about 4 min): 480 s and 900 s, the
limits each had when it had a boot of its own."""
ACCEL = os.environ.get("PYBMS_KERNEL_ACCEL", "tcg")
"""``kvm`` only where nested KVM really works; elsewhere qemu aborts or crawls."""

RESULT_FILES = ("exit_code", "run.sh", "pytest.log", "junit.xml", "metrics.json")
"""What one boot leaves in the share's top level; removed before the next (with the
directories in ``prepare_share``)."""


class KernelSetupError(RuntimeError):
    """setup.sh failed: its output says what is missing and how to install it."""


@dataclass(frozen=True)
class GuestImage:
    """What setup.sh prepared: the kernel, the initramfs and the qemu binary to boot them."""

    kernel_version: str
    kernel: Path
    initrd: Path
    qemu: str


@dataclass(frozen=True)
class GuestRun:
    """One boot: the console, and the exit code of the script init.sh ran (None if it never
    finished; a systemd boot has one only if preparing its root failed, see init.sh)."""

    exit_code: int | None
    timed_out: bool
    elapsed_s: float
    console: str

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def check_guest_run(run: GuestRun, results: Path, logs: str, console_lines: int = 60) -> dict:
    """Fail, with the guest's console and pytest output, unless a pytest run in the guest
    (``guest_pytest_script`` with ``results``) wrote its exit code into ``results`` before the
    boot ended (by a power-off or by ``BOOT_TIMEOUT_S``), and had at least one test and none
    failing; return the figures its tests measured (metrics.json). ``logs`` says where the
    guest's other logs are. Call it while holding ``exclusive()``: once the lock goes, the
    share is the next run's."""
    log_path = results / "pytest.log"
    guest_log = log_path.read_text() if log_path.exists() else "(no pytest log from the guest)"
    metrics_path = results / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    junit_path = results / "junit.xml"
    suite = ET.parse(junit_path).getroot().find("testsuite") if junit_path.exists() else None
    exit_code_path = results / "exit_code"
    exit_code = None
    if exit_code_path.exists():
        exit_code = int(exit_code_path.read_text().strip() or "-1")
    where = (
        f"guest console:\n{run.console_tail(console_lines)}\n\nguest pytest:\n"
        f"{guest_log[-12000:]}\n({logs})"
    )
    assert exit_code is not None or not run.timed_out, (
        f"the guest did not power off within {BOOT_TIMEOUT_S:.0f} s, and these tests had not "
        f"finished\n{where}"
    )
    assert exit_code is not None, f"the guest never finished these tests\n{where}"
    assert exit_code == 0, f"guest tests failed (pytest exit code {exit_code})\n{where}"
    assert suite is not None and int(suite.get("tests")) > 0, f"the guest ran no test\n{where}"
    return metrics


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the cache for one set-up and boot: two runs in one checkout (two ``make test``)
    would share the share; the second waits for the first instead."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def set_up() -> GuestImage:
    """Run setup.sh (idempotent) and return what it prepared; KernelSetupError on failure."""
    try:
        proc = subprocess.run(
            ["bash", str(KERNEL_TESTS / "setup.sh"), str(CACHE)],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise KernelSetupError(f"setup.sh did not finish within {SETUP_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        raise KernelSetupError(f"setup.sh failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return GuestImage(
        kernel_version=values["KERNEL_VERSION"],
        kernel=Path(values["KERNEL"]),
        initrd=Path(values["INITRD"]),
        qemu=values["QEMU"],
    )


def prepare_share() -> None:
    """Create the share and remove the results of an earlier boot (the Numba cache stays)."""
    if any(c.isspace() for c in str(SHARE)):
        raise KernelSetupError(f"the checkout's path must not contain spaces: {SHARE}")
    SHARE.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (SHARE / name).unlink(missing_ok=True)
    for directory in ("logs", "warm-numba", "systemd", "results"):
        shutil.rmtree(SHARE / directory, ignore_errors=True)


def warm_numba_cache(timeout_s: float = 300.0) -> float:
    """Compile every kernel ``bms run`` and ``bms plant`` use into the shared cache, by running
    ``bms sim`` here for a moment with the guest's Numba settings; return the seconds taken.

    With a warm cache this takes about two seconds; a cold one compiles for about 15 s."""
    work = SHARE / "warm-numba"
    work.mkdir(exist_ok=True)
    config = work / "config.toml"
    data = merge(
        sim_config_data(),
        {
            "can": {"interface": "virtual", "channel": f"warm-numba-{os.getpid()}"},
            "protection": {"latch_file": str(work / "latched.json")},
            "store": {"path": str(work / "store.sqlite")},
            # a Unix socket's path must be short; one name will do (runs are exclusive())
            "service": {"control_socket": "/tmp/pybms-warm-numba.sock"},
        },
    )
    config.write_text(tomli_w.dumps(data))
    bms = Path(sys.executable).with_name("bms")
    start_s = time.monotonic()
    proc = subprocess.run(
        [str(bms), "sim", "--config", str(config), "--duration-s", "0.5"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **NUMBA_ENV},
    )
    if proc.returncode != 0:
        raise KernelSetupError(f"warming the Numba cache failed:\n{proc.stderr}")
    return time.monotonic() - start_s


def guest_pytest_script(pytest_args: list[str], results: Path = SHARE) -> str:
    """A shell script for the guest: pytest over ``pytest_args``, its output (pytest.log),
    junit.xml and the tests' metrics.json into ``results`` (a directory in the share); the
    script's exit code is pytest's."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        # plugins the guest tests do not use: they would only cost start-up time and writes
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "-p",
        "no:pytest_cov",
        "-o",
        "console_output_style=classic",
        f"--junitxml={results / 'junit.xml'}",
        *pytest_args,
    ]
    # PYBMS_GUEST_RESULTS: where guest/conftest.py writes metrics.json
    env = {**NUMBA_ENV, "PYBMS_GUEST_RESULTS": str(results)}
    exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    return (
        f"cd {shlex.quote(str(REPO))} || exit 90\n"
        f"export {exports}\n"
        f"{shlex.join(command)} >{shlex.quote(str(results / 'pytest.log'))} 2>&1\n"
    )


def boot(image: GuestImage, script: str, extra_cmdline: str = "") -> GuestRun:
    """Boot the guest once, run ``script`` in it (as root, in the host's root file system,
    read-only, with ``SHARE`` writable) and wait for it to power off, at most
    ``BOOT_TIMEOUT_S``.

    ``extra_cmdline`` is appended to the kernel command line (``PYBMS_GUEST_INIT=systemd``
    makes ``script`` a preparation after which systemd boots, see init.sh); the console is kept
    in ``CACHE / "console.log"``."""
    (SHARE / "exit_code").unlink(missing_ok=True)
    (SHARE / "run.sh").write_text(script)
    addresses = ",".join(f"0x{address:02x}" for address in I2C_STUB_ADDRESSES)
    cmdline = (
        f"console=ttyS0 panic=-1 loglevel=4 PYBMS_SHARE={SHARE} PYBMS_I2C_STUB_ADDRS={addresses}"
        f" {extra_cmdline}"
    ).strip()
    command = [
        image.qemu,
        "-accel",
        ACCEL,
        # numpy needs x86-64-v2 (SSE4.2, POPCNT), more than qemu's default CPU model offers
        "-cpu",
        "max",
        "-m",
        "2048",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",  # with panic=-1, a kernel panic ends qemu instead of rebooting
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={SHARE},mount_tag=share,security_model=none,multidevs=remap",
    ]
    console_path = CACHE / "console.log"
    start_s = time.monotonic()
    timed_out = False
    with console_path.open("wb") as console:
        try:
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                timeout=BOOT_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            timed_out = True  # subprocess.run has killed qemu
    elapsed_s = time.monotonic() - start_s
    exit_code_file = SHARE / "exit_code"
    exit_code = None
    if exit_code_file.exists():
        exit_code = int(exit_code_file.read_text().strip() or "-1")
    console_text = console_path.read_bytes().decode("utf-8", errors="replace")
    return GuestRun(exit_code, timed_out, elapsed_s, console_text)
