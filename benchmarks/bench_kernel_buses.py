"""Real kernel buses in the qemu guest: what the guest measures, and what the boot costs.

Runs the guest tests that ``tests/kernel/test_kernel_guest.py`` checks (set-up, the Numba
cache, and a boot of its own with busybox as init, running only those tests, not the systemd
checks) and prints, as a Markdown table for benchmarks/RESULTS.md:

- the set-up's time (about a second when warm; a cold machine also installs qemu and fetches
  the kernel), the Numba cache's (a cold cache compiles for seconds), the boot's;
- from inside the guest: the 5,000-frame CAN burst (sender rate, the front-end's drain rate,
  frames lost), request/response round trips with a contactor box in another process (per
  second, lost), INA228 reads and I2C transactions per second through i2c-stub.

The guest runs on qemu's software emulation, 15-40 times slower than the host, so these figures
are a floor for a real board, not an estimate of it; a shared host slows them further.

    .venv/bin/python benchmarks/bench_kernel_buses.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness is in tests/

from tests.kernel import harness

ROWS = [
    ("setup_s", "set-up (setup.sh)", "s"),
    ("numba_warm_s", "Numba cache on the host", "s"),
    ("boot_s", "qemu start to power-off, all guest tests", "s"),
    ("bms_run_start_s", "`bms run` start until it waits for the plant", "s"),
    ("plant_start_to_closed_s", "`bms plant` start until the contactors closed", "s"),
    ("burst_send_frames_per_s", "burst: sender, frames/s", "1/s"),
    ("burst_frontend_drain_frames_per_s", "burst: CAN front-end drains, frames/s", "1/s"),
    ("burst_lost", "burst: frames lost of 5,000", ""),
    ("round_trips_per_s", "request/response round trips/s (2 frames each)", "1/s"),
    ("round_trips_lost", "request/response: lost of 500", ""),
    ("i2c_ina228_reads_per_s", "INA228 read() per s (6 transfers each)", "1/s"),
    ("i2c_ina228_transactions_per_s", "I2C transactions/s through the INA228 driver", "1/s"),
    ("i2c_word_reads_per_s", "raw SMBus word reads/s", "1/s"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with harness.exclusive():
        start_s = time.monotonic()
        image = harness.set_up()
        figures = {"setup_s": time.monotonic() - start_s}
        harness.prepare_share()
        figures["numba_warm_s"] = harness.warm_numba_cache()
        run = harness.boot(image, harness.guest_pytest_script([str(harness.GUEST_TESTS)]))
        figures["boot_s"] = run.elapsed_s
        if run.exit_code != 0:
            log = harness.SHARE / "pytest.log"
            print(run.console_tail(), file=sys.stderr)
            print(log.read_text()[-8000:] if log.exists() else "no pytest log", file=sys.stderr)
            print(f"the guest tests failed (exit code {run.exit_code})", file=sys.stderr)
            return 1
        figures.update(json.loads((harness.SHARE / "metrics.json").read_text()))
    print(f"kernel {image.kernel_version}, qemu {harness.ACCEL}\n")
    print("| measured | value |\n|---|---|")
    for key, label, unit in ROWS:
        value = figures.get(key)
        text = "n/a" if value is None else f"{value:,.1f} {unit}".strip()
        print(f"| {label} | {text} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
