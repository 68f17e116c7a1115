"""Charge and energy throughput of the pack, and the equivalent full cycles it amounts to."""

from __future__ import annotations

import math
from dataclasses import dataclass

SECONDS_PER_HOUR = 3600.0


@dataclass(slots=True)
class Throughput:
    """Running totals, each a positive magnitude; one equivalent full cycle is one nominal
    capacity discharged (``capacity_ah``: of the pack, all parallel cells together)."""

    capacity_ah: float
    charged_ah: float = 0.0
    discharged_ah: float = 0.0
    charged_wh: float = 0.0
    discharged_wh: float = 0.0

    def add(self, current_a: float, pack_voltage_v: float, dt_s: float) -> None:
        """One cycle of ``current_a`` (positive charging) at ``pack_voltage_v``; a NaN
        current counts nothing (the time is lost, not guessed), a NaN voltage no energy."""
        if math.isnan(current_a):
            return
        charge_ah = current_a * dt_s / SECONDS_PER_HOUR
        energy_wh = 0.0 if math.isnan(pack_voltage_v) else charge_ah * pack_voltage_v
        if charge_ah >= 0.0:
            self.charged_ah += charge_ah
            self.charged_wh += energy_wh
        else:
            self.discharged_ah -= charge_ah
            self.discharged_wh -= energy_wh

    @property
    def equivalent_full_cycles(self) -> float:
        return self.discharged_ah / self.capacity_ah
