"""The rig config: validated like the BMS config, one line per problem naming the file, the
section and the option; the wiring checked against itself and against the board's pack."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from bms.config import load_config
from hil.config import RigConfigError, check_against_board, load_rig_config

RIGS = Path(__file__).resolve().parent.parent / "rigs"
VIRTUAL = RIGS / "virtual.toml"
BENCH = RIGS / "bench.example.toml"


def write(tmp_path: Path, base: Path, changes: dict, drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``base`` with sections changed (merged one level deep) or dropped; relative
    paths made absolute so the copy can live elsewhere."""
    data = tomllib.loads(base.read_text())
    data["board"]["config"] = str((base.parent / data["board"]["config"]).resolve())
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    for section in drop:
        data.pop(section)
    path = tmp_path / "rig.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RigConfigError) as error:
        load_rig_config(path)
    return error.value.problems


def test_the_shipped_rig_configs_load():
    virtual = load_rig_config(VIRTUAL)
    assert virtual.rig.kind == "virtual" and virtual.relay_box.address == "pty"
    assert virtual.relay_box.sense_wire_channels == {3: 3}
    assert virtual.board.config == (RIGS / "../../config/sim.toml").resolve()
    bench = load_rig_config(BENCH)
    assert bench.rig.kind == "bench" and bench.board.launch == "ssh"
    assert bench.electronic_load.address == "serial:///dev/ttyUSB0?baudrate=115200"


def test_an_unknown_option_is_named_with_the_nearest_one(tmp_path):
    path = write(tmp_path, VIRTUAL, {"cell_emulator": {"current_limt_a": 5.0}})
    assert problems(path) == [
        f"{path}: [cell_emulator] current_limt_a: unknown option (did you mean 'current_limit_a'?)"
    ]


def test_a_missing_section_and_a_value_out_of_range(tmp_path):
    path = write(tmp_path, VIRTUAL, {"tolerances": {"temp_c": -1.0}}, drop=("electronic_load",))
    found = problems(path)
    assert f"{path}: [electronic_load]: required section is missing" in found
    assert any(p.startswith(f"{path}: [tolerances] temp_c: ") and "-1.0" in p for p in found)


@pytest.mark.parametrize(
    ("section", "address", "reason"),
    [
        ("relay_box", "pty", "'pty' is for a virtual rig"),
        ("cell_emulator", "tcp://10.0.0.5:0", "port 0 (any free port) is for a virtual rig"),
        ("cell_emulator", "10.0.0.5:5025", "expected tcp://HOST:PORT or serial:///dev/NAME"),
    ],
)
def test_bench_addresses_must_name_a_real_instrument(tmp_path, section, address, reason):
    path = write(tmp_path, BENCH, {section: {"address": address}})
    (problem,) = problems(path)
    assert problem.startswith(f"{path}: [{section}] address: ") and reason in problem


def test_a_virtual_rig_may_serve_on_any_port_or_a_pty(tmp_path):
    path = write(tmp_path, VIRTUAL, {"cell_emulator": {"address": "pty"}})
    assert load_rig_config(path).cell_emulator.address == "pty"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"relay_box": {"sense_wire_channels": {"17": 5}}}, "no cell 17 (1..16)"),
        ({"relay_box": {"sensor_short_channels": {"0": 5}}}, "greater than or equal to 1"),
        ({"relay_box": {"sense_wire_channels": {"3": 5}, "sensor_short_channels": {"2": 5}}},
         "relay channel(s) [5] wired twice"),
        ({"cell_emulator": {"channels": [1, 2, 2]}}, "a channel is listed twice"),
        ({"board": {"launch": "ssh"}}, "launch = 'ssh' needs ssh_target"),
        ({"can": {"interface": "socketcan", "channel": "auto"}}, "channel 'auto' is for"),
        ({"can": {"interface": "socketcan", "channel": "can0", "port": 5000}}, "port is for"),
    ],
    ids=["cell-17", "sensor-0", "relay-twice", "channel-twice", "ssh", "auto", "port"],
)  # fmt: skip
def test_wiring_that_cannot_be(tmp_path, changes, reason):
    found = problems(write(tmp_path, VIRTUAL, changes))
    assert any(reason in p for p in found), found


def test_the_wiring_must_fit_the_board(tmp_path):
    rig = load_rig_config(write(tmp_path, VIRTUAL, {"cell_emulator": {"channels": [1, 2, 3]}}))
    board = load_config(rig.board.config)
    (problem,) = check_against_board(rig, board)
    assert problem.startswith("[cell_emulator] channels: 3 listed, but the board's pack has 16")


def test_addresses_a_virtual_rig_bound_replace_the_configured_ones():
    rig = load_rig_config(VIRTUAL)
    bound = rig.with_addresses({"relay_box": "serial:///dev/pts/7"})
    assert bound.relay_box.address == "serial:///dev/pts/7"
    assert bound.cell_emulator.address == rig.cell_emulator.address
    assert bound.board.config == rig.board.config
