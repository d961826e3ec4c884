"""Exported models (`fan_jax.export`) run in their own runtimes: ai_edge_litert for TFLite,
onnxruntime for ONNX, TensorFlow for a SavedModel. No JAX.

    model = load_exported("mobilefan.tflite")
    out = model(crops)        # {'heatmaps', 'landmarks'}, float32 crops [B, S, S, 3] 0..255
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fan_jax import outputs
from fan_jax.errors import FanJaxError
from fan_jax.face_landmarks import LandmarkPipeline

# The interface every exported model has (see `fan_jax.export`).
INPUT_NAME = "image"
OUTPUT_NAMES = ("heatmaps", "landmarks")
SIDE_CAR_SUFFIX = ".json"


class ExportedModel:
    """An exported model in its own runtime: `model(images) -> {'heatmaps', 'landmarks'}`.

    images: float32 (or uint8) [B, S, S, 3] RGB 0..255 crops. TFLite models with a fixed
    batch run larger batches in chunks.
    """

    def __init__(self, path: str, num_threads: int | None = None):
        self.path = path
        self.format = detect_format(path)
        if self.format == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            self._interp = Interpreter(model_path=path, num_threads=num_threads)
            self._runner = self._interp.get_signature_runner("serving_default")
            spec = self._runner.get_input_details()[INPUT_NAME]
            self.batch_size: int | None = int(spec["shape"][0])
            self.input_size = int(spec["shape"][1])
        elif self.format == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if num_threads:
                opts.intra_op_num_threads = num_threads
            self._sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            shape = self._sess.get_inputs()[0].shape
            self.batch_size = None
            self.input_size = int(shape[1])
        else:
            import tensorflow as tf

            self._tf = tf
            self._loaded = tf.saved_model.load(path)
            self._fn = self._loaded.signatures["serving_default"]
            shape = self._fn.structured_input_signature[1][INPUT_NAME].shape
            self.batch_size = None
            self.input_size = int(shape[1])

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.format == "tflite":
            out = self._runner(**{INPUT_NAME: x})
        elif self.format == "onnx":
            names = [o.name for o in self._sess.get_outputs()]
            out = dict(zip(names, self._sess.run(names, {INPUT_NAME: x})))
        else:
            out = self._fn(**{INPUT_NAME: self._tf.constant(x)})
        return {k: np.asarray(out[k]) for k in OUTPUT_NAMES if k in out}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(images, np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected images [B, {self.input_size}, {self.input_size}, 3], got {x.shape}"
            )
        b = self.batch_size
        if b is None or len(x) == b:
            return self._run(x)
        parts = []
        for i in range(0, len(x), b):
            chunk = x[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            parts.append({k: v[:n] for k, v in self._run(chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def detect_format(path: str) -> str:
    """'tflite', 'onnx' or 'savedmodel' from a path."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return "savedmodel"
        raise ValueError(f"{path} is a directory without saved_model.pb")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tflite", ".onnx"):
        return ext[1:]
    raise ValueError(
        f"cannot tell the format of {path}: expected .tflite, .onnx or a SavedModel directory"
    )


def load_exported(path: str, num_threads: int | None = None) -> ExportedModel:
    """Opens an exported model in its runtime (ai_edge_litert, onnxruntime or TensorFlow)."""
    return ExportedModel(path, num_threads=num_threads)


# --------------------------------------------------------------------------- the sidecar


class ExportedFileError(FanJaxError, ValueError):
    """An exported file, or its sidecar, that cannot be used as it is."""


def sidecar_path(path: str) -> str:
    return path.rstrip("/") + SIDE_CAR_SUFFIX


def read_sidecar(path: str) -> dict:
    """The sidecar `fan_jax.export` wrote beside `path`."""
    side = sidecar_path(path)
    if not os.path.exists(side):
        raise ExportedFileError(
            f"{side}: missing; it describes {path}'s interface (python -m fan_jax.export writes "
            "it beside the model file: keep the two together)"
        )
    try:
        with open(side) as f:
            info = json.load(f)
        fields = (int(info["num_landmarks"]), int(info["input"]["shape"][1]), info["kind"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ExportedFileError(f"{side}: not a fan_jax export sidecar ({e!r})") from None
    if fields[2] not in ("heatmap", "regression"):
        raise ExportedFileError(f"{side}: unknown model kind {fields[2]!r}")
    return info


def open_model(
    path: str, sidecar: Mapping[str, Any] | None = None, num_threads: int | None = None
) -> ExportedModel:
    """The file in its runtime, checked against its sidecar (input size, landmark count)."""
    info = read_sidecar(path) if sidecar is None else sidecar
    if not os.path.exists(path):
        raise ExportedFileError(f"{path}: no such file")
    try:
        detect_format(path)
    except ValueError as e:  # an extension no runtime reads
        raise ExportedFileError(str(e)) from None
    try:
        model = load_exported(path, num_threads=num_threads)
    except Exception as e:  # each runtime raises its own type for a truncated or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportedFileError(
            f"{path}: the {os.path.splitext(path)[1] or 'SavedModel'} runtime cannot load it "
            f"(truncated, or not a model of this format): {first[:300]}"
        ) from None
    want = int(info["input"]["shape"][1])
    if model.input_size != want:
        raise ExportedFileError(
            f"{path}: takes {model.input_size} px crops, its sidecar {sidecar_path(path)} says "
            f"{want}"
        )
    probe = model(np.zeros((1, want, want, 3), np.float32))
    have = int(probe["landmarks"].shape[1])
    if have != int(info["num_landmarks"]):
        raise ExportedFileError(
            f"{path}: predicts {have} landmarks, its sidecar says {info['num_landmarks']}"
        )
    return model


def write_sidecar(path: str, info: Mapping[str, Any]) -> None:
    """Rewrites the sidecar whole (a reader never sees half of it)."""
    outputs.write_text(sidecar_path(path), json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- landmarks


class ExportedPredictor(LandmarkPipeline):
    """`fan_jax.predict.Predictor`'s detect, crop and map back around an exported file run
    in its own runtime; its interface (input size, landmark count, kind, box scale) comes
    from the sidecar. No JAX, flax or orbax."""

    def __init__(
        self,
        path: str,
        *,
        detector: str | Callable[[np.ndarray], np.ndarray] = "auto",
        num_threads: int | None = None,
    ):
        info = read_sidecar(path)
        source = info.get("source", {})
        super().__init__(
            int(info["num_landmarks"]),
            int(info["input"]["shape"][1]),
            kind=str(info["kind"]),
            box_scale=float(source.get("box_scale", 1.25)),
            detector=detector,
        )
        self.model = open_model(path, info, num_threads=num_threads)
        self.info = {
            "model_file": path,
            "format": info["format"],
            "quantize": info.get("quantize"),
            **source,
        }

    def predict_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        crops = np.asarray(crops)
        if len(crops) == 0:
            return (
                np.zeros((0, self.num_landmarks, 2), np.float32),
                np.zeros((0, self.num_landmarks), np.float32),
            )
        out = self.model(crops)
        pts = np.asarray(out["landmarks"], np.float32)
        if "heatmaps" in out:
            scores = np.asarray(out["heatmaps"]).max(axis=(1, 2)).astype(np.float32)
        else:
            scores = np.ones(pts.shape[:2], np.float32)
        return pts, scores
