"""An NTC thermistor by its beta equation: R(T) = R25 * exp(B * (1/T - 1/T25)), T in kelvin.

The rig sets a temperature by setting the resistance the board's NTC would have (the
thermistor emulator), and the virtual board reads it back the same way. The beta equation is
the datasheet's two-point fit (B25/85 or B25/50): within about a degree of the real curve
between 0 and 85 degC, which is what a rig test at a few temperatures needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KELVIN = 273.15
T25_K = 25.0 + KELVIN


@dataclass(frozen=True, slots=True)
class Ntc:
    r25_ohm: float
    beta_k: float

    def resistance_ohm(self, temp_c: float) -> float:
        return self.r25_ohm * math.exp(self.beta_k * (1.0 / (temp_c + KELVIN) - 1.0 / T25_K))

    def temp_c(self, resistance_ohm: float) -> float:
        """The temperature at ``resistance_ohm``; NaN for a resistance no NTC has (<= 0)."""
        if not resistance_ohm > 0.0:
            return math.nan
        inverse_k = 1.0 / T25_K + math.log(resistance_ohm / self.r25_ohm) / self.beta_k
        return 1.0 / inverse_k - KELVIN
