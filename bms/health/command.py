"""``bms health``: state of health of a logged single cell, from the ML model and online.

    bms health --params DIR --input LOG.csv [--json] [--model SOH.tflite]

The log (columns ``time_s,current_a,voltage_v,temp_c``, current positive when charging) must
hold at least one complete charge (bms/health/features.py says what qualifies; the newest is
used). The service's EKF runs over the whole log; the online estimator (bms/health/online.py)
takes capacity from the charge counted between rested points and resistance growth from the
current steps; the int8 TFLite model (bms/health/runner.py) takes the charge's features and
the online resistance growth. Both capacities are printed in Ah and as SOH (a fraction of the
parameter set's ``capacity_ah``), with 1-sigma uncertainties; a disagreement beyond
``CROSS_CHECK_SIGMA`` combined sigmas is a warning. Without a usable TFLite runtime or model
the ML estimate is missing (null) and the reason printed, exit code 0 all the same.

Exit codes: 0 estimated, 2 unusable input (no such file, bad CSV, bad parameter set, no usable
charge segment).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_USAGE_ERROR = 2
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "soh" / "soh_int8.tflite"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``health`` to the CLI's subparsers (``run`` is set as its handler)."""
    parser = subparsers.add_parser(
        "health",
        help="state of health (capacity, resistance growth) of a logged cell",
        description="Input columns: time_s,current_a,voltage_v,temp_c (current positive when "
        "charging); the log needs at least one complete CC-CV charge. Prints the ML (int8 "
        "TFLite) and the online (EKF + coulomb counting + pulses) estimates with 1-sigma "
        "uncertainties.",
    )
    _arguments(parser)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", required=True, type=Path, help="cell parameter set directory")
    parser.add_argument("--input", required=True, type=Path, help="the log (CSV)")
    parser.add_argument("--json", action="store_true", help="one JSON object, for machines")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="the SOH model, its .json sidecar beside it (default: models/soh/soh_int8.tflite)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from bms.csvio import CsvError
    from bms.estimation.cell_params import CellParamsError, load_cell_params
    from bms.health.features import NoChargeSegment, charge_features, find_charge_segments
    from bms.health.online import CROSS_CHECK_SIGMA, disagreement_sigma, run_log
    from bms.health.runner import SohModel
    from bms.replay import read_log

    try:
        cell = load_cell_params(args.params)
        log = read_log(args.input)
        segments = find_charge_segments(
            log["time_s"], log["current_a"], log["voltage_v"], cell.capacity_ah, cell.voltage_max_v
        )
    except (CsvError, CellParamsError, ValueError) as exc:  # NoChargeSegment is a ValueError
        prefix = f"{args.input}: " if isinstance(exc, NoChargeSegment) else ""
        print(f"bms health: {prefix}{exc}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    features = charge_features(
        log["time_s"],
        log["current_a"],
        log["voltage_v"],
        log["temp_c"],
        segments[-1],
        cell.capacity_ah,
    )
    online, _ = run_log(cell, log)
    model = SohModel.load(args.model)
    ml = model.estimate(features.vector(online.resistance_growth), t_s=features.t_s)
    nominal_ah = cell.capacity_ah
    warnings = []
    if ml.available and not math.isclose(model.nominal_capacity_ah, nominal_ah, rel_tol=1e-3):
        warnings.append(
            f"the model was trained for a {model.nominal_capacity_ah:.3f} Ah cell, the "
            f"parameter set says {nominal_ah:.3f} Ah"
        )
    if ml.extrapolating:
        warnings.append("ML inputs outside the training range: " + ", ".join(ml.extrapolating))
    if math.isnan(online.capacity_ah):
        warnings.append(
            "no online capacity: needs two rests of at least 30 min with a confident SOC, "
            "at least 40 % SOC apart"
        )
    if math.isnan(online.resistance_growth):
        warnings.append("no online resistance: needs a current step of at least 0.2C out of rest")
    sigma = disagreement_sigma(
        ml.capacity_ah, ml.capacity_std_ah, online.capacity_ah, online.capacity_std_ah
    )
    if sigma > CROSS_CHECK_SIGMA:
        warnings.append(
            f"ML and online capacities disagree by {sigma:.1f} sigma "
            f"({ml.capacity_ah:.3f} vs {online.capacity_ah:.3f} Ah)"
        )
    result = {
        "soh_ml": ml.soh,
        "soh_ml_std": ml.soh_std,
        "capacity_ml_ah": ml.capacity_ah,
        "capacity_ml_std_ah": ml.capacity_std_ah,
        "soh_online": online.capacity_ah / nominal_ah,
        "soh_online_std": online.capacity_std_ah / nominal_ah,
        "capacity_online_ah": online.capacity_ah,
        "capacity_online_std_ah": online.capacity_std_ah,
        "resistance_growth": online.resistance_growth,
        "resistance_growth_std": online.resistance_growth_std,
        "nominal_capacity_ah": nominal_ah,
        "disagreement_sigma": sigma,
        "ml_available": ml.available,
        "ml_reason": ml.reason,
        "ml_runtime": model.runtime,
        "ml_model": str(args.model),
        "ml_extrapolating": list(ml.extrapolating),
        "charge_segments": len(segments),
        "segment_end_s": features.t_s,
        "online_anchors": online.anchors,
        "online_steps": online.steps,
        "warnings": warnings,
    }
    if args.json:
        print(json.dumps({k: _json_value(v) for k, v in result.items()}))
    else:
        print(_text(args.input, cell.name, result))
    return EXIT_OK


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _estimate_line(soh: float, soh_std: float, capacity_ah: float, std_ah: float) -> str:
    if math.isnan(capacity_ah):
        return "none"
    return f"{capacity_ah:.3f} ± {std_ah:.3f} Ah, SOH {soh * 100:.1f} ± {soh_std * 100:.1f} %"


def _text(path: Path, cell_name: str, r: dict) -> str:
    ml = _estimate_line(r["soh_ml"], r["soh_ml_std"], r["capacity_ml_ah"], r["capacity_ml_std_ah"])
    if not r["ml_available"]:
        ml += f" ({r['ml_reason']})"
    online = _estimate_line(
        r["soh_online"], r["soh_online_std"], r["capacity_online_ah"], r["capacity_online_std_ah"]
    )
    growth = (
        "none"
        if math.isnan(r["resistance_growth"])
        else f"{r['resistance_growth']:.3f} ± {r['resistance_growth_std']:.3f} x R0"
    )
    lines = [
        f"{path}: {r['charge_segments']} charge segment(s), the newest ends at "
        f"t = {r['segment_end_s']:.0f} s; SOH is of {cell_name}'s "
        f"{r['nominal_capacity_ah']:.3f} Ah (1 sigma)",
        f"  capacity, ML (int8 TFLite{', ' + r['ml_runtime'] if r['ml_runtime'] else ''}): {ml}",
        f"  capacity, online ({r['online_anchors']} rested anchors): {online}",
        f"  resistance growth, online ({r['online_steps']} current steps): {growth}",
    ]
    lines += [f"  warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
