"""Exported models (`fan_jax.export`) run in their own runtimes: ai_edge_litert for TFLite,
onnxruntime for ONNX, TensorFlow for a SavedModel. No JAX.

    model = load_exported("mobilefan.tflite")
    out = model(crops)        # {'heatmaps', 'landmarks'}, float32 crops [B, S, S, 3] 0..255
"""

from __future__ import annotations

import os

import numpy as np

# The interface every exported model has (see `fan_jax.export`).
INPUT_NAME = "image"
OUTPUT_NAMES = ("heatmaps", "landmarks")


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
