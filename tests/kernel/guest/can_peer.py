"""The far end of the guest's CAN tests: another process on vcan0, encoding with cantools.

Run as a script (``python can_peer.py MODE --dbc FILE``) so it loads only python-can and
cantools; the tests import it only for :func:`burst_frame` to know what they should receive.
It prints ``READY`` once its socket is open, then:

- ``burst --count N --cells C``: waits for a line ``GO`` on stdin, sends N ``CMU_CellVoltages``
  frames back to back and prints ``{"sent": N, "send_s": ...}``. Frame k carries multiplex
  group k mod G (G: the groups that hold cells 1..C), its rolling counter advancing per group,
  every cell in it at 2.000 V + (k div G) mV, so a receiver can tell which frame it got;
- ``box``: a contactor box that answers every ``BMS_ContactorCommand`` at once with a
  ``PDU_ContactorFeedback`` carrying the same relays and counter (the interlock closed), until
  stdin closes; then prints ``{"answered": N}``.

Frames carry the checksum the DBC's ``ChecksumAlgorithm`` attribute names, computed here from
the database's own description (CRC-8 SAE J1850 over the id's two low bytes, low byte first,
then the data bytes other than the checksum's).
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
import threading
import time

import can
import cantools

BURST_BASE_V = 2.0
BURST_STEP_V = 0.001


def crc8_sae_j1850(data: bytes) -> int:
    """CRC-8 SAE J1850: polynomial 0x1D, initial value 0xFF, final XOR 0xFF, not reflected."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1D) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0xFF


def checksum_byte(message) -> int | None:
    """Index of the data byte that holds the message's CRC-8 SAE J1850, or None."""
    for signal in message.signals:
        attribute = signal.dbc.attributes.get("ChecksumAlgorithm") if signal.dbc else None
        if attribute is None:
            continue
        if attribute.definition.choices[attribute.value] == "CRC8_SAE_J1850":
            return signal.start // 8
    return None


def encode(message, values: dict[str, float]) -> bytes:
    """cantools' encoding of ``values`` with the checksum (if the message has one) filled in."""
    data = bytearray(message.encode(values, strict=False))
    index = checksum_byte(message)
    if index is not None:
        covered = message.frame_id.to_bytes(4, "little")[:2] + data[:index] + data[index + 1 :]
        data[index] = crc8_sae_j1850(bytes(covered))
    return bytes(data)


def cell_groups(message, n_cells: int) -> dict[int, list[int]]:
    """Multiplexer value -> the cell numbers (from 1, at most ``n_cells``) that group carries."""
    groups: dict[int, list[int]] = {}
    for signal in message.signals:
        match = re.fullmatch(r"Cell(\d+)_Voltage", signal.name)
        if match and int(match.group(1)) <= n_cells:
            for mux in signal.multiplexer_ids or [0]:
                groups.setdefault(mux, []).append(int(match.group(1)))
    return dict(sorted(groups.items()))


def burst_frame(k: int, groups: dict[int, list[int]]) -> tuple[int, float]:
    """(multiplexer value, every cell's voltage) of burst frame ``k``."""
    muxes = list(groups)
    return muxes[k % len(muxes)], BURST_BASE_V + (k // len(muxes)) * BURST_STEP_V


def burst(bus: can.BusABC, db, count: int, n_cells: int) -> None:
    message = db.get_message_by_name("CMU_CellVoltages")
    groups = cell_groups(message, n_cells)
    mux_signal = next(signal.name for signal in message.signals if signal.is_multiplexer)
    frames = []
    for k in range(count):
        mux, voltage_v = burst_frame(k, groups)
        values: dict[str, float] = {mux_signal: mux}
        for signal in message.signals:
            if signal.multiplexer_ids is None or mux in signal.multiplexer_ids:
                values.setdefault(signal.name, voltage_v if signal.unit == "V" else 0)
        values["Counter"] = (k // len(groups)) % 16
        frames.append(
            can.Message(
                arbitration_id=message.frame_id,
                data=encode(message, values),
                is_extended_id=False,
            )
        )
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    retries = 0
    start_s = time.perf_counter()
    for frame in frames:
        while True:
            try:
                bus.send(frame)
                break
            except can.CanOperationError as exc:
                if exc.error_code != errno.ENOBUFS:
                    raise
                retries += 1  # transmit queue full: wait for it, never drop
                time.sleep(0.0005)
    send_s = time.perf_counter() - start_s
    print(json.dumps({"sent": count, "send_s": send_s, "enobufs_retries": retries}), flush=True)


def box(bus: can.BusABC, db) -> None:
    command = db.get_message_by_name("BMS_ContactorCommand")
    feedback = db.get_message_by_name("PDU_ContactorFeedback")
    bus.set_filters([{"can_id": command.frame_id, "can_mask": 0x7FF, "extended": False}])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    answered = 0
    print("READY", flush=True)
    while not stop.is_set():
        frame = bus.recv(timeout=0.1)
        if frame is None:
            continue
        values = {**command.decode(frame.data), "InterlockClosed": 1}
        data = encode(feedback, values)
        bus.send(can.Message(arbitration_id=feedback.frame_id, data=data, is_extended_id=False))
        answered += 1
    print(json.dumps({"answered": answered}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["burst", "box"])
    parser.add_argument("--dbc", required=True)
    parser.add_argument("--channel", default="vcan0")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--cells", type=int, default=16)
    args = parser.parse_args()
    db = cantools.database.load_file(args.dbc)
    with can.Bus(interface="socketcan", channel=args.channel) as bus:
        if args.mode == "burst":
            burst(bus, db, args.count, args.cells)
        else:
            box(bus, db)


if __name__ == "__main__":
    main()
