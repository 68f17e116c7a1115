"""The health service as the loop feeds it: a held-out physics check-up, sample by sample."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.config import SocConfig
from bms.estimation.cell_params import load_cell_params
from bms.health.online import ANCHOR_REST_S, REST_C_RATE
from bms.health.runner import SohModel
from bms.health.service import HealthService, _Charge
from bms.replay import read_log, replay
from tests.conftest import REPO

PARAMS = REPO / "models" / "soh" / "okane2022_spm"
MODEL = REPO / "models" / "soh" / "soh_int8.tflite"
SAMPLE = REPO / "tests" / "data" / "soh" / "t21_checkup20.csv"


def true_capacity_ah() -> float:
    import json

    truth = json.loads((REPO / "tests" / "data" / "soh" / "truth.json").read_text())
    return truth["files"][SAMPLE.name]["capacity_true_ah"]


def feed(service: HealthService, cell, n_cells: int) -> None:
    """The check-up through the service, every cell the same log, with the EKF's SOC as the
    loop would have it (resting below the online estimator's C/100)."""
    log = read_log(SAMPLE)
    soc_config = SocConfig(rest_current_a=REST_C_RATE * cell.capacity_ah, rest_time_s=ANCHOR_REST_S)
    estimate = replay(cell, log, soc_config=soc_config)
    for k in range(log["time_s"].size):
        service.take(
            float(log["time_s"][k]),
            float(log["current_a"][k]),
            np.full(n_cells, log["voltage_v"][k]),
            np.full(n_cells, log["temp_c"][k]),
            np.full(n_cells, estimate.soc[k]),
            np.full(n_cells, estimate.soc_std[k]),
        )


def test_a_check_up_gives_every_cell_an_online_and_a_model_capacity():
    cell = load_cell_params(PARAMS)
    service = HealthService(cell, 2, model=SohModel.load(MODEL))
    feed(service, cell, 2)
    health = service.latest
    truth_ah = true_capacity_ah()
    assert health.capacity_ml_ah == pytest.approx([truth_ah] * 2, rel=0.03)
    assert health.capacity_online_ah == pytest.approx([truth_ah] * 2, rel=0.03)
    assert np.all(health.capacity_ml_std_ah > 0) and np.all(health.capacity_online_std_ah > 0)
    assert np.all(health.soh == health.capacity_online_ah / cell.capacity_ah)
    assert not health.disagree.any()


def test_without_a_model_the_online_estimate_still_comes():
    cell = load_cell_params(PARAMS)
    service = HealthService(cell, 1, model=None)
    feed(service, cell, 1)
    assert math.isnan(service.latest.capacity_ml_ah[0])
    assert service.latest.capacity_online_ah[0] == pytest.approx(true_capacity_ah(), rel=0.03)


def test_an_ml_and_online_capacity_far_apart_is_flagged():
    cell = load_cell_params(PARAMS)
    service = HealthService(cell, 1, model=SohModel.load(MODEL))
    feed(service, cell, 1)
    online_ah = service.latest.capacity_online_ah[0]
    service._ml_ah[0], service._ml_std_ah[0] = online_ah * 0.8, 0.01  # a model gone wrong
    service._publish()
    assert service.latest.disagree.tolist() == [True]


def test_the_loop_never_waits_and_offers_once_per_period(monkeypatch):
    monkeypatch.setattr("bms.health.service.QUEUE_SAMPLES", 100)
    cell = load_cell_params(PARAMS)
    service = HealthService(cell, 1, sample_period_s=1.0)  # not started: nothing drains
    cells = np.array([3.7])
    for k in range(3000):
        service.offer(k * 0.1, -1.0, cells, cells, cells, cells)
    assert service._samples.qsize() + service.dropped_samples == 300
    assert service.dropped_samples == 200  # the queue holds 100; the loop never waited


def test_a_long_charge_is_thinned_not_grown_without_bound(monkeypatch):
    monkeypatch.setattr("bms.health.service.MAX_SEGMENT_BYTES", 4 * 6 * 100)  # 100 rows, 2 cells
    charge = _Charge(2)
    for k in range(1000):
        charge.add(float(k), 5.0, np.array([3.7, 3.8]), np.array([25.0, 26.0]))
    assert charge.count <= charge.capacity == 100
    time_s, _, voltage_v, _ = charge.columns(2)
    assert time_s[0] == 0.0 and time_s[-1] >= 1000.0 - charge.stride  # the whole charge
    spacing = np.diff(time_s)
    assert charge.stride > 1 and np.all((spacing > 0) & (spacing <= charge.stride))
    assert voltage_v[:, 1] == pytest.approx(3.8)
