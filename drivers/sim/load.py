"""Load profiles: the current the load draws from the pack (positive = charging)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class LoadProfileError(ValueError):
    """A drive-cycle file that cannot be used."""


def constant(current_a: float):
    return lambda t_s: current_a


def pulse(current_a: float, period_s: float, duty: float):
    """``current_a`` for the first ``duty`` of every period, zero for the rest."""
    return lambda t_s: current_a if (t_s % period_s) < duty * period_s else 0.0


def drive_cycle(path: Path, scale: float):
    """A CSV of ``time_s,current_a`` (``#`` comments and a header allowed), repeated forever
    and interpolated linearly, its current multiplied by ``scale``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
        time_s = np.array([float(row["time_s"]) for row in rows])
        current_a = np.array([float(row["current_a"]) for row in rows]) * scale
    except (OSError, ValueError, TypeError) as exc:
        raise LoadProfileError(f"{path}: cannot read drive cycle: {exc}") from None
    except KeyError as exc:
        raise LoadProfileError(f"{path}: drive cycle lacks column {exc}") from None
    if time_s.size < 2 or np.any(np.diff(time_s) <= 0) or np.isnan(current_a).any():
        raise LoadProfileError(
            f"{path}: a drive cycle needs at least two rows, rising time_s and no empty current"
        )
    duration_s = time_s[-1] - time_s[0]
    return lambda t_s: float(np.interp(time_s[0] + t_s % duration_s, time_s, current_a))
