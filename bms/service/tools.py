"""``bms status`` and ``bms faults``: what a person runs against the BMS.

With the service running they ask it over the control socket, so a clear is decided by the
loop itself (only when the cause is gone, and only for root or the admin group). With no
service running, ``faults`` works on the files directly: the latch file (locked, so it never
races a starting BMS) and the state store; the next start then looks at the causes itself.
"""

from __future__ import annotations

import contextlib
import grp
import json
import math
import os
import sys
from pathlib import Path

from bms.config import DEFAULT_CONFIG_PATHS, ToolConfig
from bms.service.control import ControlError, request
from bms.store import utc_now_iso
from bms.store.latches import LatchStore, LatchStoreBusy, person
from bms.store.state import StateStore, StoreError

EXIT_OK = 0
EXIT_NOT_RUNNING = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


def default_config() -> str:
    """$PYBMS_CONFIG, else the installed /etc/pybms/pack.toml, else the simulated pack's."""
    for candidate in (os.environ.get("PYBMS_CONFIG"), *DEFAULT_CONFIG_PATHS):
        if candidate and Path(candidate).exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[-1]


def _ask(config: ToolConfig, message: dict) -> dict | None:
    """The service's answer, or None when no service runs on this config."""
    path = config.service.control_socket
    if path is None:
        return None
    try:
        return request(path, message)
    except ControlError as exc:
        if "not allowed" in str(exc):
            raise
        return None


def status(config: ToolConfig, as_json: bool) -> int:
    path = config.service.control_socket
    if path is None:
        print(f"{config.source}: [service] control_socket is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        answer = request(path, {"cmd": "status"})
    except ControlError as exc:
        print(f"bms status: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print(f"bms status: {answer.get('error')}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if as_json:
        print(json.dumps(answer["status"]))
    else:
        print(format_status(answer))
    return EXIT_OK


def _pct(value: float | None) -> str:
    return "--" if value is None else f"{value * 100:.1f} %"


def _num(value: float | None, fmt: str, unit: str) -> str:
    return (
        "--"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{format(value, fmt)} {unit}")
    )


def format_status(answer: dict) -> str:
    """The pack at a glance, for a person (cells count from 1)."""
    r = answer["status"]
    lines = [
        f"pybms (pid {answer['pid']}, {answer['config']}), running {r['t_s']:.0f} s",
        f"  contactors   {r['contactors']}",
        f"  SOC          {_pct(r['soc_min'])} .. {_pct(r['soc_max'])}, mean "
        f"{_pct(r['soc_mean'])}, sigma up to {_pct(r['soc_std_max'])}",
        f"  cells        {_num(r['cell_voltage_min_v'], '.3f', 'V')} (cell "
        f"{r['cell_voltage_min_cell'] or '-'}) .. {_num(r['cell_voltage_max_v'], '.3f', 'V')} "
        f"(cell {r['cell_voltage_max_cell'] or '-'})",
        f"  pack         {_num(r['pack_voltage_v'], '.2f', 'V')}, "
        f"{_num(r['current_a'], '+.2f', 'A')} (positive charging), link "
        f"{_num(r['link_voltage_v'], '.2f', 'V')}",
        f"  temperature  {_num(r['temp_min_c'], '.1f', 'degC')} .. "
        f"{_num(r['temp_max_c'], '.1f', 'degC')}",
        f"  limits       charge {r['charge_limit_a']:.1f} A, discharge "
        f"{r['discharge_limit_a']:.1f} A",
        f"  balancing    {', '.join(map(str, r['balancing'])) or 'none'}",
        f"  faults       {', '.join(r['faults']) or 'none'}",
        f"  latched      {', '.join(r['latched']) or 'none'}",
        f"  loop         {r['cycle_time_mean_s'] * 1e3:.2f} ms mean, "
        f"{r['cycle_time_max_s'] * 1e3:.2f} ms worst, {r['missed_cycles']} missed",
    ]
    return "\n".join(lines)


def faults(config: ToolConfig, action: str, fault_ids: list[str]) -> int:
    try:
        answer = _ask(
            config,
            {"cmd": "clear", "faults": fault_ids or None}
            if action == "clear"
            else {"cmd": "faults"},
        )
    except ControlError as exc:
        print(f"bms faults: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if answer is None:
        return _clear_offline(config, fault_ids) if action == "clear" else _list_offline(config)
    if action == "clear":
        return _report_clear(answer)
    _print_faults(answer["latched"], answer.get("log", []), "the running BMS")
    return EXIT_OK


def _report_clear(answer: dict) -> int:
    if "error" in answer:
        print(f"bms faults clear: {answer['error']}", file=sys.stderr)
        return EXIT_REFUSED
    if answer["cleared"]:
        print(f"cleared: {', '.join(answer['cleared'])}")
    for fault_id, reason in answer["refused"].items():
        print(f"not cleared: {fault_id}: {reason}", file=sys.stderr)
    if not answer["cleared"] and not answer["refused"]:
        print("cleared: nothing was latched")
    if any(reason == "not latched" for reason in answer["refused"].values()):
        return EXIT_USAGE
    return EXIT_OK if answer["ok"] else EXIT_REFUSED


def _print_faults(latched: list[dict], log: list[dict], source: str) -> None:
    print(f"latched ({source}):")
    if not latched:
        print("  none")
    for record in latched:
        print(f"  {record['fault_id']}  since {record['latched_at_utc']}  {record['description']}")
    if log:
        print("fault log (newest first):")
    for entry in log:
        cleared = (
            f"cleared {entry['cleared_utc']} by {entry['cleared_by']}"
            if entry["cleared_utc"]
            else "not cleared"
        )
        print(f"  {entry['latched_utc']}  {entry['fault_id']}  {cleared}")


def _list_offline(config: ToolConfig) -> int:
    latched = LatchStore(config.protection.latch_file).load()
    log = []
    if config.store is not None and config.store.path.exists():
        try:
            log = [entry.__dict__ for entry in StateStore.read_fault_log(config.store.path)]
        except StoreError as exc:
            print(f"bms faults: {exc}", file=sys.stderr)
    _print_faults(
        [record.model_dump() for record in latched.values()],
        log,
        str(config.protection.latch_file),
    )
    return EXIT_OK


def _may_clear_here(admin_group: str | None) -> str | None:
    if admin_group is None or os.geteuid() == 0:
        return None
    try:
        gid = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        return f"the admin group {admin_group!r} does not exist"
    if gid in os.getgroups():
        return None
    return f"clearing latched faults needs root or membership of the group {admin_group!r}"


def _clear_offline(config: ToolConfig, fault_ids: list[str]) -> int:
    """No BMS runs: clear in both copies of the latched set (the latch file and the store's),
    all of it under the latch file's lock, so a BMS that starts meanwhile waits for neither
    half; the next start sees the causes again itself."""
    refusal = _may_clear_here(config.service.admin_group)
    if refusal is not None:
        print(f"bms faults clear: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    latch_store = LatchStore(config.protection.latch_file)
    who = person()
    try:
        with latch_store.locked():
            store_path = config.store.path if config.store is not None else None
            owner = _owner(store_path)
            store = StateStore.open(store_path) if owner is not None else None
            try:
                in_file = set(latch_store.load())
                in_store = set(store.latched()) if store is not None else set()
                ids = list(fault_ids) or sorted(in_file | in_store)
                unknown = [f for f in ids if f not in in_file | in_store]
                if unknown:
                    print(
                        f"not latched: {', '.join(unknown)}; nothing was cleared", file=sys.stderr
                    )
                    return EXIT_USAGE
                if any(f in in_file for f in ids):
                    latch_store.remove([f for f in ids if f in in_file], who)
                if store is not None:
                    for fault_id in ids:
                        store.log_clear(fault_id, utc_now_iso(), who)
            finally:
                if store is not None:
                    store.close()
                    _give_back(store_path, owner)
    except LatchStoreBusy as exc:
        print(f"{exc}: stop it first (systemctl stop pybms)", file=sys.stderr)
        return EXIT_REFUSED
    except StoreError as exc:
        print(f"bms faults clear: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"cleared: {', '.join(ids) or 'nothing was latched'}")
    return EXIT_OK


def _owner(path: Path | None) -> tuple[int, int] | None:
    """(uid, gid) of an existing store file, None if there is none."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid


def _give_back(path: Path, owner: tuple[int, int]) -> None:
    """Root (sudo) edited the service's store: SQLite's side files it may have left belong
    to the service's user again, or the service could not open its own store."""
    if os.geteuid() != 0:
        return
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chown(f"{path}{suffix}", *owner)
