#!/usr/bin/env python3
"""Train the state-of-health network and convert it to a full-integer int8 TFLite model.

Runs in the training environment (TensorFlow is a build-time tool only):

    .venv-train/bin/python models/soh/train.py --dataset benchmarks/out/soh/dataset.csv \
        --out models/soh

Input: the table models/soh/dataset.py makes (features from bms/health/features.py, truth
from the physics model). Split by trajectory, never by sample: the generator's held-out
trajectories (``split == "test"``, conditions the grid never has) are the test set; of the
training trajectories, VALIDATION_COUNT (seeded) are kept for early stopping and for the
model's stated uncertainty.

Writes, into --out:
* ``soh_int8.tflite``: int8 input and output, weights and activations int8, calibrated on
  the training inputs plus points spread beyond them (so the int8 output range covers more
  than the training targets and does not clip at their edge);
* ``soh_float32.tflite``: the same network in float, to measure the quantisation loss;
* ``soh_int8.json`` and ``soh_float32.json``: the metadata sidecars the runner checks
  (sha256, feature names, order and scaling, quantisation, training data, held-out metrics);
* ``metrics.json``: the held-out table per condition (int8, float, online estimator).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
import tomllib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # bms.health.features, numpy only

from bms.health.features import FEATURE_NAMES  # noqa: E402

SEED = 20261204
VALIDATION_COUNT = 4
TARGET_OFFSET = 0.85
TARGET_SCALE = 0.15
"""The network predicts (soh - TARGET_OFFSET) / TARGET_SCALE."""
HIDDEN = (32, 32)
EPOCHS = 3000
PATIENCE = 200
CALIBRATION_SPREAD = 0.5
"""Calibration points are drawn uniformly from the training inputs' range widened by this
fraction of it on each side."""
CALIBRATION_EXTRA = 2000
SOH_RANGE = (0.70, 1.00)
"""The issue's targets hold for true SOH in this range."""


def load(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key not in ("trajectory", "split"):
                row[key] = float(value)
    return rows


def matrix(rows: list[dict]) -> np.ndarray:
    return np.array([[r[name] for name in FEATURE_NAMES] for r in rows], dtype=np.float64)


def build(n_inputs: int):
    import tensorflow as tf

    layers = [tf.keras.Input(shape=(n_inputs,))]
    layers += [tf.keras.layers.Dense(n, activation="relu") for n in HIDDEN]
    layers += [tf.keras.layers.Dense(1)]
    model = tf.keras.Sequential(layers)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3), loss="mse")
    return model


def convert(model, calibration: np.ndarray) -> tuple[bytes, bytes]:
    import tensorflow as tf

    float_model = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for row in calibration:
            yield [row[None, :].astype(np.float32)]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return float_model, converter.convert()


def tflite_predict(content: bytes, x_scaled: np.ndarray) -> tuple[np.ndarray, dict]:
    """Run a converted model over (n, n_features) scaled inputs; SOH (n,) and its quantisation
    parameters (for the int8 model)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    quant = {}
    y = np.empty(x_scaled.shape[0])
    clipped = 0
    for k, row in enumerate(x_scaled):
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            q = np.clip(np.round(row / scale + zero), -128, 127).astype(np.int8)
            interpreter.set_tensor(inp["index"], q[None, :])
        else:
            interpreter.set_tensor(inp["index"], row[None, :].astype(np.float32))
        interpreter.invoke()
        raw = interpreter.get_tensor(out["index"])[0, 0]
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            clipped += int(raw in (-128, 127))
            y[k] = (float(raw) - zero) * scale
        else:
            y[k] = float(raw)
    if inp["dtype"] == np.int8:
        quant = {
            "input_scale": float(inp["quantization"][0]),
            "input_zero_point": int(inp["quantization"][1]),
            "output_scale": float(out["quantization"][0]),
            "output_zero_point": int(out["quantization"][1]),
            "outputs_at_int8_limit": clipped,
        }
    return y * TARGET_SCALE + TARGET_OFFSET, quant


def mae_percent(error: np.ndarray) -> float:
    return float(np.mean(np.abs(error)) * 100.0) if error.size else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, default=Path("benchmarks/out/soh/dataset.csv"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--params", type=Path, default=HERE / "okane2022_spm")
    a = ap.parse_args(argv)
    import tensorflow as tf

    t0 = time.time()
    # the parameter set's capacity, from its params.toml (bms.estimation needs numba, which
    # the training environment does not have)
    nominal_ah = float(tomllib.loads(a.params.joinpath("params.toml").read_text())["capacity_ah"])
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    rows = [r for r in load(a.dataset) if all(np.isfinite(r[n]) for n in FEATURE_NAMES)]
    train_names = sorted({r["trajectory"] for r in rows if r["split"] == "train"})
    rng = np.random.default_rng(SEED)
    val_names = set(rng.choice(train_names, size=VALIDATION_COUNT, replace=False).tolist())
    fit = [r for r in rows if r["split"] == "train" and r["trajectory"] not in val_names]
    val = [r for r in rows if r["trajectory"] in val_names]
    test = [r for r in rows if r["split"] == "test"]
    x_fit = matrix(fit)
    mean, std = x_fit.mean(axis=0), x_fit.std(axis=0)
    std[std == 0.0] = 1.0

    def scaled(subset: list[dict]) -> np.ndarray:
        return (matrix(subset) - mean) / std

    def target(subset: list[dict]) -> np.ndarray:
        return (np.array([r["soh_true"] for r in subset]) - TARGET_OFFSET) / TARGET_SCALE

    model = build(len(FEATURE_NAMES))
    stop = tf.keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=PATIENCE, restore_best_weights=True
    )
    history = model.fit(
        scaled(fit),
        target(fit),
        validation_data=(scaled(val), target(val)),
        epochs=EPOCHS,
        batch_size=64,
        verbose=0,
        callbacks=[stop],
    )
    train_s = time.time() - t0
    low, high = scaled(fit).min(axis=0), scaled(fit).max(axis=0)
    width = high - low
    extra = rng.uniform(
        low - CALIBRATION_SPREAD * width,
        high + CALIBRATION_SPREAD * width,
        size=(CALIBRATION_EXTRA, low.size),
    )
    calibration = np.vstack([scaled(fit), extra])
    float_model, int8_model = convert(model, calibration)

    soh_val_float, _ = tflite_predict(float_model, scaled(val))
    val_rmse = float(
        np.sqrt(np.mean((soh_val_float - np.array([r["soh_true"] for r in val])) ** 2))
    )
    soh_test_float, _ = tflite_predict(float_model, scaled(test))
    soh_test_int8, quant = tflite_predict(int8_model, scaled(test))
    soh_val_int8, _ = tflite_predict(int8_model, scaled(val))
    int8_val_rmse = float(
        np.sqrt(np.mean((soh_val_int8 - np.array([r["soh_true"] for r in val])) ** 2))
    )

    table = []
    in_range_all = []
    for name in sorted({r["trajectory"] for r in test}):
        idx = [k for k, r in enumerate(test) if r["trajectory"] == name]
        truth = np.array([test[k]["soh_true"] for k in idx])
        keep = (truth >= SOH_RANGE[0]) & (truth <= SOH_RANGE[1])
        online = np.array([test[k]["capacity_online_ah"] for k in idx]) / nominal_ah
        rg_true = np.array([test[k]["resistance_growth_true"] for k in idx])
        rg_online = np.array([test[k]["resistance_growth"] for k in idx])
        r0 = test[idx[0]]
        in_range_all += [idx[j] for j in np.flatnonzero(keep)]
        table.append(
            {
                "trajectory": name,
                "temp_c": r0["temp_c_ambient"],
                "charge_c_rate": r0["charge_c_rate_cycling"],
                "depth_of_discharge": r0["depth_of_discharge"],
                "storage_soc": r0["storage_soc"],
                "checkups_in_range": int(keep.sum()),
                "soh_true_min": float(truth.min()),
                "int8_mae_percent": mae_percent((soh_test_int8[idx] - truth)[keep]),
                "float_mae_percent": mae_percent((soh_test_float[idx] - truth)[keep]),
                "int8_vs_float_max_percent": float(
                    np.max(np.abs(soh_test_int8[idx] - soh_test_float[idx])[keep]) * 100
                )
                if keep.any()
                else float("nan"),
                "online_mae_percent": mae_percent((online - truth)[keep & np.isfinite(online)]),
                "online_missing": int(np.sum(~np.isfinite(online[keep]))),
                "resistance_growth_online_mae": float(np.nanmean(np.abs(rg_online - rg_true))),
            }
        )
    sel = np.array(in_range_all, dtype=int)
    truth_all = np.array([r["soh_true"] for r in test])
    online_all = np.array([r["capacity_online_ah"] for r in test]) / nominal_ah
    ok = np.isfinite(online_all[sel])
    summary = {
        "held_out_checkups_in_range": int(sel.size),
        "int8_mae_percent": mae_percent(soh_test_int8[sel] - truth_all[sel]),
        "float_mae_percent": mae_percent(soh_test_float[sel] - truth_all[sel]),
        "int8_vs_float_mean_abs_percent": mae_percent(soh_test_int8[sel] - soh_test_float[sel]),
        "int8_vs_float_max_abs_percent": float(
            np.max(np.abs(soh_test_int8[sel] - soh_test_float[sel])) * 100
        ),
        "online_mae_percent": mae_percent(online_all[sel][ok] - truth_all[sel][ok]),
        "online_missing": int((~ok).sum()),
        "validation_rmse_float": val_rmse,
        "validation_rmse_int8": int8_val_rmse,
    }
    dataset_sha = hashlib.sha256(a.dataset.read_bytes()).hexdigest()
    versions = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else "",
        "numpy": np.__version__,
    }
    common = {
        "task": "capacity state of health of one cell from one charge segment",
        "output": {
            "name": "soh",
            "meaning": "capacity as a fraction of the parameter set's capacity_ah",
            "parameter_set": str(a.params),
            "nominal_capacity_ah": nominal_ah,
            "target_offset": TARGET_OFFSET,
            "target_scale": TARGET_SCALE,
            "from_network": "soh = y * target_scale + target_offset (y: the dequantised output)",
            "std": int8_val_rmse,
            "std_meaning": "1 sigma: RMSE of the int8 model on the validation trajectories",
        },
        "inputs": [
            {
                "name": name,
                "mean": float(mean[k]),
                "std": float(std[k]),
                "train_min": float(x_fit[:, k].min()),
                "train_max": float(x_fit[:, k].max()),
            }
            for k, name in enumerate(FEATURE_NAMES)
        ],
        "input_scaling": "x_scaled = (x - mean) / std, in the order of `inputs`",
        "feature_module": "bms/health/features.py",
        "training_data": {
            "generator": "models/soh/generate.py (PyBaMM SPM, OKane2022, degradation "
            "submodels; see models/soh/README.md)",
            "dataset": str(a.dataset),
            "dataset_sha256": dataset_sha,
            "rows_fit": len(fit),
            "rows_validation": len(val),
            "rows_test": len(test),
            "trajectories_fit": sorted(set(train_names) - val_names),
            "trajectories_validation": sorted(val_names),
            "trajectories_test": sorted({r["trajectory"] for r in test}),
            "split": "by trajectory; the test trajectories' conditions are absent from training",
        },
        "network": {
            "hidden": list(HIDDEN),
            "activation": "relu",
            "epochs_run": len(history.history["loss"]),
            "seed": SEED,
        },
        "held_out": summary,
        "versions": versions,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    for kind, content in (("int8", int8_model), ("float32", float_model)):
        path = a.out / f"soh_{kind}.tflite"
        path.write_bytes(content)
        meta = dict(common)
        meta |= {
            "model_file": path.name,
            "sha256": hashlib.sha256(content).hexdigest(),
            "bytes": len(content),
            "dtype": kind,
        }
        if kind == "int8":
            meta["quantization"] = quant
        (a.out / f"soh_{kind}.json").write_text(json.dumps(meta, indent=1) + "\n")
    metrics = {
        "summary": summary,
        "per_condition": table,
        "train_s": round(train_s, 1),
        "total_s": round(time.time() - t0, 1),
    }
    (a.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
