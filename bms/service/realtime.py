"""Optional real-time set-up of the loop thread: CPU affinity, SCHED_FIFO, a frozen heap.

Each step is skipped with a log line where the system does not permit it (no CAP_SYS_NICE, a
CPU that does not exist, a platform without the call): a BMS that cannot get real-time
scheduling still runs, and its loop timing shows what that costs.
"""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)


def set_up_loop_thread(priority: int, cpus: list[int]) -> list[str]:
    """Call from the loop thread, after the helper threads have started: Linux applies
    affinity and policy to the calling thread only (pid 0), so the writer, logger and
    control threads keep normal scheduling. Returns what was applied, for the log."""
    applied = []
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
            applied.append(f"CPUs {cpus}")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("CPU affinity %s skipped: %s", cpus, exc)
    if priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            applied.append(f"SCHED_FIFO {priority}")
        except (OSError, AttributeError) as exc:
            log.warning(
                "SCHED_FIFO priority %d skipped (needs CAP_SYS_NICE or an rtprio limit): %s",
                priority,
                exc,
            )
    return applied


def freeze_heap() -> None:
    """Collect once, then move everything alive after warm-up (modules, compiled kernels,
    the config) out of the collector's reach, so later collections are short."""
    gc.collect()
    gc.freeze()
