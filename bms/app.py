"""Wiring: config → backends → loop, and a clean way out on every exit path.

No globals: everything the loop needs is built here from the config and closed here. Whatever
way the loop ends (duration reached, SIGINT, SIGTERM, an exception), the contactors are
commanded open and the feedback is awaited before the backends close.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TextIO

from bms.backends import Backend, FrontEndError, InjectionError
from bms.comms.dbc import DbcError
from bms.config import BackendChoice, BmsConfig
from bms.estimation.cell_params import CellParamsError, load_cell_params
from bms.estimation.estimator import warm_up
from bms.loop import ControlCycle, CycleTiming, RateKeeper
from bms.report import pack_summary, status_record, to_json, to_line
from bms.store.latches import LatchStore, LatchStoreBusy

log = logging.getLogger(__name__)

SHUTDOWN_OPEN_TIMEOUT_S = 2.0
"""How long shutdown waits for the feedback to confirm that every relay opened."""

EXIT_OK = 0
EXIT_CONTACTORS_NOT_CONFIRMED_OPEN = 1
EXIT_USAGE_ERROR = 2
EXIT_SETUP_FAILED = 3
EXIT_LOOP_FAILED = 4

SETUP_ERRORS = (FrontEndError, DbcError, CellParamsError, LatchStoreBusy, ValueError, OSError)
"""Errors that mean the configured hardware or files cannot be used: reported, not traced."""


class StopRequest:
    """Set by SIGINT/SIGTERM (or a test); the loop checks it once per cycle."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def __call__(self, signum: int, _frame) -> None:
        self.reason = signal.Signals(signum).name
        self.event.set()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def run(
    config: BmsConfig,
    *,
    simulate: bool = False,
    injections: list[str] | None = None,
    duration_s: float | None = None,
    status_format: str = "text",
    out: TextIO = sys.stdout,
    stop: StopRequest | None = None,
) -> int:
    """Run the control loop until ``duration_s`` passes or a stop is requested.

    With ``simulate``, the ``[sim]`` pack runs beside the loop on the same bus.
    Returns the process exit code.
    """
    stop = stop or StopRequest()
    emit: Callable[[dict], str] = to_json if status_format == "json" else to_line
    with ExitStack() as resources:
        try:
            cycle = build_cycle(config, resources, simulate=simulate, injections=injections)
        except InjectionError as exc:
            log.error("%s", exc)
            return EXIT_USAGE_ERROR
        except SETUP_ERRORS as exc:
            log.error("cannot start: %s", exc)
            return EXIT_SETUP_FAILED
        writer = LineWriter(out)
        resources.callback(writer.close)

        if not cycle.wait_for_first_sample(time.monotonic, config.loop.startup_timeout_s):
            log.error(
                "no complete sample from the front-end and contactor feedback within "
                "%.1f s; starting anyway, so the missing signals become faults",
                config.loop.startup_timeout_s,
            )
        rate = RateKeeper(config.loop.period_s, config.loop.lag_limit_s)
        timing = CycleTiming()
        worst_overall_s = 0.0
        start_s, _ = rate.wait()
        next_report_s = start_s
        status = None
        failed = False
        log.info("control loop running at %.0f Hz", 1.0 / config.loop.period_s)
        try:
            while not stop.event.is_set():
                now_s, dt_s = rate.wait()
                stalled = rate.last_lateness_s > config.loop.stall_limit_s
                status = cycle.run(now_s, dt_s, rate.lagging, stalled)
                compute_s = time.monotonic() - now_s
                timing.add(compute_s)
                worst_overall_s = max(worst_overall_s, compute_s)
                if now_s >= next_report_s:
                    record = status_record(
                        status, start_s, timing.mean_s, timing.worst_s, rate.missed_cycles
                    )
                    writer.write(emit(record))
                    timing = CycleTiming()
                    next_report_s += config.loop.status_interval_s
                if duration_s is not None and now_s - start_s >= duration_s:
                    stop.reason = stop.reason or "duration reached"
                    break
        except Exception:
            failed = True
            log.exception("control loop failed; opening contactors")
        finally:
            opened = cycle.open_and_wait(time.monotonic, SHUTDOWN_OPEN_TIMEOUT_S)
        if not opened:
            log.error(
                "contactor feedback did not confirm OPEN within %.1f s", SHUTDOWN_OPEN_TIMEOUT_S
            )
        summary = {
            "summary": True,
            "stopped_by": "error" if failed else stop.reason,
            "run_time_s": round(time.monotonic() - start_s, 3),
            "contactors": "open" if opened else "unconfirmed",
            "latched": list(status.latched_faults) if status else [],
            "missed_cycles": rate.missed_cycles,
            "cycle_time_max_s": worst_overall_s,
            "status_lines_dropped": writer.dropped,
        }
        if status is not None:
            soc = pack_summary(status)
            summary.update({k: soc[k] for k in ("soc_min", "soc_mean", "soc_max")})
        writer.write(to_json(summary) if status_format == "json" else _summary_line(summary))
        if failed:
            return EXIT_LOOP_FAILED
        return EXIT_OK if opened else EXIT_CONTACTORS_NOT_CONFIRMED_OPEN


def run_plant(
    config: BmsConfig,
    *,
    injections: list[str] | None = None,
    duration_s: float | None = None,
    stop: StopRequest | None = None,
) -> int:
    """Run only the ``[sim]`` pack on the configured bus, for a BMS in another process (or
    on another machine) to read: the two halves of ``bms sim`` apart, as on a real bus."""
    stop = stop or StopRequest()
    if config.sim is None:
        log.error("%s: `bms plant` needs a [sim] section", config.source)
        return EXIT_USAGE_ERROR
    try:
        sim = config.sim.cls(config, config.sim.options, list(injections or []))
    except InjectionError as exc:
        log.error("%s", exc)
        return EXIT_USAGE_ERROR
    except SETUP_ERRORS as exc:
        log.error("cannot start the simulated pack: %s", exc)
        return EXIT_SETUP_FAILED
    try:
        sim.start()
    except SETUP_ERRORS as exc:
        log.error("cannot start the simulated pack: %s", exc)
        return EXIT_SETUP_FAILED
    log.info("simulated pack running on %s", config.can.channel if config.can else "?")
    try:
        stop.event.wait(duration_s)
    finally:
        sim.stop()
    log.info("simulated pack stopped (%s)", stop.reason or "duration reached")
    return EXIT_OK


class LineWriter:
    """Writes status lines from a thread of its own, so a slow or stalled reader of stdout
    never blocks the loop: when its bounded queue is full, lines are dropped and counted."""

    def __init__(self, out: TextIO, max_lines: int = 100):
        self.out = out
        self.dropped = 0
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_lines)
        self._thread = threading.Thread(target=self._drain, name="status-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (waiting at most ``timeout_s``), then stop."""
        self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        while (line := self._queue.get()) is not None:
            # stdout closed: keep draining so the loop never waits
            with contextlib.suppress(OSError, ValueError):
                print(line, file=self.out, flush=True)


def build_cycle(
    config: BmsConfig,
    resources: ExitStack,
    *,
    simulate: bool = False,
    injections: list[str] | None = None,
) -> ControlCycle:
    """Open the backends (and start the simulated pack) and build the cycle over them.

    Everything opened is registered on ``resources``, so closing it releases all of it.
    """
    cell = load_cell_params(config.pack.cell_params)
    warm_up(cell)  # compile or load the kernels now, not in the first cycle
    if simulate:
        if config.sim is None:
            raise ValueError(f"{config.source}: `bms sim` needs a [sim] section")
        sim = config.sim.cls(config, config.sim.options, list(injections or []))
        sim.start()
        resources.callback(sim.stop)
    latch_store = LatchStore(config.protection.latch_file)
    latch_store.acquire()  # LatchStoreBusy: another BMS runs on this latch file
    resources.callback(latch_store.release)
    frontend = _open(resources, config, config.frontend)
    contactors = _open(resources, config, config.contactors)
    publisher = _open(resources, config, config.publisher) if config.publisher else None
    cycle = ControlCycle(config, cell, frontend, contactors, publisher, latch_store)
    resources.callback(cycle.close)
    return cycle


def _open(resources: ExitStack, config: BmsConfig, choice: BackendChoice) -> Backend:
    """Build a backend and make sure it is closed however the run ends."""
    backend = choice.cls(config, choice.options)
    resources.callback(backend.close)
    return backend


def _summary_line(summary: dict) -> str:
    latched = ", ".join(summary["latched"]) or "none"
    return (
        f"stopped ({summary['stopped_by']}) after {summary['run_time_s']:.1f} s: contactors "
        f"{summary['contactors']}, latched faults: {latched}, missed cycles "
        f"{summary['missed_cycles']}, worst cycle {summary['cycle_time_max_s'] * 1e3:.2f} ms"
    )
