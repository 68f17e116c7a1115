"""Config loading: the example loads; every kind of mistake is named with file, section, option."""

from __future__ import annotations

import pytest

from bms.config import ConfigError, load_config
from tests.conftest import SIM_CONFIG, run_bms


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_example_sim_config_loads_with_its_backends():
    config = load_config(SIM_CONFIG)
    assert config.pack.n_cells == 16
    assert config.loop.period_s == 0.1
    assert config.frontend.name == "can"
    assert type(config.frontend.options).__name__ == "CanFrontEndOptions"
    assert config.sim is not None and config.sim.options.load.profile == "drive_cycle"
    assert config.can.dbc_file.is_file()


def test_unknown_option_names_file_section_and_nearest_name(make_config):
    path = make_config({"protection": {"stuck_time": 4.0}})
    (problem,) = problems_of(path)
    assert problem.startswith(str(path))
    assert "[protection] stuck_time: unknown option" in problem
    assert "did you mean 'stuck_time_s'?" in problem


def test_unknown_option_in_a_backend_section_suggests_the_backend_option(make_config):
    (problem,) = problems_of(make_config({"frontend": {"pack_timeout": 0.5}}))
    assert "[frontend] pack_timeout: unknown option (did you mean 'pack_timeout_s'?)" in problem


def test_unknown_option_in_a_nested_sim_section(make_config):
    (problem,) = problems_of(make_config({"sim": {"load": {"curent_a": -3.0}}}))
    assert "[sim.load] curent_a: unknown option (did you mean 'current_a'?)" in problem


def test_missing_required_option_and_section(make_config):
    problems = problems_of(make_config({"pack": {"n_cells": None}, "protection": None}))
    assert any("[pack] n_cells: required option is missing" in p for p in problems)
    assert any("[protection]: required section is missing" in p for p in problems)


def test_wrong_type_and_out_of_range_say_what_was_given(make_config):
    problems = problems_of(make_config({"loop": {"period_s": "fast"}, "pack": {"n_cells": 0}}))
    assert any("[loop] period_s:" in p and "'fast'" in p for p in problems)
    assert any("[pack] n_cells:" in p and "greater than or equal to 1" in p for p in problems)


def test_limit_sets_are_validated_and_named(make_config, make_limits):
    limits = make_limits({"cell_voltage_high_v": {"mol": 4.22}})
    (problem,) = problems_of(make_config({"protection": {"limits": str(limits)}}))
    assert problem.startswith(f"{limits}: [cell_voltage_high_v]")
    assert "must rise mol < rsl < msl (got 4.22, 4.2, 4.25)" in problem
    limits = make_limits({"temp_high_discharge_c": {"msl": 140.0}, "charge_current_a": None})
    problems = problems_of(make_config({"protection": {"limits": str(limits)}}))
    assert any("[charge_current_a]: required section is missing" in p for p in problems)
    limits = make_limits({"temp_high_discharge_c": {"msl": 140.0}})
    (problem,) = problems_of(make_config({"protection": {"limits": str(limits)}}))
    assert "temp_high_discharge_c.msl = 140 is outside -40..120" in problem
    limits = make_limits({"temp_low_charge_c": {"mol": 50.0, "rsl": 49.0, "msl": 48.0}})
    (problem,) = problems_of(make_config({"protection": {"limits": str(limits)}}))
    assert "temp_low_charge_c.mol must be below temp_high_charge_c.mol" in problem


def test_diagnosis_rows_are_checked(make_config):
    rows = {"cell_voltage_high_msll": {"open_delay_s": 1.0}}
    (problem,) = problems_of(make_config({"diagnosis": {"rows": rows}}))
    assert "no fault 'cell_voltage_high_msll' (did you mean 'cell_voltage_high_msl'?)" in problem
    rows = {"cell_voltage_high_msl": {"enabled": False}}
    (problem,) = problems_of(make_config({"diagnosis": {"rows": rows}}))
    assert "cell_voltage_high_msl keeps the contactors open and cannot be disabled" in problem
    rows = {"cell_voltage_high_mol": {"enabled": False, "debounce_cycles": 7}}
    config = load_config(make_config({"diagnosis": {"rows": rows}}))
    assert config.diagnosis.row("cell_voltage_high_mol").debounce_cycles == 7
    assert config.diagnosis.row("cell_voltage_high_msl").open_delay_s == 0.5


def test_unknown_backend_is_an_error_with_the_known_names(make_config):
    (problem,) = problems_of(make_config({"frontend": {"backend": "cann"}}))
    assert "[frontend] backend: unknown backend 'cann' (did you mean 'can'?)" in problem
    assert "known: bq76952, can, jbd" in problem


def test_missing_file_relative_to_the_config_is_named(make_config):
    (problem,) = problems_of(make_config({"can": {"dbc_file": "nowhere.dbc"}}))
    assert "[can] dbc_file" in problem and "nowhere.dbc" in problem


def test_unknown_fault_kind_in_sim_schedule(make_config):
    faults = [{"kind": "melt", "at_s": 1.0}]
    (problem,) = problems_of(make_config({"sim": {"faults": faults}}))
    assert "[sim.faults] kind" in problem and "open_wire" in problem


def test_broken_toml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[pack\nn_cells = 3\n")
    (problem,) = problems_of(broken)
    assert problem.startswith(f"{broken}: not valid TOML")
    (problem,) = problems_of(tmp_path / "absent.toml")
    assert "cannot read" in problem


def test_check_config_cli_prints_resolved_config_or_errors(make_config):
    good = run_bms("check-config", str(make_config()))
    assert good.returncode == 0, good.stderr
    assert '"n_cells": 16' in good.stdout and '"backend": "can"' in good.stdout
    bad = run_bms("check-config", str(make_config({"soc": {"rest_time": 10}})))
    assert bad.returncode == 2
    assert "[soc] rest_time: unknown option (did you mean 'rest_time_s'?)" in bad.stderr


def test_scheduled_fault_on_a_cell_outside_the_pack_fails_at_load(make_config):
    faults = [{"kind": "open_wire", "at_s": 1.0, "cell": 17}]
    (problem,) = problems_of(make_config({"sim": {"faults": faults}}))
    assert "[sim.faults]" in problem and "cell 17 is not in the pack (1..16)" in problem


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"control": {"precharge_ratio": 0.5}}, "[control] precharge_ratio"),
        ({"loop": {"period_s": 0.1, "stall_limit_s": 0.1}}, "stall_limit_s must be longer"),
        (
            {"protection": {"short_circuit_current_a": 30.0}},
            "[protection] short_circuit_current_a: must be above the limit set's highest "
            "current (30 A for 1 cell(s) in parallel)",
        ),
        ({"protection": {"stuck_min_current_a": 0.0}}, "[protection] stuck_min_current_a"),
    ],
)
def test_settings_that_would_weaken_protection_are_refused(make_config, changes, expected):
    problems = problems_of(make_config(changes))
    assert any(expected in p for p in problems), problems
