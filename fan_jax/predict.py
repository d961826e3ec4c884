"""Landmarks on any photo with a trained student: a Python API and a command line.

    python -m fan_jax.predict --workdir=DIR photo.jpg other.png [--draw OUT_DIR] [--output out.json]
    python -m fan_jax.predict --checkpoint DIR/checkpoints/1200 --box 120,80,260,240 photo.jpg

Faces come from `fan_jax.detect` (`--detector`: dlib's HOG detector when the `detect` extra
is installed, else scikit-image's LBP cascade), or from `--box x0,y0,x1,y1`. Detector boxes
are calibrated to the landmark box the models were trained on, and each box is cropped the
way training cropped (square, side = max(w, h) * 1.25, `geometry.crop_transform`),
all faces of all images are batched, and the jitted model runs once per padded batch size
(1, 2, 4, 8, 16, 32), so a handful of shapes is ever compiled. Landmarks come back in the
original image's pixel coordinates (0-based pixel centres).

The JAX, flax and orbax imports are deferred to where a workdir's model is loaded, so
`--model FILE` (an exported file, `fan_jax.exported.ExportedPredictor`) never imports them.

Exit status: 0 when every image gave at least one face; 1 when some image could not be read
or had no face (the others are still processed and reported); 2 for a missing or
incompatible checkpoint or bad arguments.

    from fan_jax.predict import Predictor
    predictor = Predictor.from_workdir("workdirs/wflw_distill")
    faces = predictor.predict(rgb_uint8_image)           # detect + landmarks
    faces = predictor.predict(image, boxes=[[x0, y0, x1, y1]])
    faces[0].landmarks                                    # [L, 2] float32, image pixels
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fan_jax import detect, geometry, outputs
from fan_jax.errors import CheckpointMismatchError, FanJaxError
from fan_jax.face_landmarks import BATCH_BUCKETS, LandmarkPipeline, bucket_size

# Faces and image files live in fan_jax.faces (shared with fan_jax.video); kept here for callers.
from fan_jax.faces import Face, ImageReadError, draw_faces, parse_box, read_image  # noqa: F401

if TYPE_CHECKING:
    from fan_jax.checkpoints import LoadedModel

PyTree = Any


class CheckpointError(FanJaxError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model its config names."""


# --------------------------------------------------------------------------- checkpoints


def _resolve_checkpoint(workdir: str | None, checkpoint: str | None, which: str) -> tuple[str, str]:
    """(workdir, which) from either a workdir or a checkpoint path.

    A checkpoint path may be a step directory (<workdir>/checkpoints/<step>), the checkpoints
    directory (then `which` picks the step) or a workdir.
    """
    if (workdir is None) == (checkpoint is None):
        raise CheckpointError("pass exactly one of --workdir or --checkpoint")
    if workdir is not None:
        return workdir, which
    assert checkpoint is not None  # exactly one of the two was given
    path = os.path.abspath(checkpoint.rstrip("/"))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    base = os.path.basename(path)
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path)), base
    if base == "checkpoints":
        return os.path.dirname(path), which
    return path, which


def load_student(
    workdir: str | None = None, checkpoint: str | None = None, which: str = "best"
) -> LoadedModel:
    """Restores the trained network of a run, heatmap or KD-Loss regression (its record,
    config.json, says which), through `fan_jax.checkpoints.load_model`.

    `which`: 'best' (by validation NME; the latest when no step has a metric), 'latest' or a
    step number. Raises CheckpointError with what is missing or which parameter differs.
    """
    import jax

    from fan_jax import checkpoints

    workdir, which = _resolve_checkpoint(workdir, checkpoint, which)
    if "://" not in workdir and not os.path.isdir(workdir):
        raise CheckpointError(f"workdir {workdir} does not exist")
    try:
        loaded = checkpoints.load_model(workdir, which)
    except (FileNotFoundError, CheckpointMismatchError, FanJaxError) as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(
            f"could not read the checkpoint in "
            f"{checkpoints.checkpoint_dir(workdir)} ({which}): "
            f"{type(e).__name__}: {e}"
        ) from None
    loaded.variables = jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.variables)
    return loaded


# --------------------------------------------------------------------------- faces


# The detectors live in fan_jax.detect; these names are kept for existing callers.
FaceDetector = detect.LBPDetector
suppress_overlaps = detect.suppress_overlaps


# --------------------------------------------------------------------------- predictor


class Predictor(LandmarkPipeline):
    """Face landmarks on numpy RGB uint8 images with a trained student (JAX).

    `Predictor(variables, model, num_landmarks, input_size)`; `variables` is the student's
    {'params', 'batch_stats'} (a training checkpoint's 'model' item also works: the
    'student' subtree is taken). Construct from a run with `from_workdir` / `from_checkpoint`.
    """

    def __init__(
        self,
        variables: PyTree,
        model: Any,
        num_landmarks: int,
        input_size: int = 256,
        *,
        kind: str = "heatmap",
        box_scale: float = 1.25,
        flip_test: bool = False,
        detector: str | Callable[[np.ndarray], np.ndarray] = "auto",
        buckets: Sequence[int] = BATCH_BUCKETS,
        precision: str = "float32",
    ):
        import jax
        import jax.numpy as jnp

        from fan_jax import checkpoints, compiler, landmarks
        from fan_jax.models.layers import inference_forms

        super().__init__(
            num_landmarks, input_size, kind=kind, box_scale=box_scale, detector=detector
        )
        self.variables = jax.device_put(
            jax.tree.map(jnp.asarray, checkpoints.student_variables(variables))
        )
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.traced_batch_sizes: list[int] = []  # one entry per compilation (tests, logging)
        flip_perm = None
        if flip_test:
            flip_perm = jnp.asarray(geometry.flip_permutation(self.num_landmarks))

        self.precision = "float32"

        def run(variables: PyTree, crops: Any) -> tuple[Any, Any]:
            self.traced_batch_sizes.append(int(crops.shape[0]))
            with inference_forms(self.precision):
                return landmarks.landmarks(kind, model, variables, crops, flip_perm)

        self._run_fn = run
        self._run = jax.jit(run, compiler_options=compiler.compiler_options("predict"))
        self._infer: Any = None  # `_run` with these variables built in (`_inference_fn`)
        self._infer_variables: Any = None
        self.info = {**self.info, "precision": "float32"}
        if precision != "float32":
            self.set_precision(precision)

    def set_precision(self, precision: str) -> str:
        """'float32'; 'bfloat16': the 1x1 and transposed convs multiply in bf16 (float32
        elsewhere, the stem too); 'auto': bf16 where the CPU has bf16 matmul units and it
        measures faster than float32 at batch 1 on this model (`fan_jax.precision`). Returns
        the one used."""
        import jax

        from fan_jax import compiler
        from fan_jax import precision as precision_lib

        if precision == "auto":
            precision, reason = precision_lib.choose(self)
            self.info = {**self.info, "precision_auto": reason}
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
        if precision != self.precision:
            self.precision = precision
            self._run = jax.jit(self._run_fn, compiler_options=compiler.predict_options(precision))
            self._infer = None
        self.info = {**self.info, "precision": precision}
        return precision

    def _inference_fn(self) -> Callable[[Any], tuple[Any, Any]]:
        """crops -> (landmarks, scores), jitted with the variables as constants of the
        program: passing their ~270 arrays as arguments cost ~0.5 ms a call at batch 1
        (argument parsing and transfer), about 5% of the 256 px forward on a 2-core CPU."""
        import jax

        if self._infer is None or self._infer_variables is not self.variables:
            variables = self._infer_variables = self.variables
            self._infer = jax.jit(
                lambda crops: self._run_fn(variables, crops),
                compiler_options=self.compiler_options(),
            )
        return self._infer

    def compiler_options(self) -> dict[str, Any] | None:
        """The XLA options this predictor's programs compile with (`fan_jax.compiler`)."""
        from fan_jax import compiler

        return compiler.predict_options(self.precision)

    def network_fn(self) -> Callable[[PyTree, Any], Any]:
        """The network alone on uint8 crops -> raw outputs (benchmarks: the decode's share)."""
        from fan_jax import landmarks
        from fan_jax.models.layers import inference_forms

        def net(variables: PyTree, crops: Any) -> Any:
            with inference_forms(self.precision):
                x = landmarks.normalize(crops)
                return landmarks.raw_outputs(self.kind, self.model, variables, x)

        return net

    @classmethod
    def from_workdir(cls, workdir: str, which: str = "best", **kwargs: Any) -> Predictor:
        """The student of a training workdir ('best', 'latest' or a step number)."""
        return cls.from_loaded(load_student(workdir=workdir, which=which), **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, which: str = "best", **kwargs: Any) -> Predictor:
        """From <workdir>/checkpoints/<step> (or the checkpoints directory, or a workdir)."""
        return cls.from_loaded(load_student(checkpoint=path, which=which), **kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kwargs: Any) -> Predictor:
        kwargs.setdefault("box_scale", loaded.box_scale)
        p = cls(
            loaded.variables,
            loaded.model,
            loaded.num_landmarks,
            loaded.input_size,
            kind=loaded.kind,
            **kwargs,
        )
        p.info = {**loaded.describe(), **p.info}
        return p

    def predict_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops [N, S, S, 3] -> (landmarks [N, L, 2] in crop pixels, scores [N, L]).

        Batches are padded to a bucket size, so at most len(buckets) shapes are compiled.
        """
        crops = np.asarray(crops)
        n = len(crops)
        if n == 0:
            return (
                np.zeros((0, self.num_landmarks, 2), np.float32),
                np.zeros((0, self.num_landmarks), np.float32),
            )
        if crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"crops must be [N, {self.input_size}, {self.input_size}, 3], got {crops.shape}"
            )
        pts, scores = [], []
        biggest = self.buckets[-1]
        for i in range(0, n, biggest):
            chunk = crops[i : i + biggest]
            k = len(chunk)
            b = bucket_size(k, self.buckets)
            if b > k:
                chunk = np.concatenate([chunk, np.zeros((b - k, *chunk.shape[1:]), chunk.dtype)])
            p, s = self._inference_fn()(chunk)
            pts.append(np.asarray(p)[:k])
            scores.append(np.asarray(s)[:k])
        return np.concatenate(pts), np.concatenate(scores)


# --------------------------------------------------------------------------- the CLI


def _draw_path(out_dir: str, image_path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return os.path.join(out_dir, name)


def add_checkpoint_args(parser: argparse.ArgumentParser, exported: bool = False) -> None:
    """--workdir | --checkpoint, and --which: the arguments of `load_student` (and, with
    `exported`, --model: an exported file instead)."""
    src = parser.add_mutually_exclusive_group(required=True)
    if exported:
        src.add_argument(
            "--model",
            help="an exported file (.tflite, .onnx, SavedModel; fan_jax.export) with its "
            ".json sidecar beside it, run in its own runtime instead of JAX",
        )
    src.add_argument("--workdir", help="training workdir (its config.json and checkpoints/)")
    src.add_argument(
        "--checkpoint", help="a checkpoint step directory <workdir>/checkpoints/<step>"
    )
    parser.add_argument(
        "--which",
        default="best",
        help="with --workdir: 'best', 'latest' or a step number (default best)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fan_jax.predict",
        description="Facial landmarks for images with a trained fan_jax student. Prints JSON "
        "(per image, per face: box and landmarks in image pixels).",
        epilog="Exit status: 0 all images had faces; 1 some image unreadable or without a "
        "face; 2 checkpoint or argument errors.",
    )
    add_checkpoint_args(parser, exported=True)
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="images, or one video file (.mp4, .avi, ...): then --draw is the "
        "annotated output video and --output a JSON-lines file",
    )
    from fan_jax import video

    video.add_video_args(parser)
    parser.add_argument(
        "--box",
        action="append",
        default=None,
        metavar="x0,y0,x1,y1",
        help="face box for every image instead of detection (repeatable)",
    )
    parser.add_argument(
        "--detector",
        default="auto",
        choices=["auto", *sorted(detect.DETECTORS)],
        help="face detector (fan_jax.detect): auto = dlib when installed "
        '(pip install -e ".[detect]"), else the LBP cascade',
    )
    parser.add_argument("--draw", metavar="OUT_DIR", help="write each image with its landmarks")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the JSON here, not stdout")
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="float32",
        help="bfloat16: the 1x1 and transposed convs multiply in bf16, the rest stays "
        "float32; auto: bf16 only on a CPU with bf16 units where it measures faster "
        "(fan_jax.precision, cached per CPU and model)",
    )
    parser.add_argument(
        "--flip_test",
        action="store_true",
        help="average with the mirrored crop's heatmaps (twice the compute)",
    )
    args = parser.parse_args(argv)
    is_video = args.camera is not None or (len(args.images) == 1 and video.is_video(args.images[0]))
    if not args.images and args.camera is None:
        parser.error("give images, a video file or --camera INDEX")

    boxes = None
    if args.box:
        try:
            boxes = np.stack([parse_box(b) for b in args.box])
        except ValueError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
    if args.model and args.flip_test:
        parser.error("--flip_test needs the JAX model (--workdir or --checkpoint)")
    if args.model and args.precision != "float32":
        parser.error("--precision applies to the JAX model; an exported file keeps its own")
    predictor: LandmarkPipeline
    try:
        if args.model:
            from fan_jax.exported import ExportedPredictor

            predictor = ExportedPredictor(args.model, detector=args.detector)
        else:
            predictor = Predictor.from_loaded(
                load_student(workdir=args.workdir, checkpoint=args.checkpoint, which=args.which),
                flip_test=args.flip_test,
                detector=args.detector,
                precision=args.precision,
            )
    except (FanJaxError, OSError) as e:  # the checkpoint, its record, or the exported file
        print(f"ERROR: {e}", file=sys.stderr)
        return 2

    if is_video:
        return video.run_cli(args, predictor)
    records: list[dict] = []
    images, slots = [], []
    for path in args.images:
        rec: dict[str, Any] = {"path": path}
        records.append(rec)
        try:
            img = read_image(path)
        except ImageReadError as e:
            rec.update(error=str(e), faces=[])
            print(f"ERROR: {e}", file=sys.stderr)
            continue
        rec.update(width=int(img.shape[1]), height=int(img.shape[0]))
        images.append(img)
        slots.append(rec)
    try:
        results = predictor.predict_many(images, None if boxes is None else [boxes] * len(images))
    except RuntimeError as e:  # no detector available
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    used: set[str] = set()
    status = 0 if len(images) == len(records) else 1
    for rec, img, faces in zip(slots, images, results):
        rec["faces"] = [f.to_json() for f in faces]
        if not faces:
            rec["error"] = "no face found (pass --box x0,y0,x1,y1 to give one)"
            print(f"{rec['path']}: no face found", file=sys.stderr)
            status = 1
        if args.draw:
            os.makedirs(args.draw, exist_ok=True)
            out_path = _draw_path(args.draw, rec["path"], used)
            outputs.write_image(out_path, draw_faces(img, faces))
            rec["drawn"] = out_path
    report = {"model": getattr(predictor, "info", {}), "images": records}
    text = json.dumps(report, indent=1)
    if args.output:
        outputs.write_text(args.output, text + "\n")
    else:
        print(text)
    n_faces = sum(len(r.get("faces", [])) for r in records)
    print(
        f"{len(records)} image(s), {n_faces} face(s)"
        f"{'' if status == 0 else '; some images failed (see above)'}",
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
