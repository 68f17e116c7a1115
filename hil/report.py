"""Every figure a rig run measures, with its limits and verdict: a CSV row each (written as it
is measured, so a run that dies keeps what it had), a property in the JUnit XML, and the
reaction-time table printed at the end of the run.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = ("test", "figure", "value", "unit", "low", "high", "passed", "rig", "utc")


@dataclass(frozen=True, slots=True)
class Figure:
    test: str
    name: str
    value: float
    unit: str
    low: float | None
    high: float | None

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return self.low is None and self.high is None
        return (self.low is None or self.value >= self.low) and (
            self.high is None or self.value <= self.high
        )

    def describe(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f">= {self.low:.6g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:.6g}")
        limit = f" (must be {' and '.join(bounds)})" if bounds else ""
        return f"{self.name} = {self.value:.6g} {self.unit}{limit}"


@dataclass(frozen=True, slots=True)
class Reaction:
    """One protection reaction: the fault, what the rig did, how long the opening took, and
    the configured chain it must fit."""

    fault_id: str
    cause: str
    measured_s: float
    configured_s: float
    low_s: float
    high_s: float


class Report:
    def __init__(self, directory: Path, rig_name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.rig_name = rig_name
        self.csv_path = directory / "figures.csv"
        self.figures: list[Figure] = []
        self.reactions: list[Reaction] = []
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow(
                (
                    figure.test,
                    figure.name,
                    f"{figure.value:.6g}",
                    figure.unit,
                    "" if figure.low is None else f"{figure.low:.6g}",
                    "" if figure.high is None else f"{figure.high:.6g}",
                    int(figure.passed),
                    self.rig_name,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                )
            )

    def reaction_table(self) -> list[str]:
        """The issue's report: measured reaction per fault against its configured delays."""
        if not self.reactions:
            return []
        lines = [
            f"{'fault':<28} {'cause':<34} {'measured':>9} {'configured':>10} {'window':>14}",
        ]
        for r in self.reactions:
            window = f"{r.low_s:.2f}..{r.high_s:.2f} s"
            lines.append(
                f"{r.fault_id:<28} {r.cause:<34} {r.measured_s:>7.3f} s {r.configured_s:>8.2f} s "
                f"{window:>14}"
            )
        return lines
