"""Timing of the control loop on the simulated 16-cell pack, against an idle baseline.

For each loop rate (100 Hz and 10 Hz by default) and each condition (idle machine, and with
CPU-bound competitor processes running), two runs of ``--duration-s`` each, in this process:

- baseline: a ``bms.loop.RateKeeper`` at the same period doing no work, only waking up;
- loop: the same RateKeeper driving ``bms.loop.ControlCycle`` on the CAN backends, with the
  simulated pack (drive-cycle load from ``config/sim.toml``) running on its own thread.

Per run: wake-up lateness and cycle compute time (p50, p99, max), missed cycles (as counted by
the RateKeeper), CPU share (process CPU time / wall time, all threads), RSS (current and the
process's peak so far), and the fraction of cycles with the contactors CLOSED (a loop run far
below 1 is broken). Speed is judged by ratios against the baseline of the same run, never by
absolute times: the table gives p99 lateness of the loop / p99 lateness of the baseline.

Run from the repository root (a full run is 2 rates x 2 conditions x 2 runs of 60 s):

    .venv/bin/python benchmarks/bench_loop.py --duration-s 60
    .venv/bin/python benchmarks/bench_loop.py --duration-s 60 --json benchmarks/loop.json

The Markdown table on stdout is meant to be pasted into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bms.app import SHUTDOWN_OPEN_TIMEOUT_S, build_cycle
from bms.config import BmsConfig, load_config
from bms.loop import RateKeeper
from bms.types import ContactorState

REPO_DIR = Path(__file__).resolve().parents[1]
SPIN_CODE = "while True: pass"


@dataclasses.dataclass
class RunResult:
    kind: str  # "loop" or "baseline"
    rate_hz: float
    competitors: int
    duration_s: float
    cycles: int
    lateness_s: dict[str, float]  # p50, p99, max
    compute_s: dict[str, float]
    missed_cycles: int
    cpu_share: float
    rss_mib: float
    peak_rss_mib: float
    closed_fraction: float | None  # None for the baseline


def percentiles(samples_s: list[float]) -> dict[str, float]:
    values = np.asarray(samples_s)
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max())}


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def timed_loop(rate: RateKeeper, duration_s: float, work) -> tuple[dict, float, float]:
    """Run ``work(t_s, dt_s)`` once per wake-up for ``duration_s``; return the figures.

    Lateness is the wake-up time minus the deadline the RateKeeper slept to
    (``rate.last_lateness_s``); after an overrun the RateKeeper re-phases, so lateness is
    measured against the deadline it actually aimed at, and skipped cycles count as missed.
    """
    lateness_s: list[float] = []
    compute_s: list[float] = []
    start_s, _ = rate.wait()  # the first wait returns at once, as in bms/app.py
    cpu_start_s = time.process_time()
    now_s = start_s
    while now_s - start_s < duration_s:
        now_s, dt_s = rate.wait()
        lateness_s.append(rate.last_lateness_s)
        work(now_s - start_s, dt_s)
        compute_s.append(time.monotonic() - now_s)
    wall_s = time.monotonic() - start_s
    cpu_share = (time.process_time() - cpu_start_s) / wall_s
    return {"lateness_s": lateness_s, "compute_s": compute_s}, cpu_share, wall_s


def result(kind, period_s, competitors, rate, samples, cpu_share, wall_s, closed_fraction):
    return RunResult(
        kind=kind,
        rate_hz=round(1.0 / period_s, 3),
        competitors=competitors,
        duration_s=wall_s,
        cycles=len(samples["lateness_s"]),
        lateness_s=percentiles(samples["lateness_s"]),
        compute_s=percentiles(samples["compute_s"]),
        missed_cycles=rate.missed_cycles,
        cpu_share=cpu_share,
        rss_mib=current_rss_mib(),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        closed_fraction=closed_fraction,
    )


def run_baseline(config: BmsConfig, duration_s: float, competitors: int) -> RunResult:
    period_s = config.loop.period_s
    rate = RateKeeper(period_s, config.loop.lag_limit_s)
    samples, cpu_share, wall_s = timed_loop(rate, duration_s, lambda t_s, dt_s: None)
    return result("baseline", period_s, competitors, rate, samples, cpu_share, wall_s, None)


def run_loop(config: BmsConfig, duration_s: float, competitors: int) -> RunResult:
    closed_cycles = 0
    with ExitStack() as resources:
        cycle = build_cycle(config, resources, simulate=True)
        rate = RateKeeper(config.loop.period_s, config.loop.lag_limit_s)

        def work(t_s: float, dt_s: float) -> None:
            nonlocal closed_cycles
            status = cycle.run(t_s, dt_s, rate.lagging)
            closed_cycles += status.contactors is ContactorState.CLOSED

        try:
            samples, cpu_share, wall_s = timed_loop(rate, duration_s, work)
        finally:
            if not cycle.open_and_wait(time.monotonic, SHUTDOWN_OPEN_TIMEOUT_S):
                logging.error("contactor feedback did not confirm OPEN")
    closed_fraction = closed_cycles / len(samples["lateness_s"])
    period_s = config.loop.period_s
    return result("loop", period_s, competitors, rate, samples, cpu_share, wall_s, closed_fraction)


def start_competitors(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN_CODE]) for _ in range(count)]
    time.sleep(0.5)  # let them get past interpreter start-up and spin
    return procs


def stop_competitors(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def with_period(config: BmsConfig, period_s: float, channel: str) -> BmsConfig:
    """The config at another loop period, on a virtual CAN channel of its own."""
    return dataclasses.replace(
        config,
        loop=config.loop.model_copy(update={"period_s": period_s}),
        can=config.can.model_copy(update={"channel": channel}),
    )


def ms(value_s: float) -> str:
    return f"{value_s * 1e3:.3f}"


def markdown_table(results: list[RunResult]) -> str:
    header = (
        "| rate Hz | competitors | run | cycles | late p50 ms | late p99 ms | late max ms "
        "| p99 late / baseline | compute p50 ms | compute p99 ms | compute max ms "
        "| missed | CPU % | RSS MiB | peak RSS MiB | closed |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    baselines = {(r.rate_hz, r.competitors): r for r in results if r.kind == "baseline"}
    for r in results:
        base = baselines.get((r.rate_hz, r.competitors))
        ratio = "" if base is None else f"{r.lateness_s['p99'] / base.lateness_s['p99']:.2f}"
        closed = "" if r.closed_fraction is None else f"{r.closed_fraction:.3f}"
        lines.append(
            f"| {r.rate_hz:g} | {r.competitors} | {r.kind} | {r.cycles} "
            f"| {ms(r.lateness_s['p50'])} | {ms(r.lateness_s['p99'])} "
            f"| {ms(r.lateness_s['max'])} | {ratio} "
            f"| {ms(r.compute_s['p50'])} | {ms(r.compute_s['p99'])} | {ms(r.compute_s['max'])} "
            f"| {r.missed_cycles} | {r.cpu_share * 100:.1f} | {r.rss_mib:.1f} "
            f"| {r.peak_rss_mib:.1f} | {closed} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_DIR / "config" / "sim.toml")
    parser.add_argument("--duration-s", type=float, default=60.0, help="length of each run")
    parser.add_argument("--rates", default="100,10", help="loop rates in Hz, comma-separated")
    parser.add_argument(
        "--competitors", type=int, default=1, help="CPU-bound processes in the loaded runs"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-competitor", action="store_true", help="only the idle runs")
    group.add_argument("--competitor-only", action="store_true", help="only the loaded runs")
    parser.add_argument("--json", type=Path, help="also write the figures (in s) to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    rates_hz = [float(rate) for rate in args.rates.split(",")]
    conditions = [0, args.competitors]
    if args.no_competitor:
        conditions = [0]
    elif args.competitor_only:
        conditions = [args.competitors]

    results: list[RunResult] = []
    for competitors in conditions:
        procs = start_competitors(competitors)
        try:
            for rate_hz in rates_hz:
                channel = f"bench-{rate_hz:g}hz-{competitors}c"
                run_config = with_period(config, 1.0 / rate_hz, channel)
                print(f"{rate_hz:g} Hz, {competitors} competitor(s) ...", file=sys.stderr)
                results.append(run_baseline(run_config, args.duration_s, competitors))
                results.append(run_loop(run_config, args.duration_s, competitors))
        finally:
            stop_competitors(procs)

    print(
        f"{args.duration_s:g} s per run, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}\n"
    )
    print(markdown_table(results))
    if args.json:
        environment = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "duration_s": args.duration_s,
        }
        runs = [dataclasses.asdict(r) for r in results]
        args.json.write_text(json.dumps({"environment": environment, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
