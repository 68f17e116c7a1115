"""Fault injection: what can go wrong, and when, in the simulated pack.

An injection is written ``KIND@T_S[:cell=N]`` on the command line (``bms sim --inject``) or as
a ``[[sim.faults]]`` table in the config. Cell numbers count from 1, as a person reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bms.backends import InjectionError

FAULT_KINDS: dict[str, str] = {
    "open_wire": "a cell's sense wire opens: the front-end flags the cell invalid (needs cell=)",
    "stuck": "a cell's reading freezes at its present value (needs cell=)",
    "nan": "a cell's reading becomes 'not available' (needs cell=)",
    "overtemp": "a cell heats internally (overtemp_heat_w) until it is too hot (needs cell=)",
    "short": "an external short circuit on the DC link",
    "weld": "the positive contactor welds: it stays closed once closed",
    "silence": "the front-end stops sending measurements",
    "insulation": "the insulation to chassis breaks down to insulation_fault_kohm",
    "interlock": "the high-voltage interlock loop opens (a connector pulled)",
}
CELL_KINDS = frozenset({"open_wire", "stuck", "nan", "overtemp"})

_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<at>[0-9]+(?:\.[0-9]*)?)(?::cell=(?P<cell>[0-9]+))?$")


@dataclass(frozen=True, slots=True)
class Injection:
    kind: str
    at_s: float
    cell: int | None  # index from 0


def make_injection(kind: str, at_s: float, cell_number: int | None, n_cells: int) -> Injection:
    """Check an injection against the known kinds and the pack; ``cell_number`` counts from 1."""
    if kind not in FAULT_KINDS:
        raise InjectionError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if kind in CELL_KINDS:
        if cell_number is None:
            raise InjectionError(f"fault {kind!r} needs a cell, as in {kind}@{at_s:g}:cell=1")
        if not 1 <= cell_number <= n_cells:
            raise InjectionError(f"cell {cell_number} is not in the pack (1..{n_cells})")
        return Injection(kind, at_s, cell_number - 1)
    if cell_number is not None:
        raise InjectionError(f"fault {kind!r} takes no cell")
    return Injection(kind, at_s, None)


def parse_injection(text: str, n_cells: int) -> Injection:
    """Parse ``KIND@T_S[:cell=N]``."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise InjectionError(f"cannot read injection {text!r}; expected KIND@T_S[:cell=N]")
    cell = match["cell"]
    return make_injection(
        match["kind"], float(match["at"]), None if cell is None else int(cell), n_cells
    )
