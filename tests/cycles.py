"""A 4-cell ControlCycle over the fakes with a real latch file and store paths, for tests of
clearing, reloading and persistence."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import tomli_w

from bms.config import load_config
from bms.estimation.cell_params import load_cell_params
from bms.loop import ControlCycle
from bms.store.latches import LatchStore
from tests.conftest import control_socket_path, merge, sim_config_data
from tests.fakes import FakeBox, FakeFrontEnd, FakePublisher

PERIOD_S = 0.1


def write_config(tmp_path: Path, changes: dict | None = None, name: str = "c.toml") -> Path:
    data = merge(
        sim_config_data(),
        {
            "pack": {"n_cells": 4, "n_temp_sensors": 2},
            "can": {"channel": f"cycles-{uuid.uuid4().hex[:8]}"},
            "protection": {"latch_file": str(tmp_path / "latched.json")},
            "store": {"path": str(tmp_path / "store.sqlite")},
            "service": {"control_socket": str(control_socket_path())},
        },
    )
    data = merge(data, changes or {})
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


class LinkFrontEnd(FakeFrontEnd):
    """The fake front-end, with a DC-link voltage of its own (None: the pack voltage)."""

    link_v: float | None = None

    def read(self, t_s):
        m = super().read(t_s)
        if self.link_v is not None:
            m = dataclasses.replace(m, link_voltage_v=self.link_v)
        return m


def make_cycle(
    tmp_path: Path, changes: dict | None = None, latch_file: bool = True, recorder=None
) -> ControlCycle:
    config = load_config(write_config(tmp_path, changes))
    frontend = LinkFrontEnd(4)
    box = FakeBox(frontend.calls)
    publisher = FakePublisher(frontend.calls)
    store = LatchStore(config.protection.latch_file) if latch_file else None
    return ControlCycle(
        config,
        load_cell_params(config.pack.cell_params),
        frontend,
        box,
        publisher,
        store,
        recorder,
    )


def run(cycle: ControlCycle, cycles: int, t0_s: float = 0.0):
    status = None
    for n in range(cycles):
        status = cycle.run(t0_s + n * PERIOD_S, PERIOD_S, lagging=False)
    return status
