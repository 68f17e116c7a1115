"""pytest for the rig: ``--rig=virtual|bench``, ``--rig-config``, ``--rig-report-dir``.

The ordered rig tests (hil/test_rig.py) are collected only with ``--rig``; the rig's own unit
tests (hil/unit/) always are. With ``--rig``, the run holds the rig's lock from start to end,
writes a JUnit XML (unless ``--junitxml`` names one) and a CSV of every measured figure into
the report directory, limits every phase of a rig test to ``[rig] test_timeout_s``, and prints
the reaction-time table at the end.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hil.board import BmsProcess, BoardError
from hil.canbus import all_open, main_closed
from hil.report import Figure, Report
from hil.session import RigSession

HIL = Path(__file__).resolve().parent
DEFAULT_CONFIGS = {"virtual": HIL / "rigs" / "virtual.toml"}
RIG_TESTS = "test_rig.py"
BUS_FAULTS = ("can_bus_off", "can_error_passive", "can_transmit_failed")
LINK_DISCHARGE_TIMEOUT_S = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rig", "hardware-in-the-loop rig")
    group.addoption(
        "--rig",
        choices=("virtual", "bench"),
        default=None,
        help="run the ordered rig tests against the virtual rig or a bench rig",
    )
    group.addoption(
        "--rig-config",
        type=Path,
        default=None,
        help="the rig config (default for --rig=virtual: hil/rigs/virtual.toml)",
    )
    group.addoption(
        "--rig-report-dir",
        type=Path,
        default=None,
        help="where the JUnit XML, figures.csv and the logs go (default: hil/reports/RIG-UTC)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name == RIG_TESTS and config.getoption("--rig") is None:
        return True
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rig: an ordered rig test (needs --rig)")
    kind = config.getoption("--rig")
    if kind is None:
        return
    path = config.getoption("--rig-config") or DEFAULT_CONFIGS.get(kind)
    if path is None:
        raise pytest.UsageError("--rig=bench needs --rig-config RIG.toml")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report_dir = config.getoption("--rig-report-dir") or HIL / "reports" / f"{kind}-{stamp}"
    config.stash[_PATHS] = (Path(path), report_dir.resolve())
    if not config.option.xmlpath:
        config.option.xmlpath = str(report_dir / "junit.xml")


_PATHS = pytest.StashKey[tuple[Path, Path]]()
_SESSION = pytest.StashKey[RigSession]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Rig tests run in the order their names number them, after everything else."""
    rig = [item for item in items if item.path.name == RIG_TESTS]
    others = [item for item in items if item.path.name != RIG_TESTS]
    for item in rig:
        item.add_marker(pytest.mark.rig)
    items[:] = others + sorted(rig, key=lambda item: item.name)


# ---------------------------------------------------------------- timeouts
class RigTimeout(Exception):
    """A rig test phase ran past [rig] test_timeout_s."""


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    def expire(signum, frame):
        raise RigTimeout(f"{what} took longer than {seconds:g} s ([rig] test_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _limited(item: pytest.Item, phase: str):
    session = item.config.stash.get(_SESSION, None)
    if item.get_closest_marker("rig") is None or session is None:
        return contextlib.nullcontext()
    return _time_limit(session.config.rig.test_timeout_s, f"{item.name} ({phase})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _limited(item, "set-up"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _limited(item, "test"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    with _limited(item, "teardown"):
        yield


# ---------------------------------------------------------------- the rig
@pytest.fixture(scope="session")
def rig_session(request: pytest.FixtureRequest) -> Iterator[RigSession]:
    """The whole run's rig: locked, instruments identified and in their resting state."""
    config_path, report_dir = request.config.stash[_PATHS]
    session = RigSession(config_path, request.config.getoption("--rig"), report_dir).open()
    request.config.stash[_SESSION] = session
    try:
        yield session
    finally:
        session.close()


class Figures:
    """The figures one test measures: each recorded (CSV, JUnit) as soon as it is measured;
    :meth:`verify` fails the test with every one outside its limits."""

    def __init__(self, report: Report, test: str, record_testsuite_property):
        self.report = report
        self.test = test
        self.record = record_testsuite_property
        self.taken: list[Figure] = []

    def measure(
        self,
        name: str,
        value: float,
        unit: str,
        low: float | None = None,
        high: float | None = None,
    ) -> Figure:
        figure = Figure(self.test, name, float(value), unit, low, high)
        self.report.add(figure)
        self.record(f"{self.test}.{name}", f"{figure.value:.6g} {unit}")
        self.taken.append(figure)
        return figure

    def verify(self) -> None:
        failed = [figure.describe() for figure in self.taken if not figure.passed]
        assert not failed, "outside their limits:\n  " + "\n  ".join(failed)


@pytest.fixture
def figures(
    rig_session: RigSession, request: pytest.FixtureRequest, record_testsuite_property
) -> Figures:
    """Figures go into the CSV and, as suite properties (what JUnit's xunit2 allows), into
    the JUnit XML."""
    return Figures(rig_session.report, request.node.name, record_testsuite_property)


@dataclass
class BmsUnderTest:
    """The board's BMS for one test: started, closed, and judged at the end."""

    session: RigSession
    process: BmsProcess
    closed_s: float
    missed_at_start: int
    lost_at_start: int
    errors_at_start: int
    expected_latched: set[str] = field(default_factory=set)
    expected_missed: int = 0

    def expect_latched(self, *fault_ids: str) -> None:
        """Faults this test may latch: the teardown accepts them (it clears every latch)."""
        self.expected_latched.update(fault_ids)

    def expect_missed(self, cycles: int) -> None:
        """Cycles this test makes the BMS miss on purpose (a hang), on top of the budget."""
        self.expected_missed += cycles

    def status(self) -> dict:
        return self.process.status()


def start_bms(session: RigSession, watchdog_usec: int | None = None) -> BmsUnderTest:
    """Start the board's BMS and wait until its contactors are closed (as the contactor box
    reports them) and it has printed a status line since."""
    monitor = session.monitor
    link_v = session.rig.discharge_link(LINK_DISCHARGE_TIMEOUT_S)
    if link_v > session.config.electronic_load.link_discharged_v:
        raise BoardError(
            f"the DC link stays at {link_v:.1f} V after {LINK_DISCHARGE_TIMEOUT_S:g} s of "
            "discharging through the electronic load: are the contactors open?"
        )
    monitor.restart_counters()
    started_s = time.monotonic()
    process = session.board.start(watchdog_usec)
    timeout_s = session.config.board.boot_timeout_s
    closed = monitor.wait_for("PDU_ContactorFeedback", main_closed, started_s, timeout_s)
    if closed is None:
        log = process.stderr_tail()
        process.stop()
        # whatever latched here would keep every later test from closing: this test reports
        # it, the next one starts clean
        cleared = session.board.clear_faults()
        raise BoardError(
            f"the contactors did not close within {timeout_s:g} s of starting bms (latched, "
            f"now cleared: {', '.join(cleared) or 'nothing'}); its log:\n{log}"
        )
    deadline_s = time.monotonic() + 5.0
    while not any(line.t_s > closed.t_s for line in process.lines):
        if time.monotonic() > deadline_s or not process.alive():
            process.stop()
            raise BoardError(f"bms printed no status line once closed:\n{process.stderr_tail()}")
        time.sleep(0.05)
    first = next(line for line in process.lines if line.t_s > closed.t_s)
    return BmsUnderTest(
        session,
        process,
        closed.t_s,
        first.record["missed_cycles"],
        monitor.total_lost(),
        monitor.error_frames,
    )


def finish_bms(bms: BmsUnderTest) -> list[str]:
    """The health a test must leave the board in, then the BMS stopped and the rig at rest.
    Returns every problem found (all steps run, whatever fails)."""
    session = bms.session
    budgets = session.config.budgets
    problems = []
    process = bms.process
    if process.alive() and not process.killed:
        try:
            status = process.status()
        except BoardError as exc:
            problems.append(f"no status from the BMS at the end of the test: {exc}")
        else:
            bus = sorted(set(status["faults"]) & set(BUS_FAULTS))
            if bus:
                problems.append(f"CAN bus faults at the end of the test: {bus}")
            missed = status["missed_cycles"] - bms.missed_at_start - bms.expected_missed
            if missed > budgets.missed_cycles:
                problems.append(
                    f"{missed} missed cycles in the test beyond the {bms.expected_missed} it "
                    f"caused (budget {budgets.missed_cycles})"
                )
    elif not process.killed:
        problems.append(f"the BMS ended during the test:\n{process.stderr_tail()}")
    lost = session.monitor.total_lost() - bms.lost_at_start
    if lost > budgets.frames_lost:
        problems.append(
            f"{lost} CAN frames lost in the test (budget {budgets.frames_lost}): "
            f"{session.monitor.lost}"
        )
    if session.monitor.error_frames > bms.errors_at_start:
        problems.append(
            f"{session.monitor.error_frames - bms.errors_at_start} CAN error frames in the test"
        )
    try:
        session.rig.set_up()
    except Exception as exc:  # an instrument that fails here fails the teardown, not the run
        problems.append(f"the rig could not return to rest: {exc}")
    stopped_s = time.monotonic()
    try:
        code = process.stop()
    except BoardError as exc:
        problems.append(str(exc))
    else:
        if code != 0 and not process.killed:
            problems.append(
                f"bms exited with {code} (0: contactors confirmed open):\n{process.stderr_tail()}"
            )
    hold_s = session.config.contactor_box.deadman_hold_s
    settle_s = hold_s + session.config.contactor_box.response_s + 1.0
    opened = session.monitor.wait_for("PDU_ContactorFeedback", all_open, stopped_s, settle_s)
    if opened is None:
        problems.append(f"the contactor box does not report every relay open {settle_s:g} s on")
    # every latch goes, so the next test starts clean; one the test did not mean is its failure
    try:
        cleared = session.board.clear_faults()
    except BoardError as exc:
        problems.append(f"the latched faults could not be cleared: {exc}")
    else:
        unexpected = sorted(set(cleared) - bms.expected_latched)
        if unexpected:
            problems.append(f"unexpected latched faults (now cleared): {unexpected}")
    return problems


@pytest.fixture
def bms(rig_session: RigSession) -> Iterator[BmsUnderTest]:
    """A fresh ``bms run`` for the test, closed on a pack at rest; its health at the end."""
    under_test = start_bms(rig_session)
    try:
        yield under_test
    finally:
        problems = finish_bms(under_test)
    assert not problems, "the board's health at the end of the test:\n  " + "\n  ".join(problems)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None:
        return
    write = terminalreporter.write_line
    table = session.report.reaction_table()
    if table:
        terminalreporter.section(f"reaction times on rig {session.config.rig.name!r}")
        for line in table:
            write(line)
    write(f"figures: {session.report.csv_path}")
    write(f"logs:    {session.report.directory}")
