"""The TFLite runner with the committed models: estimates on held-out physics check-ups, and
every way of not having an ML estimate (no runtime, a changed file, a broken model, bad
features) answered without an exception.

Runs on whichever runtime is installed: ai-edge-litert in the project's environment, and
tflite-runtime in an environment with numpy < 2 (see models/soh/README.md, "Fallback")."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bms.health.features import FEATURE_NAMES
from bms.health.runner import HealthWorker, SohModel

REPO = Path(__file__).resolve().parents[3]
MODELS = REPO / "models" / "soh"
INT8 = MODELS / "soh_int8.tflite"
FLOAT = MODELS / "soh_float32.tflite"
TRUTH = json.loads((REPO / "tests" / "data" / "soh" / "truth.json").read_text())["files"]


@pytest.fixture(scope="module")
def int8():
    model = SohModel.load(INT8)
    assert model.available, model.reason
    return model


def test_the_installed_runtime_is_used(int8):
    expected = "ai_edge_litert" if importlib.util.find_spec("ai_edge_litert") else "tflite_runtime"
    assert int8.runtime == expected


def test_held_out_check_ups_within_the_target(int8):
    """The sample is a trajectory whose condition no training run had; truth from PyBaMM."""
    for name, truth in TRUTH.items():
        result = int8.estimate(np.array(truth["features"]), t_s=12.5)
        assert result.available and result.t_s == 12.5
        assert abs(result.soh - truth["soh_true"]) <= 0.02, name
        assert result.capacity_ah == pytest.approx(result.soh * int8.nominal_capacity_ah)
        assert 0.0 < result.soh_std < 0.05


def test_int8_and_float_agree(int8):
    float_model = SohModel.load(FLOAT)
    assert float_model.available, float_model.reason
    for truth in TRUTH.values():
        features = np.array(truth["features"])
        assert abs(int8.estimate(features).soh - float_model.estimate(features).soh) <= 0.005


def copy_models(tmp_path: Path) -> Path:
    for suffix in (".tflite", ".json"):
        shutil.copy(INT8.with_suffix(suffix), tmp_path / f"soh{suffix}")
    return tmp_path / "soh.tflite"


def no_estimate(model: SohModel, match: str) -> None:
    assert not model.available
    assert match in model.reason
    result = model.estimate(np.ones(len(FEATURE_NAMES)))
    assert not result.available and np.isnan(result.soh) and np.isnan(result.capacity_ah)
    assert match in result.reason


def test_a_changed_model_file_is_refused(tmp_path):
    path = copy_models(tmp_path)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    no_estimate(SohModel.load(path), "sha256")


def test_a_missing_sidecar_or_model_is_no_estimate(tmp_path):
    path = copy_models(tmp_path)
    path.with_suffix(".json").unlink()
    no_estimate(SohModel.load(path), "cannot read")
    no_estimate(SohModel.load(tmp_path / "absent.tflite"), "cannot read")


def test_without_a_runtime_there_is_no_estimate():
    def none_installed():
        raise ImportError("no TFLite runtime: install ai-edge-litert")

    no_estimate(SohModel.load(INT8, interpreter_class=none_installed), "no TFLite runtime")


def test_a_file_that_is_no_model_is_refused_by_the_runtime(tmp_path):
    path = copy_models(tmp_path)
    path.write_bytes(b"not a flatbuffer" * 64)
    meta = json.loads(path.with_suffix(".json").read_text())

    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))
    no_estimate(SohModel.load(path), "cannot load the model")


def test_metadata_whose_quantisation_differs_is_refused(tmp_path):
    path = copy_models(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["quantization"]["output_scale"] *= 2.0
    path.with_suffix(".json").write_text(json.dumps(meta))
    no_estimate(SohModel.load(path), "output quantisation")


def test_features_of_another_version_are_refused(tmp_path):
    path = copy_models(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["inputs"] = meta["inputs"][::-1]
    path.with_suffix(".json").write_text(json.dumps(meta))
    no_estimate(SohModel.load(path), "not this version's features")


def test_unknown_or_misshapen_features_are_no_estimate(int8):
    features = np.array(next(iter(TRUTH.values()))["features"])
    features[-1] = np.nan
    result = int8.estimate(features)
    assert not result.available and "resistance_growth" in result.reason
    assert "shape" in int8.estimate(np.ones(3)).reason


def test_inputs_outside_the_training_range_are_named(int8):
    features = np.array(next(iter(TRUTH.values()))["features"])
    features[FEATURE_NAMES.index("temp_c")] = 80.0
    result = int8.estimate(features)
    assert result.available and result.extrapolating == ("temp_c",)


def test_estimates_from_several_threads_are_the_same(int8):
    features = [np.array(t["features"]) for t in TRUTH.values()]
    expected = [int8.estimate(f).soh for f in features]
    seen, errors = [], []

    def work():
        try:
            for _ in range(50):
                seen.append([int8.estimate(f).soh for f in features])
        except Exception as exc:  # collected: an exception in a thread would vanish
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(seen) == 200 and all(s == expected for s in seen)


def test_the_worker_publishes_the_newest_result_and_survives_a_failing_callback(int8):
    results = []

    def persist(result):
        results.append(result)
        raise OSError("disk full")

    worker = HealthWorker(int8, on_result=persist)
    worker.start()
    try:
        assert worker.latest() is None
        features = np.array(next(iter(TRUTH.values()))["features"])
        for _ in range(2):
            before = len(results)
            worker.submit(features)
            deadline = time.monotonic() + 30.0
            while len(results) == before and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(results) == 2  # the second request ran although the callback raised
        assert worker.latest() is results[-1] and worker.latest().available
    finally:
        worker.stop()
