"""The SCPI drivers against instruments that misbehave: silence, late answers, garbage, closed
connections, refusals, another instrument at the address; over TCP and over a real tty (pty).

The fake instruments here answer from a script, so each failure the drivers must name is
produced exactly; the virtual instruments (hil/virtual) stand in for well-behaved ones.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from hil.instruments.drivers import CellEmulator, RelayBox
from hil.instruments.scpi import InstrumentRefused, ScpiInstrument, WrongInstrument, channel_list
from hil.instruments.transport import (
    MAX_LINE_BYTES,
    Address,
    InstrumentNonsense,
    InstrumentNotAnswering,
    open_transport,
)
from hil.virtual.instruments import VirtualRelayBox
from hil.virtual.scpi import PtyServer

TIMEOUT_S = 0.3


class ScriptedInstrument:
    """A TCP instrument whose answer to each line is ``script(line)``: bytes to send back (a
    line end is not added), None to stay silent, or ``CLOSE`` to drop the connection."""

    CLOSE = object()

    def __init__(self, script: Callable[[str], object]):
        self.script = script
        self.lines: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.clients: list[ScpiInstrument] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        pending = b""
        with conn:
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    self.lines.append(line.decode())
                    answer = self.script(line.decode())
                    if answer is self.CLOSE:
                        return
                    if answer is not None:
                        try:
                            conn.sendall(answer)
                        except OSError:
                            return

    def instrument(self, name: str = "load") -> ScpiInstrument:
        address = f"tcp://127.0.0.1:{self.port}"
        self.clients.append(ScpiInstrument(name, open_transport(name, address, TIMEOUT_S)))
        return self.clients[-1]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.stop.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def scripted():
    made = []

    def make(script):
        made.append(ScriptedInstrument(script))
        return made[-1]

    yield make
    for instrument in made:
        instrument.close()


def test_a_silent_instrument_is_named_with_its_address_and_the_command(scripted):
    fake = scripted(lambda line: None)
    instrument = fake.instrument("electronic_load")
    started_s = time.monotonic()
    with pytest.raises(InstrumentNotAnswering) as error:
        instrument.query("MEAS:CURR?")
    assert time.monotonic() - started_s < TIMEOUT_S + 0.5
    message = str(error.value)
    assert f"electronic_load (tcp://127.0.0.1:{fake.port})" in message
    assert "no answer to 'MEAS:CURR?' within 0.3 s" in message


def test_a_late_answer_is_never_taken_for_the_next_one(scripted):
    """After a timeout the connection is dropped: the late answer to the first query arrives
    on a connection nobody reads, and the second query gets its own answer."""

    def script(line):
        if line == "MEAS:VOLT?":
            time.sleep(2 * TIMEOUT_S)
            return b"+9.900000E+01\n"
        return b"+1.500000E+00\n"

    instrument = scripted(script).instrument()
    with pytest.raises(InstrumentNotAnswering):
        instrument.query_float("MEAS:VOLT?")
    time.sleep(2 * TIMEOUT_S)
    assert instrument.query_float("MEAS:CURR?") == 1.5


def test_nothing_listening_is_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        instrument = ScpiInstrument(
            "relay_box", open_transport("relay_box", f"tcp://127.0.0.1:{port}", TIMEOUT_S)
        )
        with pytest.raises(InstrumentNotAnswering, match=r"relay_box .* cannot connect"):
            instrument.identify()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"\xff\xfe\x00\n", "not ASCII"),
        (b"twelve\n", "expected 1 number"),
        (b"1.0,2.0\n", "expected 1 number"),
        (b"nan\n", "expected 1 number"),
        (b"\n", "expected 1 number"),
    ],
    ids=["binary", "words", "two-values", "nan", "empty"],
)
def test_an_answer_that_is_not_a_number_is_nonsense(scripted, answer, reason):
    instrument = scripted(lambda line: answer).instrument()
    with pytest.raises(InstrumentNonsense, match=reason) as error:
        instrument.query_float("MEAS:CURR?")
    assert "'MEAS:CURR?'" in str(error.value)


def test_an_endless_answer_is_nonsense_not_a_hang(scripted):
    instrument = scripted(lambda line: b"1" * (MAX_LINE_BYTES + 10)).instrument()
    with pytest.raises(InstrumentNonsense, match="no line end"):
        instrument.query("MEAS:CURR?")


def test_a_connection_closed_instead_of_an_answer(scripted):
    instrument = scripted(lambda line: ScriptedInstrument.CLOSE).instrument()
    with pytest.raises(InstrumentNotAnswering, match="closed the connection instead of answering"):
        instrument.query("*IDN?")


def test_a_refused_setting_lists_every_error_it_queued(scripted):
    errors = [b'-222,"Data out of range"\n', b'-221,"Settings conflict"\n', b'+0,"No error"\n']

    def script(line):
        return errors.pop(0) if line == "SYST:ERR?" else None

    fake = scripted(script)
    with pytest.raises(InstrumentRefused) as error:
        fake.instrument().send("CURR 500")
    assert "refused 'CURR 500'" in str(error.value)
    assert '-222,"Data out of range"; -221,"Settings conflict"' in str(error.value)
    assert fake.lines == ["CURR 500", "SYST:ERR?", "SYST:ERR?", "SYST:ERR?"]


def test_an_error_queue_answer_of_the_wrong_shape_is_nonsense(scripted):
    instrument = scripted(lambda line: b"OK\n" if line == "SYST:ERR?" else None).instrument()
    with pytest.raises(InstrumentNonsense, match="expected <code>"):
        instrument.send("OUTP ON")


def test_an_error_queue_that_never_empties_is_nonsense(scripted):
    instrument = scripted(lambda line: b'-100,"Command error"\n').instrument()
    with pytest.raises(InstrumentNonsense, match="did not empty"):
        instrument.send("OUTP ON")


@pytest.mark.parametrize(
    ("idn", "expected", "error"),
    [
        (b"Keysight Technologies,N6705C,MY1234,D.01\n", "keysight technologies,n6705c", None),
        (
            b"Keysight Technologies,N6705C,MY1234,D.01\n",
            "Keysight Technologies,N6702A",
            WrongInstrument,
        ),
        (b"pybms,VCE-160,0,1.0\n", "pybms,VCE-16", WrongInstrument),
        (b"just a string\n", "pybms,VCE-16", InstrumentNonsense),
        (b"pybms,,0,1.0\n", "pybms,VCE-16", InstrumentNonsense),
    ],
    ids=["match", "other-model", "prefix-is-not-a-match", "one-field", "empty-model"],
)
def test_the_identity_must_be_the_configured_one(scripted, idn, expected, error):
    instrument = scripted(lambda line: idn).instrument()
    if error is None:
        assert instrument.expect(expected).model == "N6705C"
    else:
        with pytest.raises(error):
            instrument.expect(expected)


def test_channel_queries_answer_in_the_order_asked(scripted):
    """Instruments answer a channel list in ascending order: the driver maps it back."""
    fake = scripted(lambda line: b"+3.1E+00,+3.2E+00,+3.3E+00\n")
    cells = CellEmulator("cells", fake.instrument().transport)
    assert cells.measure_voltages([3, 1, 2]) == [3.3, 3.1, 3.2]
    assert fake.lines == ["MEAS:VOLT? (@1:3)"]


@pytest.mark.parametrize(
    ("channels", "text"),
    [([1], "(@1)"), ([3, 1, 2, 2], "(@1:3)"), ([1, 2, 3, 5, 7, 8], "(@1:3,5,7:8)")],
)
def test_channel_lists(channels, text):
    assert channel_list(channels) == text


def test_an_empty_channel_list_is_refused():
    with pytest.raises(ValueError):
        channel_list([])


@pytest.mark.parametrize(
    ("text", "scheme", "detail"),
    [
        ("tcp://192.168.0.20:5025", "tcp", ("192.168.0.20", 5025)),
        ("serial:///dev/ttyUSB0?baudrate=115200", "serial", ("/dev/ttyUSB0", 115200)),
        ("serial:///dev/ttyACM1", "serial", ("/dev/ttyACM1", 9600)),
    ],
)
def test_addresses(text, scheme, detail):
    address = Address.parse(text)
    assert address.scheme == scheme
    if scheme == "tcp":
        assert (address.host, address.port) == detail
    else:
        assert (address.path, address.baudrate) == detail


@pytest.mark.parametrize(
    "text",
    [
        "192.168.0.20:5025",
        "tcp://host",
        "tcp://host:99999",
        "serial://dev/ttyUSB0",
        "serial:///dev/x?speed=9600",
        "serial:///dev/x?baudrate=fast",
        "gpib://1",
    ],
)
def test_bad_addresses_say_what_is_expected(text):
    with pytest.raises(ValueError, match=r"expected|port|baudrate|unknown serial option"):
        Address.parse(text)


# ---------------------------------------------------------------- a real tty
def test_a_relay_box_on_a_serial_line():
    server = PtyServer(VirtualRelayBox(32), "relay_box")
    server.start()
    relays = RelayBox("relay_box", open_transport("relay_box", server.address, TIMEOUT_S))
    try:
        relays.reset()
        assert relays.closed([3, 18]) == [False, False]
        relays.close_channels([3, 18])
        relays.open_channels([18])
        assert relays.closed([18, 3]) == [False, True]
        with pytest.raises(InstrumentRefused, match="-222"):
            relays.close_channels([33])
    finally:
        relays.close()
        server.close()


def test_a_serial_instrument_that_says_nothing():
    server = PtyServer(VirtualRelayBox(32), "relay_box")  # never started: nobody reads
    relays = RelayBox("relay_box", open_transport("relay_box", server.address, TIMEOUT_S))
    try:
        with pytest.raises(InstrumentNotAnswering, match=r"no answer to '\*IDN\?' within 0.3 s"):
            relays.identify()
    finally:
        relays.close()
        server.close()


def test_a_serial_device_that_does_not_exist():
    relays = RelayBox(
        "relay_box", open_transport("relay_box", "serial:///dev/nonexistent-tty", TIMEOUT_S)
    )
    with pytest.raises(InstrumentNotAnswering, match="cannot open"):
        relays.identify()
