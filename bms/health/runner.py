"""The state-of-health model on the board: an int8 TFLite network over charge features.

``SohModel.load(path)`` reads ``path`` (a ``.tflite``) and its metadata sidecar (the same name
with ``.json``), checks the file's sha256 against the sidecar and creates an interpreter from
``ai_edge_litert`` or, where that is not installed (armv7l, Python <= 3.11 with numpy < 2),
from ``tflite_runtime``. Anything that goes wrong (no runtime, no or bad sidecar, a sha256
mismatch, an interpreter that cannot be built, a model whose tensors do not match the
sidecar) is logged once and leaves a model that answers every estimate with "no ML estimate"
and the reason: the service runs on without it, never crashes and never waits.

``estimate(features)`` takes the feature vector of bms/health/features.py (FEATURE_NAMES
order), scales and quantises it as the sidecar says, runs the network (one thread) and returns
a timestamped :class:`SohResult`. It is safe to call from a worker thread beside the loop; a
lock serialises calls on one model (a TFLite interpreter is not re-entrant).
:class:`HealthWorker` is such a worker: the loop submits features without blocking and reads
the newest result.

Imports only numpy and the standard library (so it runs in the tflite-runtime environment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms.health.features import FEATURE_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SohResult:
    """One estimate. ``t_s``: ``time.monotonic()`` when it was made. ``soh`` and ``soh_std``
    (1 sigma) are fractions of the parameter set's capacity, ``capacity_ah`` and
    ``capacity_std_ah`` the same in Ah; all NaN when there is no estimate, and then ``reason``
    says why. ``extrapolating`` names the inputs outside the range the model was trained on
    (the estimate is then less trustworthy than ``soh_std`` says)."""

    t_s: float
    soh: float
    soh_std: float
    capacity_ah: float
    capacity_std_ah: float
    reason: str | None = None
    extrapolating: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.reason is None


def _interpreter_class() -> tuple[type, str]:
    """The TFLite interpreter class and the runtime's name; ImportError if there is none."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        raise ImportError(
            "no TFLite runtime: install ai-edge-litert (or tflite-runtime with numpy < 2)"
        ) from None


class SohModel:
    """A loaded (or refused) SOH model; see the module docstring."""

    def __init__(self, path: Path, reason: str | None, metadata: dict | None = None):
        self.path = Path(path)
        self.reason = reason
        self.metadata = metadata or {}
        self.runtime: str | None = None
        self._interpreter = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.reason is None

    @classmethod
    def load(
        cls,
        path: Path | str,
        interpreter_class: Callable[[], tuple[type, str]] = _interpreter_class,
    ) -> SohModel:
        """Load ``path`` and its sidecar; never raises (see the module docstring)."""
        path = Path(path)
        try:
            metadata = json.loads(path.with_suffix(".json").read_text())
            content = path.read_bytes()
        except (OSError, ValueError) as exc:
            return cls._refused(path, f"cannot read the model or its metadata: {exc}")
        digest = hashlib.sha256(content).hexdigest()
        if digest != metadata.get("sha256"):
            return cls._refused(
                path,
                f"sha256 {digest} does not match the metadata's {metadata.get('sha256')}",
                metadata,
            )
        names = [item.get("name") for item in metadata.get("inputs", [])]
        if tuple(names) != FEATURE_NAMES:
            return cls._refused(
                path, f"the model's inputs {names} are not this version's features", metadata
            )
        try:
            interpreter_type, runtime = interpreter_class()
        except ImportError as exc:
            return cls._refused(path, str(exc), metadata)
        try:
            interpreter = interpreter_type(model_content=content, num_threads=1)
            interpreter.allocate_tensors()
        except Exception as exc:  # a runtime that cannot run this model: no ML estimate
            return cls._refused(path, f"{runtime} cannot load the model: {exc}", metadata)
        model = cls(path, None, metadata)
        model.runtime = runtime
        model._interpreter = interpreter
        model._input = interpreter.get_input_details()[0]
        model._output = interpreter.get_output_details()[0]
        problem = model._check_tensors()
        if problem:
            return cls._refused(path, problem, metadata)
        model._mean = np.array([item["mean"] for item in metadata["inputs"]])
        model._std = np.array([item["std"] for item in metadata["inputs"]])
        model._low = np.array([item["train_min"] for item in metadata["inputs"]])
        model._high = np.array([item["train_max"] for item in metadata["inputs"]])
        output = metadata["output"]
        model._target = (float(output["target_offset"]), float(output["target_scale"]))
        model.soh_std = float(output["std"])
        model.nominal_capacity_ah = float(output["nominal_capacity_ah"])
        log.info("SOH model %s loaded on %s", path, runtime)
        return model

    @classmethod
    def _refused(cls, path: Path, reason: str, metadata: dict | None = None) -> SohModel:
        log.warning("SOH model %s not used, no ML estimate: %s", path, reason)
        return cls(path, reason, metadata)

    def _check_tensors(self) -> str | None:
        """The interpreter's tensors against the sidecar: shape, type and int8 quantisation."""
        n = len(FEATURE_NAMES)
        if list(self._input["shape"]) != [1, n] or list(self._output["shape"]) != [1, 1]:
            return f"tensor shapes {self._input['shape']} -> {self._output['shape']}, not [1, {n}]"
        dtype = self.metadata.get("dtype")
        want = {"int8": np.int8, "float32": np.float32}.get(dtype)
        if want is None or self._input["dtype"] != want or self._output["dtype"] != want:
            return f"tensor types {self._input['dtype']}, {self._output['dtype']} are not {dtype}"
        if dtype == "int8":
            quant = self.metadata.get("quantization", {})
            pairs = (
                (self._input["quantization"], "input"),
                (self._output["quantization"], "output"),
            )
            for (scale, zero), side in pairs:
                if not (
                    math.isclose(scale, quant.get(f"{side}_scale", math.nan), rel_tol=1e-6)
                    and zero == quant.get(f"{side}_zero_point")
                ):
                    return f"the {side} quantisation ({scale}, {zero}) differs from the metadata"
        return None

    def estimate(self, features: np.ndarray, t_s: float | None = None) -> SohResult:
        """SOH from one feature vector ((n_features,), FEATURE_NAMES order); ``t_s`` defaults
        to ``time.monotonic()`` now. Never raises."""
        t_s = time.monotonic() if t_s is None else t_s
        if not self.available:
            return _none(t_s, self.reason)
        x = np.asarray(features, dtype=np.float64)
        if x.shape != (len(FEATURE_NAMES),):
            return _none(t_s, f"expected {len(FEATURE_NAMES)} features, got shape {x.shape}")
        bad = [
            name for name, value in zip(FEATURE_NAMES, x, strict=True) if not math.isfinite(value)
        ]
        if bad:
            return _none(t_s, f"feature(s) not known: {', '.join(bad)}")
        scaled = (x - self._mean) / self._std
        try:
            with self._lock:
                y = self._run(scaled)
        except Exception as exc:  # a runtime failure is no estimate, never a crash
            log.warning("SOH model %s failed: %s", self.path, exc)
            return _none(t_s, f"inference failed: {exc}")
        offset, scale = self._target
        soh = y * scale + offset
        outside = tuple(
            name
            for name, value, low, high in zip(FEATURE_NAMES, x, self._low, self._high, strict=True)
            if not low <= value <= high
        )
        return SohResult(
            t_s=t_s,
            soh=soh,
            soh_std=self.soh_std,
            capacity_ah=soh * self.nominal_capacity_ah,
            capacity_std_ah=self.soh_std * self.nominal_capacity_ah,
            extrapolating=outside,
        )

    def _run(self, scaled: np.ndarray) -> float:
        if self._input["dtype"] == np.int8:
            scale, zero = self._input["quantization"]
            q = np.clip(np.round(scaled / scale + zero), -128, 127).astype(np.int8)
            self._interpreter.set_tensor(self._input["index"], q[None, :])
        else:
            self._interpreter.set_tensor(self._input["index"], scaled[None, :].astype(np.float32))
        self._interpreter.invoke()
        raw = float(self._interpreter.get_tensor(self._output["index"])[0, 0])
        if self._output["dtype"] == np.int8:
            scale, zero = self._output["quantization"]
            return (raw - zero) * scale
        return raw


def _none(t_s: float, reason: str | None) -> SohResult:
    nan = math.nan
    return SohResult(t_s, nan, nan, nan, nan, reason or "no ML estimate")


@dataclass
class HealthWorker:
    """Runs ``model.estimate`` on its own thread. ``submit`` never blocks: a request that
    arrives while one is waiting replaces it (only the newest charge matters). ``on_result``
    (for persistence) is called on the worker thread with each result."""

    model: SohModel
    on_result: Callable[[SohResult], None] | None = None
    _requests: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))
    _latest: SohResult | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="soh-model", daemon=True)
        self._thread.start()

    def submit(self, features: np.ndarray) -> None:
        with contextlib.suppress(queue.Empty):
            self._requests.get_nowait()
        # queue.Full: another submitter won the race, and its features are as new
        with contextlib.suppress(queue.Full):
            self._requests.put_nowait(np.array(features, dtype=np.float64))

    def latest(self) -> SohResult | None:
        """The newest result (with its ``t_s``: the loop knows its age), or None."""
        return self._latest

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                features = self._requests.get(timeout=0.1)
            except queue.Empty:
                continue
            result = self.model.estimate(features)
            self._latest = result
            if self.on_result is not None:
                try:
                    self.on_result(result)
                except Exception:  # persistence failing must not stop the estimates
                    log.exception("SOH result callback failed")
