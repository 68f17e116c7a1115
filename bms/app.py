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
from bms.config import BackendChoice, BmsConfig, ConfigError, load_config
from bms.estimation.cell_params import CellParamsError, load_cell_params
from bms.estimation.estimator import warm_up
from bms.exit_codes import (
    EXIT_CONTACTORS_NOT_CONFIRMED_OPEN,
    EXIT_LOOP_FAILED,
    EXIT_OK,
    EXIT_SETUP_FAILED,
    EXIT_USAGE_ERROR,
)
from bms.health.runner import SohModel
from bms.health.service import HealthService
from bms.loop import ControlCycle, CycleTiming, RateKeeper
from bms.report import pack_summary, status_record, to_json, to_line
from bms.service.control import ControlServer, ControlSocketBusy
from bms.service.endpoint import ServiceEndpoint
from bms.service.notify import Notifier
from bms.service.realtime import freeze_heap, set_up_loop_thread
from bms.store.latches import LatchStore, LatchStoreBusy
from bms.store.recorder import PackRecorder
from bms.store.state import StateStore, StoreError
from bms.types import ALL_OPEN, PackStatus

log = logging.getLogger(__name__)

SHUTDOWN_OPEN_TIMEOUT_S = 2.0
"""How long shutdown waits for the feedback to confirm that every relay opened."""


SETUP_ERRORS = (
    FrontEndError,
    DbcError,
    CellParamsError,
    LatchStoreBusy,
    ControlSocketBusy,
    StoreError,
    ValueError,
    OSError,
)
"""Errors that mean the configured hardware or files cannot be used: reported, not traced."""


class StopRequest:
    """Set by SIGINT/SIGTERM (or a test); the loop checks it once per cycle. SIGHUP asks for
    a reload of the config instead."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reload = threading.Event()
        self.reason = ""

    def __call__(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload.set()
            return
        self.reason = signal.Signals(signum).name
        self.event.set()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGHUP, self)


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
    with ExitStack() as resources:
        endpoint = ServiceEndpoint(str(config.source), config.store.path if config.store else None)
        try:
            cycle = build_cycle(
                config, resources, simulate=simulate, injections=injections, endpoint=endpoint
            )
        except InjectionError as exc:
            log.error("%s", exc)
            return EXIT_USAGE_ERROR
        except SETUP_ERRORS as exc:
            log.error("cannot start: %s", exc)
            return EXIT_SETUP_FAILED
        writer = LineWriter(out)
        resources.callback(writer.close)
        emit: Callable[[dict], str] = to_json if status_format == "json" else to_line
        runner = LoopRunner(config, cycle, writer, emit, endpoint)
        return runner.run(stop, duration_s)


class LoopRunner:
    """The loop around the cycle: rate, status lines, systemd, reloads, the way out."""

    def __init__(
        self,
        config: BmsConfig,
        cycle: ControlCycle,
        writer: LineWriter,
        emit: Callable[[dict], str],
        endpoint: ServiceEndpoint,
    ):
        self.config = config
        self.cycle = cycle
        self.writer = writer
        self.emit = emit
        self.endpoint = endpoint
        self.notifier = Notifier()
        self.ready = False

    def run(self, stop: StopRequest, duration_s: float | None) -> int:
        config, cycle, notifier = self.config, self.cycle, self.notifier
        if not cycle.wait_for_first_sample(time.monotonic, config.loop.startup_timeout_s):
            log.error(
                "no complete sample from the front-end and contactor feedback within "
                "%.1f s; starting anyway, so the missing signals become faults",
                config.loop.startup_timeout_s,
            )
        applied = set_up_loop_thread(config.service.realtime_priority, config.service.cpu_affinity)
        if config.service.freeze_gc:
            freeze_heap()
        # after the set-up above, which takes time: the first deadline is from here
        rate = RateKeeper(config.loop.period_s, config.loop.lag_limit_s)
        timing = CycleTiming()
        worst_overall_s = 0.0
        start_s, _ = rate.wait()
        self.endpoint.start_s = start_s
        next_report_s = start_s
        status = None
        failed = False
        reloads = Reloader(config.source, stop.reload, notifier, lambda: self.ready)
        log.info(
            "control loop running at %.0f Hz%s",
            1.0 / config.loop.period_s,
            f" ({', '.join(applied)})" if applied else "",
        )
        try:
            while not stop.event.is_set():
                reloaded = reloads.take()
                if reloaded is not None:
                    self._apply(reloaded)
                now_s, dt_s = rate.wait()
                stalled = rate.last_lateness_s > config.loop.stall_limit_s
                status = cycle.run(now_s, dt_s, rate.lagging, stalled)
                compute_s = time.monotonic() - now_s
                timing.add(compute_s)
                worst_overall_s = max(worst_overall_s, compute_s)
                self.endpoint.publish(status, timing.mean_s, timing.worst_s, rate.missed_cycles)
                if not self.ready and cycle.sample_complete:
                    self.ready = True
                    notifier.ready(_short_status(status))
                    if cycle.recorder is not None:
                        cycle.recorder.note("config_sha256", config.sha256)
                if self.ready and cycle.last_cycle_healthy:
                    notifier.watchdog(now_s)
                if now_s >= next_report_s:
                    record = status_record(
                        status, start_s, timing.mean_s, timing.worst_s, rate.missed_cycles
                    )
                    self.writer.write(self.emit(record))
                    notifier.status(_short_status(status))
                    timing = CycleTiming()
                    next_report_s += config.loop.status_interval_s
                if duration_s is not None and now_s - start_s >= duration_s:
                    stop.reason = stop.reason or "duration reached"
                    break
        except Exception:
            failed = True
            log.exception("control loop failed; opening contactors")
        finally:
            reloads.close()
            self.endpoint.stopping = True
            notifier.stopping()
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
            "status_lines_dropped": self.writer.dropped,
        }
        if status is not None:
            soc = pack_summary(status)
            summary.update({k: soc[k] for k in ("soc_min", "soc_mean", "soc_max")})
        self.writer.write(to_json(summary) if self.emit is to_json else _summary_line(summary))
        if failed:
            return EXIT_LOOP_FAILED
        return EXIT_OK if opened else EXIT_CONTACTORS_NOT_CONFIRMED_OPEN

    def _apply(self, new: BmsConfig) -> None:
        """A reloaded config, validated by the reload thread: apply it between two cycles
        unless it changes what needs a restart; either way the loop runs on."""
        source = self.config.source
        try:
            restart = self.cycle.reconfigure(new)
        except Exception:
            log.exception("reload of %s failed; still running on the previous config", source)
            restart = None
        if restart:
            log.error(
                "reload of %s refused: %s changed, which needs a restart; still running on the "
                "previous config",
                source,
                ", ".join(restart),
            )
        elif restart is not None:
            self.config = new
            log.info("reloaded %s", source)
        if self.ready:
            self.notifier.send(READY="1")


class Reloader:
    """Reads the config again on SIGHUP, on a thread of its own (parsing and validating take
    tens of milliseconds: whole cycles of a fast loop), and hands a valid one to the loop."""

    def __init__(
        self,
        source,
        requested: threading.Event,
        notifier: Notifier,
        is_ready: Callable[[], bool],
    ):
        """``is_ready``: whether READY=1 went out; systemd waits for another after
        RELOADING=1, which a refused reload sends from here (an applied one from the loop)."""
        self.source = source
        self.requested = requested
        self.notifier = notifier
        self.is_ready = is_ready
        self._ready: queue.SimpleQueue[BmsConfig] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)
        self._thread.start()

    def take(self) -> BmsConfig | None:
        """A validated config waiting to be applied, or None (never blocks)."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._closing.set()
        self.requested.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            self.requested.wait()
            self.requested.clear()
            if self._closing.is_set():
                return
            self.notifier.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
            try:
                self._ready.put(load_config(self.source))
                continue  # the loop applies it and sends READY=1
            except ConfigError as exc:
                log.error(
                    "reload of %s refused, still running on the previous config:\n  %s",
                    self.source,
                    "\n  ".join(exc.problems),
                )
            except Exception:
                log.exception(
                    "reload of %s failed; still running on the previous config", self.source
                )
            if self.is_ready():  # systemd holds the unit in "reloading" until it comes
                self.notifier.send(READY="1")


def _short_status(status: PackStatus) -> str:
    """One line for ``systemctl status``."""
    summary = pack_summary(status)
    soc = summary["soc_mean"]
    soc_text = "--" if soc != soc else f"{soc * 100:.1f} %"
    latched = f", latched: {', '.join(status.latched_faults)}" if status.latched_faults else ""
    return (
        f"contactors {status.contactors.value}, SOC {soc_text}, "
        f"{len(status.active_faults)} active fault(s){latched}"
    )


def failsafe(config: BmsConfig, hold_s: float) -> int:
    """Open the contactors and nothing else, for systemd's ExecStopPost: it runs however
    the service ended (a crash, a kill, a hang the watchdog ended), so it touches only the
    contactor driver. Commands every relay open for up to ``hold_s`` until the feedback
    confirms it. Exit 0 when confirmed open, 1 when not, 3 when the driver cannot be opened."""
    try:
        contactors = config.contactors.cls(config, config.contactors.options)
    except SETUP_ERRORS as exc:
        log.error("failsafe: cannot open the contactor driver: %s", exc)
        return EXIT_SETUP_FAILED
    try:
        deadline_s = time.monotonic() + hold_s
        while True:
            now_s = time.monotonic()
            try:
                contactors.command(ALL_OPEN)
                feedback = contactors.feedback(now_s)
                if feedback.valid and not feedback.relays.any_closed:
                    log.info("failsafe: contactors confirmed open")
                    return EXIT_OK
            except Exception as exc:
                log.error("failsafe: %s", exc)
            if now_s >= deadline_s:
                log.error("failsafe: the feedback did not confirm OPEN within %.1f s", hold_s)
                return EXIT_CONTACTORS_NOT_CONFIRMED_OPEN
            time.sleep(min(0.05, config.loop.period_s))
    finally:
        contactors.close()


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
    endpoint: ServiceEndpoint | None = None,
) -> ControlCycle:
    """Open the backends (and start the simulated pack) and build the cycle over them.

    Everything opened is registered on ``resources``, so closing it releases all of it. The
    control socket is bound first: a second BMS on the same config stops here, before it
    touches a bus (ControlSocketBusy), as it does on the latch file's lock.
    """
    if endpoint is not None and config.service.control_socket is not None:
        server = ControlServer(
            config.service.control_socket, endpoint.handlers(), config.service.admin_group
        )
        server.start()
        resources.callback(server.close)
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
    recorder = None
    if config.store is not None:
        store = StateStore.open(config.store.path)
        recorder = PackRecorder(
            store, config.store.interval_s, cell.capacity_ah * config.pack.n_parallel
        )
        recorder.start()
        resources.callback(recorder.close)  # after the cycle's close below: LIFO
    health = None
    if config.health.enabled:
        model = SohModel.load(config.health.model) if config.health.model else None
        health = HealthService(
            cell, config.pack.n_cells, config.pack.n_parallel, model, config.health.sample_period_s
        )
        health.start()
        resources.callback(health.stop)
    frontend = _open(resources, config, config.frontend)
    contactors = _open(resources, config, config.contactors)
    publisher = _open(resources, config, config.publisher) if config.publisher else None
    cycle = ControlCycle(
        config, cell, frontend, contactors, publisher, latch_store, recorder, health
    )
    resources.callback(cycle.close)
    if endpoint is not None:
        endpoint.cycle = cycle
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
