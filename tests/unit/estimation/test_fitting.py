"""Identification gives back the parameters a synthetic cell was made with, and names what is
wrong with data it cannot use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bms.estimation.fitting import FitError, fit_hppc, fit_ocv, impedance_grid
from tests.unit.estimation.synthetic import hppc_test, ocv_test, profile, run


@pytest.fixture(scope="module")
def ocv_fit(generic):
    return fit_ocv(ocv_test(generic))


def test_capacity_and_ocv_come_back_from_a_slow_test(generic, ocv_fit):
    assert ocv_fit.capacity_ah == pytest.approx(generic.capacity_ah, rel=2e-3)
    assert ocv_fit.voltage_max_v == 4.2
    inner = (ocv_fit.soc >= 0.05) & (ocv_fit.soc <= 0.95)
    error_v = ocv_fit.ocv_v - generic.ocv_at(ocv_fit.soc)
    assert np.abs(error_v[inner]).max() < 3e-3
    assert np.all(np.diff(ocv_fit.ocv_v) > 0)
    # The half-gap is the C/20 drop over R0 + R1 + R2 (45 mOhm at 0.25 A), not hysteresis.
    assert ocv_fit.hysteresis_v == pytest.approx(0.25 * 0.045, rel=0.15)


@pytest.mark.parametrize("temp_c", [0.0, 25.0])
def test_pulse_fits_recover_the_impedance(generic, ocv_fit, temp_c):
    fit = fit_hppc(hppc_test(generic, temp_c), ocv_fit)
    assert len(fit.pulses) == 9 and fit.temp_c == temp_c
    for pulse in fit.pulses:
        true = generic.impedance_at(pulse.soc, temp_c)
        assert pulse.r0_ohm == pytest.approx(true["r0_ohm"], rel=0.03)
        assert pulse.r1_ohm == pytest.approx(true["r1_ohm"], rel=0.15)
        assert pulse.r1_ohm * pulse.c1_f == pytest.approx(true["r1_ohm"] * true["c1_f"], rel=0.15)
        assert pulse.r2_ohm == pytest.approx(true["r2_ohm"], rel=0.15)
        assert pulse.rms_v < 2e-3  # the last window steps into low SOC, where R rises
    assert fit.pulses[0].soc == pytest.approx(1.0, abs=0.01)


def test_fast_pulses_are_left_out_of_the_impedance_table(generic, ocv_fit):
    """A test with 3C and 6C pulse pairs before each 1C pair (for state of power) fits the
    1C ones only: one pulse per level, not three."""
    gentle = fit_hppc(hppc_test(generic, 25.0), ocv_fit)
    mixed = fit_hppc(hppc_test(generic, 25.0, fast_c_rates=(3.0, 6.0)), ocv_fit)
    assert len(mixed.pulses) == len(gentle.pulses) == 9
    for pulse in mixed.pulses:
        true = generic.impedance_at(pulse.soc, 25.0)
        assert pulse.r0_ohm == pytest.approx(true["r0_ohm"], rel=0.03)


def test_only_fast_pulses_are_named(generic, ocv_fit):
    capacity_ah = generic.capacity_ah
    steps = [(600, 0.0)] + [
        (30, -5.0 * capacity_ah),
        (600, 0.0),
        (720, -0.5 * capacity_ah),
        (3600, 0.0),
    ] * 4
    data = run(generic, "fast", 1.0, *profile(steps, 1.0), 25.0)
    with pytest.raises(FitError, match=r"at up to 1\.5C"):
        fit_hppc(data, ocv_fit)


def test_tests_at_several_temperatures_make_one_grid(generic, ocv_fit):
    fits = [fit_hppc(hppc_test(generic, t, dt_s=2.0), ocv_fit) for t in (40.0, 0.0)]
    soc, temps, table = impedance_grid(fits)
    assert temps.tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
    assert table.shape == (9, soc.size, 5)
    assert np.all(table[0, :, 0] > 2 * table[-1, :, 0])  # R0 cold > warm
    # Rows between the tests follow Arrhenius, as the generic cell's own tables do.
    for k, temp_c in enumerate(temps):
        true_r0 = [generic.impedance_at(s, temp_c)["r0_ohm"] for s in soc[1:-1]]
        assert table[k, 1:-1, 0] == pytest.approx(true_r0, rel=0.05)
    with pytest.raises(FitError, match="same temperature"):
        impedance_grid([fits[0], fits[0]])


def test_inverted_current_sign_is_named(generic):
    data = ocv_test(generic)
    flipped = dataclasses.replace(data, current_a=-data.current_a)
    with pytest.raises(FitError, match="sign looks inverted"):
        fit_ocv(flipped)


def test_holes_and_backwards_time_are_named(generic, ocv_fit):
    data = hppc_test(generic, 25.0, dt_s=2.0)
    keep = np.ones(data.time_s.size, dtype=bool)
    keep[1000:1400] = False  # 800 s missing
    holed = dataclasses.replace(
        data, **{f: getattr(data, f)[keep] for f in ("time_s", "current_a", "voltage_v", "temp_c")}
    )
    with pytest.raises(FitError, match="a gap of 802 s"):
        fit_hppc(holed, ocv_fit)
    time_s = data.time_s.copy()
    time_s[50] = time_s[49]
    with pytest.raises(FitError, match="does not rise at sample 50"):
        fit_hppc(dataclasses.replace(data, time_s=time_s), ocv_fit)


def test_pulse_tests_without_rests_or_pulses_are_named(generic, ocv_fit):
    data = hppc_test(generic, 25.0, dt_s=2.0)
    rest = np.abs(data.current_a) < 0.01
    no_rests = dataclasses.replace(data, current_a=np.where(rest, -0.5, data.current_a))
    with pytest.raises(FitError, match="found 0 discharge pulse"):
        fit_hppc(no_rests, ocv_fit)
    cut = data.time_s < 9000  # two SOC steps only
    short = dataclasses.replace(
        data, **{f: getattr(data, f)[cut] for f in ("time_s", "current_a", "voltage_v", "temp_c")}
    )
    with pytest.raises(FitError, match="found 2 discharge pulse"):
        fit_hppc(short, ocv_fit)
    idle = dataclasses.replace(data, current_a=np.zeros(data.time_s.size))
    with pytest.raises(FitError, match="not a pulse test"):
        fit_hppc(idle, ocv_fit)


def test_a_fast_discharge_is_not_an_ocv_test(generic):
    with pytest.raises(FitError, match=r"the discharge lasts 0.2 h; an OCV test"):
        fit_ocv(hppc_test(generic, 25.0, dt_s=5.0))
    data = ocv_test(generic)
    with pytest.raises(FitError, match="found no charge"):
        fit_ocv(dataclasses.replace(data, current_a=np.minimum(data.current_a, 0.0)))
