"""What a person or a tool reads of a cycle: the status record, its JSON and its console line.

The JSON field names are an interface (tests, the HIL rig and other tools read them); add
fields freely, rename none. Cell numbers count from 1 here, since a person reads them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from bms.types import Estimate, Measurement, PackStatus


def _extreme(values: np.ndarray, pick) -> tuple[float, int | None]:
    """(value, cell number counting from 1) of the NaN-ignoring extreme, or (NaN, None)."""
    if values.size == 0 or np.isnan(values).all():
        return math.nan, None
    index = int(pick(values))
    return float(values[index]), index + 1


def pack_summary(status: PackStatus) -> dict[str, Any]:
    """SOC, cell-voltage and temperature extremes of one status; NaN where nothing is valid."""
    m = status.measurement
    soc = status.soc
    v_min, v_min_cell = _extreme(m.cell_voltage_v, np.nanargmin)
    v_max, v_max_cell = _extreme(m.cell_voltage_v, np.nanargmax)
    t_min, _ = _extreme(m.cell_temp_c, np.nanargmin)
    t_max, _ = _extreme(m.cell_temp_c, np.nanargmax)
    any_soc = not np.isnan(soc).all()
    power_charge_a, power_discharge_a = status.estimate.pack_limits_a(10.0)
    return {
        "soc_min": float(np.nanmin(soc)) if any_soc else math.nan,
        "soc_mean": float(np.nanmean(soc)) if any_soc else math.nan,
        "soc_max": float(np.nanmax(soc)) if any_soc else math.nan,
        "soc_std_max": float(np.max(status.estimate.soc_std)),
        "power_charge_10s_a": power_charge_a,
        "power_discharge_10s_a": power_discharge_a,
        "cell_voltage_min_v": v_min,
        "cell_voltage_min_cell": v_min_cell,
        "cell_voltage_max_v": v_max,
        "cell_voltage_max_cell": v_max_cell,
        "temp_min_c": t_min,
        "temp_max_c": t_max,
    }


def status_record(
    status: PackStatus,
    start_s: float,
    cycle_time_mean_s: float,
    cycle_time_max_s: float,
    missed_cycles: int,
) -> dict[str, Any]:
    """The status as plain data, for ``--status-format json`` and the console line.

    ``t_s`` is counted from ``start_s`` (the loop's start on the monotonic clock).
    """
    m = status.measurement
    return {
        "t_s": round(status.t_s - start_s, 3),
        "contactors": status.contactors.value,
        **pack_summary(status),
        "current_a": m.current_a,
        "pack_voltage_v": m.pack_voltage_v,
        "link_voltage_v": m.link_voltage_v,
        "charge_limit_a": status.charge_limit_a,
        "discharge_limit_a": status.discharge_limit_a,
        "faults": list(status.active_faults),
        "latched": list(status.latched_faults),
        "balancing": (
            []
            if status.balancing is None
            else [int(i) + 1 for i in np.flatnonzero(status.balancing)]
        ),
        "stale": list(m.stale_groups),
        "frame_errors": m.frame_errors,
        **health_summary(status.health),
        "cycle_time_mean_s": cycle_time_mean_s,
        "cycle_time_max_s": cycle_time_max_s,
        "missed_cycles": missed_cycles,
    }


def _plain(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 6) for v in values]


def sample_record(m: Measurement, estimate: Estimate, active_faults) -> dict[str, Any]:
    """What the cycle saw, as JSON-ready data (NaN as null): the snapshot a fault log row
    keeps of the sample that tripped it."""
    scalars = {
        "current_a": m.current_a,
        "redundant_current_a": m.redundant_current_a,
        "pack_voltage_v": m.pack_voltage_v,
        "link_voltage_v": m.link_voltage_v,
        "insulation_kohm": m.insulation_kohm,
    }
    return {
        "t_s": round(m.t_s, 3),
        "cell_voltage_v": _plain(m.cell_voltage_v),
        "cell_temp_c": _plain(m.cell_temp_c),
        **{k: None if math.isnan(v) else round(v, 6) for k, v in scalars.items()},
        "stale": list(m.stale_groups),
        "soc": _plain(estimate.soc),
        "active_faults": list(active_faults),
    }


def health_summary(health) -> dict[str, Any]:
    """The weakest cell's state of health (bms.health.service.PackHealth, or None): SOH as a
    fraction of nominal and its cell (counting from 1), the largest resistance growth."""
    if health is None:
        return {"soh_min": math.nan, "soh_min_cell": None, "resistance_growth_max": math.nan}
    soh, soh_cell = _extreme(health.soh, np.nanargmin)
    growth, _ = _extreme(health.resistance_growth, np.nanargmax)
    return {"soh_min": soh, "soh_min_cell": soh_cell, "resistance_growth_max": growth}


def to_json(record: dict[str, Any]) -> str:
    """One line of JSON; NaN (not valid JSON) becomes null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    return json.dumps(clean, separators=(",", ":"))


def _num(value: float | None, fmt: str) -> str:
    return "--" if value is None or math.isnan(value) else format(value, fmt)


def to_line(r: dict[str, Any]) -> str:
    """The human console line."""
    faults = ",".join(r["faults"]) or "-"
    latched = ",".join(r["latched"]) or "-"
    return (
        f"t={r['t_s']:7.1f}s "
        f"SOC {_num(r['soc_min'] * 100, '.1f')}/{_num(r['soc_mean'] * 100, '.1f')}/"
        f"{_num(r['soc_max'] * 100, '.1f')}% ±{_num(r['soc_std_max'] * 100, '.1f')} | "
        f"V {_num(r['cell_voltage_min_v'], '.3f')} (c{r['cell_voltage_min_cell'] or '-'})"
        f"..{_num(r['cell_voltage_max_v'], '.3f')} (c{r['cell_voltage_max_cell'] or '-'}) | "
        f"I {_num(r['current_a'], '+.2f')} A | "
        f"T {_num(r['temp_min_c'], '.1f')}..{_num(r['temp_max_c'], '.1f')} C | "
        f"{r['contactors']:<9} | "
        f"limits +{r['charge_limit_a']:.1f}/-{r['discharge_limit_a']:.1f} A | "
        f"bal {len(r['balancing'])} | faults {faults} | latched {latched} | "
        f"cycle {r['cycle_time_mean_s'] * 1e3:.2f}/{r['cycle_time_max_s'] * 1e3:.2f} ms "
        f"missed {r['missed_cycles']}"
    )
