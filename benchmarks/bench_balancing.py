"""How fast passive balancing closes the spread of the simulated pack, in simulated time.

The plant (drivers/sim/plant.py) and the BMS's own pieces (the ECM + EKF estimator and the
balancer) are stepped together at 1 s without CAN or real time, so hours of balancing take
seconds. The pack rests with its contactors open (the load is off), which is when a pack is
balanced most often. As in the loop, the estimator is given each bleeding cell's current
(``[balancing] bleed_resistance_ohm``); with ``--unmodelled-bleed`` it sees only the pack
current, and the charge a cell bleeds reaches its SOC estimate only through its voltage (the
EKF's update) and the OCV re-initialisation after ``[soc] rest_time_s`` of rest.

    .venv/bin/python benchmarks/bench_balancing.py [--hours 12] [--spread 0.02]
        [--unmodelled-bleed]

Prints the true spreads against time: SOC (what the balancer equalises, with the nominal
capacity it knows), rested voltage, and charge-to-full (what top balancing is for, which the
cells' real capacity differences keep apart), and when the SOC spread fell below the
balancer's stop threshold (stop_delta_ah of the nominal capacity).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bms.config import load_config
from bms.estimation.cell_params import load_cell_params
from bms.estimation.estimator import PackEstimator
from bms.protection.balancing import Balancer, bleed_current_a
from bms.types import ALL_OPEN
from drivers.sim.plant import PackPlant

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "sim.toml"))
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--spread", type=float, default=0.02, help="initial SOC std deviation")
    parser.add_argument(
        "--unmodelled-bleed",
        action="store_true",
        help="do not tell the estimator the bleed current (as without bleed_resistance_ohm)",
    )
    args = parser.parse_args()
    config = load_config(args.config)
    cell = load_cell_params(config.pack.cell_params)
    n_cells = config.pack.n_cells
    options = config.sim.options.model_copy(update={"initial_soc_spread": args.spread})
    plant = PackPlant(cell, n_cells, config.pack.n_temp_sensors, options)
    estimator = PackEstimator(
        cell, n_cells, config.pack.n_temp_sensors, config.soc.rest_current_a, config.soc.rest_time_s
    )
    balancer = Balancer(config.balancing, n_cells, cell.capacity_ah)
    resistance_ohm = None if args.unmodelled_bleed else config.balancing.bleed_resistance_ohm
    dt_s = 1.0
    stop_soc = config.balancing.stop_delta_ah / cell.capacity_ah
    print(
        f"{n_cells} cells, {cell.capacity_ah:g} Ah, bleed {options.bleed_resistance_ohm:g} ohm, "
        f"duty {config.balancing.max_duty:g}, SOC std {args.spread:g}, rest "
        f"re-initialisation after {config.soc.rest_time_s:g} s, bleed current given to the "
        f"estimator: {'no' if resistance_ohm is None else f'yes ({resistance_ohm:g} ohm)'}\n"
    )
    print(
        "| time h | SOC spread % | rested voltage spread mV | charge-to-full spread mAh "
        "| cells bleeding |"
    )
    print("|---|---|---|---|---|")
    converged_h = None
    steps = int(args.hours * 3600 / dt_s)
    for step in range(steps + 1):
        t_s = step * dt_s
        readings = plant.readings()
        estimate = estimator.step(
            readings.current_a,
            readings.cell_voltage_v,
            readings.cell_temp_c,
            dt_s,
            bleed_current_a(plant.bleeding, readings.cell_voltage_v, resistance_ohm),
        )
        allowed = balancer.allowed(
            readings.cell_voltage_v,
            readings.cell_temp_c,
            readings.current_a,
            config.soc.rest_current_a,
            False,
        )
        plant.bleeding = balancer.update(
            t_s, estimate.soc, readings.cell_voltage_v, allowed, soc_std=estimate.soc_std
        )
        plant.step(dt_s, 0.0, ALL_OPEN)
        soc_spread = float(plant.soc.max() - plant.soc.min())
        if converged_h is None and soc_spread < stop_soc:
            converged_h = t_s / 3600
        if step % int(3600 / dt_s) == 0:
            ocv_v = cell.ocv_at(plant.soc)
            to_full_mah = (1.0 - plant.soc) * plant.capacity_ah * 1000
            print(
                f"| {t_s / 3600:.0f} | {soc_spread * 100:.2f} "
                f"| {(ocv_v.max() - ocv_v.min()) * 1e3:.1f} "
                f"| {to_full_mah.max() - to_full_mah.min():.0f} "
                f"| {int(balancer.selected.sum())} |"
            )
    verdict = "not reached" if converged_h is None else f"reached after {converged_h:.1f} h"
    print(f"\nSOC spread below {stop_soc * 100:.2f} % (stop_delta_ah): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
