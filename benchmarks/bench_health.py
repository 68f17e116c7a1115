"""The SOH model on the board: inference time and the memory the TFLite runtime costs, int8
against the float model in the same run.

Each measurement runs in a fresh child process, so the resident set of one stage is not
inflated by another: RSS (VmRSS, and the peak VmHWM) after importing numpy and the runner,
after importing the runtime, after loading the int8 model, and after loading the float model
as well. Inference: ``SohModel.estimate`` (scaling, quantisation, invoke, dequantisation) on
the held-out sample's features, ``--calls`` times per model, interleaved in blocks so that a
noisy neighbour on the shared machine hits both alike; median and 99th percentile.

    .venv/bin/python benchmarks/bench_health.py [--calls 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "soh"

CHILD = r"""
import json, sys, time
from pathlib import Path

def rss():
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

out = {}
import numpy as np
sys.path.insert(0, sys.argv[1])
from bms.health.runner import SohModel, _interpreter_class
out["base"] = rss()
_, runtime = _interpreter_class()
out["runtime_imported"] = rss()
out["runtime"] = runtime
models = {}
for kind in sys.argv[3].split(","):
    models[kind] = SohModel.load(Path(sys.argv[2]) / f"soh_{kind}.tflite")
    assert models[kind].available, models[kind].reason
    out[f"{kind}_loaded"] = rss()
calls = int(sys.argv[4])
if calls:
    truth = json.loads((Path(sys.argv[1]) / "tests/data/soh/truth.json").read_text())["files"]
    features = np.array(next(iter(truth.values()))["features"])
    times = {kind: [] for kind in models}
    block = 100
    for _ in range(calls // block):
        for kind, model in models.items():
            for _ in range(block):
                t0 = time.perf_counter_ns()
                model.estimate(features)
                times[kind].append(time.perf_counter_ns() - t0)
    out["inference_us"] = {
        kind: {
            "median": float(np.median(t)) / 1e3,
            "p99": float(np.percentile(t, 99)) / 1e3,
            "calls": len(t),
        }
        for kind, t in times.items()
    }
print(json.dumps(out))
"""


def child(kinds: str, calls: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(MODELS), kinds, str(calls)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    timing = child("int8,float32", a.calls)
    int8_only = child("int8", 0)
    float_only = child("float32", 0)
    sizes = {kind: (MODELS / f"soh_{kind}.tflite").stat().st_size for kind in ("int8", "float32")}
    result = {
        "runtime": timing["runtime"],
        "model_bytes": sizes,
        "rss_mib": {
            "numpy_and_runner": int8_only["base"]["VmRSS"],
            "runtime_imported": int8_only["runtime_imported"]["VmRSS"],
            "int8_loaded": int8_only["int8_loaded"]["VmRSS"],
            "float32_loaded": float_only["float32_loaded"]["VmRSS"],
            "runtime_cost": int8_only["int8_loaded"]["VmRSS"] - int8_only["base"]["VmRSS"],
            "peak_int8": int8_only["int8_loaded"]["VmHWM"],
        },
        "inference_us": timing["inference_us"],
        "int8_over_float_median": timing["inference_us"]["int8"]["median"]
        / timing["inference_us"]["float32"]["median"],
    }
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    rss = result["rss_mib"]
    print(
        f"runtime {result['runtime']}; model size int8 {sizes['int8']} B, "
        f"float32 {sizes['float32']} B"
    )
    print(
        f"RSS: numpy + runner {rss['numpy_and_runner']:.1f} MiB, + runtime imported "
        f"{rss['runtime_imported']:.1f} MiB, + int8 model {rss['int8_loaded']:.1f} MiB "
        f"(cost of the runtime and model: {rss['runtime_cost']:.1f} MiB); with the float "
        f"model instead {rss['float32_loaded']:.1f} MiB"
    )
    for kind, t in result["inference_us"].items():
        print(
            f"estimate() {kind}: median {t['median']:.1f} us, p99 {t['p99']:.1f} us "
            f"({t['calls']} calls)"
        )
    print(f"int8 / float32 median time: {result['int8_over_float_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
