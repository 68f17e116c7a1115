"""What every config run in the qemu guest changes from config/sim.toml.

The guest runs 15-40 times slower than the host (which may itself be shared), so the pack is
small (fewer frames to encode and decode), the loop and the plant run at 5 Hz, and the
timeouts are long: a late frame or a late wake-up must not pass for a fault. What the guest's
tests check (closing, the values, a latch, systemd's view of the service) depends on none of
them. Plain data, so the host side and the guest's tests both import it.
"""

SLOW_GUEST_CONFIG = {
    "pack": {"n_cells": 6, "n_temp_sensors": 5},
    "loop": {"period_s": 0.2, "lag_limit_s": 0.5, "stall_limit_s": 5.0},
    "frontend": {
        "cell_voltage_timeout_s": 5.0,
        "temperature_timeout_s": 5.0,
        "pack_timeout_s": 5.0,
    },
    "contactors": {"frame_timeout_s": 5.0},
    "control": {"relay_settle_s": 3.0, "precharge_timeout_s": 20.0},
    "sim": {
        "tx_period_s": 0.2,
        "deadman_timeout_s": 5.0,
        # A small load: here the cell frames and the pack frame of one plant step may reach
        # the BMS in different cycles, and when the current steps (at closing) that torn
        # sample moves the SOC estimate by the voltage step over the OCV slope, for good (at
        # 10 A, 0.2 V: 28 % of SOC). At 1 A through about 20 mOhm it is 20 mV, 3 % of SOC.
        "load": {"profile": "constant", "current_a": -1.0},
    },
}
