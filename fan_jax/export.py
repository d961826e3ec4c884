"""Export a trained student for deployment: TFLite (float32 / float16 / int8), ONNX, SavedModel.

    python -m fan_jax.export --workdir=DIR --format tflite --out mobilefan.tflite
    python -m fan_jax.export --workdir=DIR --format tflite --quantize int8 --out mobilefan_int8.tflite
    python -m fan_jax.export --workdir=DIR --format onnx --out mobilefan.onnx
    python -m fan_jax.export --workdir=DIR --format savedmodel --out mobilefan_savedmodel

Only the student is exported (no KD adapters, no teacher), in inference mode (BatchNorm uses
its running statistics). Every exported model has the same interface:

  input  'image'      float32 [B, S, S, 3]: an RGB face crop with values 0..255 (uint8 pixels
                      cast to float). The ImageNet mean/std normalisation is inside the graph,
                      so callers do no arithmetic. The crop is the one training used:
                      `geometry.crop_transform(box, S, box_scale=1.25)` applied with
                      `geometry.warp_image` (bilinear, zero border), S = the run's input_size.
  output 'heatmaps'   float32 [B, S/4, S/4, L], one map per landmark (NHWC).
         'landmarks'  float32 [B, L, 2], (x, y) in crop pixel coordinates (pixel-centre
                      convention): the heatmap argmax moved 0.25 px toward the larger
                      neighbour per axis, exactly `heatmaps.decode` + `from_heatmap_coords`.
                      Map them back to the photo with `geometry.invert_affine` of the crop.

Batch: ONNX and SavedModel take any B. TFLite has a fixed B (`--batch_size`, default 1):
the converter cannot lower the argmax reduction with a dynamic batch. A JSON sidecar
`<out>.json` records the interface, the landmark count and the run it came from.

Conversion paths: TFLite and SavedModel via `jax.experimental.jax2tf` (StableHLO inside
TensorFlow) then `tf.lite.TFLiteConverter`, run with `ai_edge_litert`; ONNX via `jax2onnx`,
run with `onnxruntime`.
"""

from __future__ import annotations

import argparse
import json
import logging as _pylogging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from fan_jax import geometry, landmarks, predict
from fan_jax.checkpoints import student_variables
from fan_jax.errors import FanJaxError
from fan_jax.export_graph import inference_fn, output_names

# The runtimes live in fan_jax.exported; these names are kept for existing callers.
from fan_jax.exported import (  # noqa: F401
    INPUT_NAME,
    OUTPUT_NAMES,
    SIDE_CAR_SUFFIX,
    ExportedModel,
    detect_format,
    load_exported,
    sidecar_path,
)

FORMATS = ("tflite", "onnx", "savedmodel")
QUANTIZATIONS = ("none", "float16", "int8")


# --------------------------------------------------------------------------- exporters


def _tf_serving_function(
    infer: Callable, input_size: int, batch_size: int | None, names: tuple[str, ...] = OUTPUT_NAMES
) -> Any:
    """A tf.function with signature image -> {'heatmaps', 'landmarks'} (None batch: any)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    poly = None if batch_size else [f"(b, {input_size}, {input_size}, 3)"]
    converted = jax2tf.convert(infer, with_gradient=False, polymorphic_shapes=poly)
    spec = tf.TensorSpec((batch_size, input_size, input_size, 3), tf.float32, name=INPUT_NAME)

    @tf.function(autograph=False, input_signature=[spec])
    def serve(image: Any) -> dict[str, Any]:
        return {n: tf.identity(v, name=n) for n, v in zip(names, converted(image))}

    return serve


def _save_tf_module(serve: Any, path: str) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve.get_concrete_function()})


def export_savedmodel(
    model: Any, variables: Mapping[str, Any], input_size: int, path: str, *, kind: str = "heatmap"
) -> str:
    """Writes a TF SavedModel (signature 'serving_default', any batch size) to directory `path`."""
    serve = _tf_serving_function(
        inference_fn(model, variables, kind=kind), input_size, None, output_names(kind)
    )
    _save_tf_module(serve, path)
    return path


def synthetic_crops(num: int, input_size: int, seed: int = 0) -> np.ndarray:
    """uint8 [num, S, S, 3] face crops from `fan_jax.synthetic`, cropped as at inference.

    Poses, scales and box jitter vary so a quantizer sees the activation ranges of real use.
    """
    from fan_jax import synthetic

    rng = np.random.default_rng(seed)
    out = np.empty((num, input_size, input_size, 3), np.uint8)
    for i in range(num):
        img, lm = synthetic.render_face(
            np.random.default_rng([seed, i]), size=int(max(input_size, 160) * 1.25)
        )
        box = geometry.box_from_landmarks(lm)
        m = geometry.crop_transform(
            box,
            input_size,
            box_scale=1.25,
            rotation_deg=float(rng.uniform(-15, 15)),
            scale=float(rng.uniform(0.9, 1.1)),
        )
        out[i] = geometry.warp_image(img, m, input_size)
    return out


def export_tflite(
    model: Any,
    variables: Mapping[str, Any],
    input_size: int,
    path: str,
    *,
    quantize: str = "none",
    batch_size: int = 1,
    representative: np.ndarray | None = None,
    num_representative: int = 64,
    kind: str = "heatmap",
) -> str:
    """Writes a .tflite model with a fixed batch size.

    quantize: 'none' (float32), 'float16' (float16 weights, float32 compute: half the size,
    same landmarks) or 'int8' (int8 weights and activations, calibrated on `representative`
    uint8 crops, by default `num_representative` synthetic faces; float32 input/output).
    """
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; expected one of {QUANTIZATIONS}")
    serve = _tf_serving_function(
        inference_fn(model, variables, kind=kind), input_size, batch_size, output_names(kind)
    )
    with tempfile.TemporaryDirectory() as tmp:
        # Converting from a SavedModel keeps the signature's input and output names.
        _save_tf_module(serve, tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["serving_default"]
        )
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            reps = (
                representative
                if representative is not None
                else synthetic_crops(num_representative, input_size, seed=1234)
            )
            reps = np.asarray(reps, np.float32)

            def dataset() -> Iterator[list[np.ndarray]]:
                for i in range(0, len(reps) - batch_size + 1, batch_size):
                    yield [reps[i : i + batch_size]]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            # int8 kernels where they exist, float fallback (argmax decode) elsewhere.
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def _import_jax2onnx_plugins() -> None:
    """Loads only jax2onnx's lax/jnp plugins.

    `to_onnx` otherwise imports every plugin module, including the equinox and example
    trees, which build and compile dozens of demo models at import (a minute of CPU);
    our graph is lax primitives and linen layers. Falls back to the full import on any API change.
    """
    try:
        from pathlib import Path

        from jax2onnx.plugins import plugin_system as ps

        if getattr(ps, "_already_imported_plugins", True):
            return
        root = Path(ps.__file__).parent
        # The linen plugins too: they lower nn.Conv / nn.BatchNorm as ONNX ops; without
        # them the jnp plugins make linen's shape checks see tracers.
        ps._import_tree(root / "jax", "jax2onnx.plugins.jax")
        ps._import_tree(root / "flax" / "linen", "jax2onnx.plugins.flax.linen")
        ps._already_imported_plugins = True
    except Exception:
        pass


def export_onnx(
    model: Any,
    variables: Mapping[str, Any],
    input_size: int,
    path: str,
    *,
    metadata: Mapping[str, str] | None = None,
    kind: str = "heatmap",
) -> str:
    """Writes a single-file .onnx model with a symbolic batch dimension 'batch'."""
    _pylogging.getLogger("onnx_ir").setLevel(_pylogging.ERROR)
    _import_jax2onnx_plugins()
    from jax2onnx import to_onnx

    proto = to_onnx(
        inference_fn(model, variables, kind=kind),
        [("batch", input_size, input_size, 3)],
        model_name="fan_jax",
        input_names=[INPUT_NAME],
        output_names=list(output_names(kind)),
    )
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


# --------------------------------------------------------------------------- driver


def export(
    model: Any,
    variables: Mapping[str, Any],
    input_size: int,
    fmt: str,
    out: str,
    *,
    quantize: str = "none",
    batch_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    num_representative: int = 64,
    kind: str = "heatmap",
    representative: np.ndarray | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> str:
    """Exports to `out` in format `fmt` and writes the `<out>.json` sidecar; returns `out`.

    int8 calibrates on `representative` uint8 crops (described by `calibration` in the
    sidecar), else on `num_representative` synthetic faces."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if quantize != "none" and fmt != "tflite":
        raise ValueError(f"--quantize {quantize} applies to tflite only")
    if input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    info = describe(
        model,
        variables,
        input_size,
        fmt,
        quantize,
        batch_size if fmt == "tflite" else None,
        metadata,
        kind=kind,
    )
    if fmt == "tflite":
        export_tflite(
            model,
            variables,
            input_size,
            out,
            quantize=quantize,
            batch_size=batch_size,
            num_representative=num_representative,
            representative=representative,
            kind=kind,
        )
        if quantize == "int8":
            info["calibration"] = dict(
                calibration
                if representative is not None and calibration
                else {"source": "synthetic", "split": None, "count": num_representative}
            )
    elif fmt == "onnx":
        export_onnx(
            model,
            variables,
            input_size,
            out,
            metadata={"fan_jax": json.dumps(info, sort_keys=True)},
            kind=kind,
        )
    else:
        export_savedmodel(model, variables, input_size, out, kind=kind)
    with open(sidecar_path(out), "w") as f:
        json.dump(info, f, indent=2)
    return out


def describe(
    model: Any,
    variables: Mapping[str, Any],
    input_size: int,
    fmt: str,
    quantize: str,
    batch_size: int | None,
    metadata: Mapping[str, Any] | None = None,
    kind: str = "heatmap",
) -> dict:
    """The sidecar: what goes in, what comes out, how to map landmarks back."""
    head = student_variables(variables)["params"]["head"]
    if kind == "regression":
        num_landmarks = int(np.shape(head["out"]["kernel"])[-1]) // 2
    else:
        num_landmarks = int(np.shape(head["conv"]["kernel"])[-1])
    hm = input_size // 4
    outputs = {
        "heatmaps": {
            "shape": [batch_size or "batch", hm, hm, num_landmarks],
            "dtype": "float32",
            "stride": 4,
        },
        "landmarks": {
            "shape": [batch_size or "batch", num_landmarks, 2],
            "dtype": "float32",
            "units": "crop pixels (x, y), pixel-centre convention",
        },
    }
    return {
        "format": fmt,
        "quantize": quantize,
        "num_landmarks": num_landmarks,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch_size or "batch", input_size, input_size, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "normalization": "inside the graph: (x / 255 - mean) / std, ImageNet "
            f"mean {list(landmarks.IMAGENET_MEAN)} std "
            f"{list(landmarks.IMAGENET_STD)}",
            "crop": "square crop centred on the face box, side = max(w, h) * 1.25, "
            "resized to the input size (fan_jax.geometry.crop_transform)",
        },
        "kind": kind,
        "outputs": {k: outputs[k] for k in output_names(kind)},
        **({"source": dict(metadata)} if metadata else {}),
    }


def _verify(
    model: Any, variables: Mapping[str, Any], input_size: int, path: str, kind: str = "heatmap"
) -> dict:
    """Runs the exported model next to JAX on two synthetic face crops."""
    crops = synthetic_crops(2, input_size, seed=7)
    got = load_exported(path)(crops)
    want = dict(
        zip(
            output_names(kind),
            jax.jit(inference_fn(model, variables, kind=kind))(crops.astype(np.float32)),
        )
    )
    out = {"max_landmark_diff_px": float(np.max(np.abs(got["landmarks"] - want["landmarks"])))}
    if "heatmaps" in want:
        out["max_abs_heatmap_diff"] = float(np.max(np.abs(got["heatmaps"] - want["heatmaps"])))
    return out


def file_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fan_jax.export",
        description="Export a trained student (no adapters, inference mode). The model takes "
        "float32 RGB 0..255 face crops [B,S,S,3] (normalisation is inside) and "
        "returns 'heatmaps' and 'landmarks' (crop pixels). See <out>.json.",
    )
    predict.add_checkpoint_args(parser)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (.tflite/.onnx) or directory")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZATIONS,
        help="tflite only: float16 weights, or int8 calibrated on synthetic faces",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="tflite only: fixed batch size")
    parser.add_argument(
        "--num_representative",
        type=int,
        default=300,
        help="int8: crops of the run's own training split that calibrate activation ranges "
        "(synthetic faces, with a warning, when that split cannot be read)",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="score the new file and the checkpoint side by side on the run's test splits "
        "(the sidecar records both; plots in <out>.eval/)",
    )
    parser.add_argument(
        "--no_verify",
        action="store_true",
        help="skip running the exported model next to JAX on two synthetic faces",
    )
    args = parser.parse_args(argv)
    try:
        loaded = predict.load_student(
            workdir=args.workdir, checkpoint=args.checkpoint, which=args.which
        )
    except (FanJaxError, OSError) as e:  # the checkpoint or its record
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if args.quantize != "none" and args.format != "tflite":
        parser.error("--quantize applies to --format tflite only")
    from fan_jax import score_exported

    representative, calibration = None, None
    if args.quantize == "int8":
        representative, calibration = score_exported.calibration_set(
            loaded.workdir, args.num_representative
        )
    t0 = time.perf_counter()
    try:
        export(
            loaded.model,
            loaded.variables,
            loaded.input_size,
            args.format,
            args.out,
            quantize=args.quantize,
            batch_size=args.batch_size,
            metadata=loaded.describe(),
            num_representative=args.num_representative,
            kind=loaded.kind,
            representative=representative,
            calibration=calibration,
        )
    except OSError as e:  # an unwritable --out
        print(f"ERROR: {args.out}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(
        f"Wrote {args.out} ({file_size(args.out) / 2**20:.2f} MiB) in "
        f"{time.perf_counter() - t0:.0f}s; interface in {args.out.rstrip('/')}{SIDE_CAR_SUFFIX}"
    )
    if not args.no_verify:
        print(
            "Check against JAX on synthetic faces:",
            json.dumps(
                _verify(loaded.model, loaded.variables, loaded.input_size, args.out, loaded.kind)
            ),
        )
    if args.evaluate:
        try:
            print(score_exported.evaluate_export(loaded, args.out))
        except (FanJaxError, OSError) as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
