"""The service's start and footprint: time from exec to READY=1, with a warm and a cold Numba
cache, and the RSS of the running process.

Starts ``bms sim`` (the real CLI, the simulated pack beside it) as systemd would, with a
NOTIFY_SOCKET this script binds, and times the first ``READY=1`` datagram from the moment the
process was spawned. "Cold" points NUMBA_CACHE_DIR at an empty directory, so every kernel is
compiled, as on the first start after an install; "warm" uses one filled by a previous run.
RSS (VmRSS and its peak VmHWM) is read from /proc after the loop has run a while.

    .venv/bin/python benchmarks/bench_service.py [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import sim_config_data  # noqa: E402

BMS = Path(sys.executable).with_name("bms")


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_once(workdir: Path, cache_dir: Path, settle_s: float) -> dict:
    config = workdir / "service.toml"
    data = sim_config_data()
    data["protection"]["latch_file"] = str(workdir / "latched.json")
    data["store"] = {"path": str(workdir / "state.sqlite")}
    data["service"] = {"control_socket": str(workdir / "control.sock")}
    config.write_text(tomli_w.dumps(data))
    notify_path = str(workdir / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "NUMBA_CACHE_DIR": str(cache_dir)}
    spawned_s = time.monotonic()
    proc = subprocess.Popen(
        [str(BMS), "sim", "--config", str(config), "--duration-s", "120"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        listener.settimeout(120.0)
        while True:
            message = listener.recv(4096).decode()
            if "READY=1" in message.split("\n"):
                ready_s = time.monotonic() - spawned_s
                break
        time.sleep(settle_s)
        rss, peak = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        listener.close()
        os.unlink(notify_path)
    return {"ready_s": round(ready_s, 2), "rss_mib": round(rss, 1), "peak_rss_mib": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pybms-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "numba"
        for run in range(args.runs):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                workdir = tmp / f"{kind}{run}"
                workdir.mkdir()
                rows.append(
                    {"cache": kind, "run": run, **start_once(workdir, cache, args.settle_s)}
                )
    print("| cache | run | exec to READY s | RSS MiB | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['cache']} | {row['run']} | {row['ready_s']:.2f} | {row['rss_mib']:.1f} "
            f"| {row['peak_rss_mib']:.1f} |"
        )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
