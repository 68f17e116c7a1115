"""The DBC codec: one cantools database per file, decoded with "not available" as NaN.

The DBC is the single source of truth for CAN (opendbc, foxBMS ``check_ids.py``): code names
messages and signals, and a name the DBC lacks is an error when the backend opens, not a
silent zero later. A decoded value outside the signal's declared range is "not available"
(the DBC reserves codes outside the range for it) and becomes NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import cantools
from cantools.database.can import Message


class DbcError(Exception):
    """A DBC that cannot be read, or lacks a message or signal the code needs."""


class DbcCodec:
    """Encodes and decodes the messages of one DBC file."""

    def __init__(self, path: Path):
        try:
            self.db = cantools.database.load_file(str(path), strict=True)
        except (OSError, cantools.database.UnsupportedDatabaseFormatError, ValueError) as exc:
            raise DbcError(f"{path}: cannot load DBC: {exc}") from None
        self.path = path

    def message(self, name: str, signals: Iterable[str] = ()) -> Message:
        """Return message ``name``; raise DbcError if it or any of ``signals`` is missing."""
        try:
            message = self.db.get_message_by_name(name)
        except KeyError:
            raise DbcError(f"{self.path}: no message {name!r}") from None
        known = {signal.name for signal in message.signals}
        missing = [s for s in signals if s not in known]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DbcError(f"{self.path}: message {name!r} lacks signals {shown}")
        return message

    @staticmethod
    def decode(message: Message, data: bytes) -> dict[str, float]:
        """Decode ``data``; values outside their signal's range become NaN.

        Raises ``cantools`` decode errors (short frame, bad multiplexer) to the caller, which
        counts them as frame errors.
        """
        values = message.decode(data, decode_choices=False)
        for signal in message.signals:
            value = values.get(signal.name)
            if value is None:
                continue
            low = -math.inf if signal.minimum is None else signal.minimum
            high = math.inf if signal.maximum is None else signal.maximum
            if not low <= value <= high:
                values[signal.name] = math.nan
        return values

    @staticmethod
    def encode(message: Message, values: Mapping[str, float]) -> bytes:
        """Encode ``values``; a NaN becomes the signal's "not available" code and a value
        outside the signal's range is held at the range's end, as a saturated sensor reads."""
        prepared = {}
        for signal in message.signals:
            if signal.name not in values:
                continue
            value = values[signal.name]
            if isinstance(value, float) and math.isnan(value):
                value = _not_available(signal)
            elif signal.minimum is not None and value < signal.minimum:
                value = signal.minimum
            elif signal.maximum is not None and value > signal.maximum:
                value = signal.maximum
            prepared[signal.name] = value
        return message.encode(prepared, strict=False)


def _not_available(signal) -> float:
    """The physical value of the raw code just outside the declared range (all ones, or the
    most negative code for a signed signal), which decodes as NaN."""
    raw = -(1 << (signal.length - 1)) if signal.is_signed else (1 << signal.length) - 1
    return raw * signal.scale + signal.offset
