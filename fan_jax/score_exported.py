"""An exported file scored on its run's test splits, with the evaluator training uses.

    python -m fan_jax.score_exported --model mobilefan_int8.tflite --workdir workdirs/wflw_distill

The same crops (the record's input size, box source and scale), decode, metrics (NME,
FR@0.1, AUC@0.1; flip-test from the file's own outputs), plots and metrics.json as
`--mode=eval`, written beside the file (`<file>.eval/`): the workdir is only read. The
file's interface comes from its sidecar (`<file>.json`, written by `fan_jax.export`), and
every disagreement between file, sidecar and workdir is one `ExportedFileError` naming the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from fan_jax import data, evaluate, geometry, landmarks
from fan_jax.errors import FanJaxError
from fan_jax.exported import (
    ExportedFileError,
    ExportedModel,
    open_model,
    read_sidecar,
    write_sidecar,
)
from fan_jax.record import CONFIG_FILE, read_record

if TYPE_CHECKING:
    from fan_jax.checkpoints import LoadedModel


def run_config(workdir: str, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The run's config from its record (where its data is, unless `data_dir` says)."""
    record = read_record(workdir)
    if record is None:
        raise ExportedFileError(
            f"{workdir}/{CONFIG_FILE}: missing; --workdir must be the training workdir the "
            "file was exported from (or one trained on the same data and crops)"
        )
    config = ml_collections.ConfigDict(record)
    if data_dir:
        config.dataset.data_dir = data_dir
    return config


def check_fits(path: str, info: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
    """The file must take the run's crops and predict its dataset's landmarks."""
    size, n = int(info["input"]["shape"][1]), int(info["num_landmarks"])
    if size != int(config.input_size):
        raise ExportedFileError(
            f"{path}: takes {size} px crops, the workdir's run was trained on "
            f"{config.input_size} px"
        )
    want = data.get(config.dataset.name).num_landmarks
    if n != want:
        raise ExportedFileError(f"{path}: predicts {n} landmarks, {config.dataset.name} has {want}")


def predict_fn(model: ExportedModel, kind: str, flip_perm: Any = None) -> evaluate.PredictFn:
    """uint8 crops -> (landmarks, flip-tested landmarks or None) in crop pixels, like the
    Evaluator's: a heatmap file's flip-test averages its heatmaps, a regression file's its
    normalised coordinates."""

    def raw(images: np.ndarray) -> np.ndarray:
        out = model(images.astype(np.float32))
        if kind == "heatmap":
            return out["heatmaps"]
        return np.asarray(landmarks.to_normalized(out["landmarks"], images.shape[1]))

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.asarray(images)
        size = images.shape[1]
        r = raw(images)
        plain = np.asarray(landmarks.decode(kind, jnp.asarray(r), size)[0])
        if flip_perm is None:
            return plain, None
        mirrored = landmarks.unmirror(kind, jnp.asarray(raw(images[:, :, ::-1])), flip_perm)
        flipped = landmarks.decode(kind, 0.5 * (jnp.asarray(r) + mirrored), size)[0]
        return plain, np.asarray(flipped)

    return predict


def summary(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict:
    """{split: {nme, fr, auc, count}} of the no-flip scores (what the sidecar records)."""
    return {
        s: {
            "nme": r["no_flip"]["nme"],
            "fr": r["no_flip"]["fr"],
            "auc": r["no_flip"]["auc"],
            "count": r["no_flip"]["num_images"],
        }
        for s, r in results.items()
    }


def score(
    path: str,
    workdir: str,
    *,
    flip_test: bool = True,
    data_dir: str | None = None,
    out_dir: str | None = "",
    sources: Mapping[str, Any] | None = None,
) -> dict:
    """Scores `path` on the workdir's test splits; writes metrics.json and plots to `out_dir`
    (default `<path>.eval/`; None: nowhere). `sources` replaces the TFDS splits (tests)."""
    info = read_sidecar(path)
    config = run_config(workdir, data_dir)
    check_fits(path, info, config)
    model = open_model(path, info)
    if sources is None:
        data.require_built(config)
        sources = data.sources(config, data.test_splits(config))
    perm = geometry.flip_permutation(int(info["num_landmarks"])) if flip_test else None
    return evaluate.evaluate_splits(
        predict_fn(model, str(info["kind"]), perm),
        {s: evaluate.eval_batches_fn(config, src) for s, src in sources.items() if s != "train"},
        config.dataset.name,
        config.eval.normalizer,
        out_dir=(path.rstrip("/") + ".eval") if out_dir == "" else out_dir,
        model_name=os.path.basename(path.rstrip("/")),
    )


def calibration_crops(
    config: ml_collections.ConfigDict, count: int, sources: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, dict]:
    """Up to `count` uint8 crops of the run's own training split, cut like its eval crops;
    ({'source', 'split', 'count'}) says what they are."""
    if sources is None:
        data.require_built(config)
        sources = data.sources(config, ("train",))
    batches = evaluate.eval_batches_fn(config, sources["train"])()
    crops: list[np.ndarray] = []
    for batch in batches:
        valid = np.asarray(batch.get("valid", np.ones(len(batch["image"]), bool)), bool)
        crops.extend(np.asarray(batch["image"])[valid])
        if len(crops) >= count:
            break
    crops = crops[:count]
    info = {"source": f"{config.dataset.name} train", "split": "train", "count": len(crops)}
    return np.stack(crops), info


def calibration_set(workdir: str, count: int) -> tuple[np.ndarray | None, dict | None]:
    """int8 calibration crops from the run's own training split (through its record), or
    (None, None) with a warning: export then calibrates on synthetic faces."""
    try:
        return calibration_crops(run_config(workdir), count)
    except (FanJaxError, OSError) as e:
        print(
            f"WARNING: int8 calibration: the run's training split cannot be read ({e}); "
            f"calibrating on {count} synthetic faces instead",
            file=sys.stderr,
        )
        return None, None


def evaluate_export(loaded: LoadedModel, out: str) -> str:
    """Scores `out` and the checkpoint on the run's test splits; records both in the sidecar;
    returns the table."""
    config = run_config(loaded.workdir)
    data.require_built(config)
    sources = data.sources(config, data.test_splits(config))
    got = score(out, loaded.workdir, sources=sources)
    perm = geometry.flip_permutation(loaded.num_landmarks)
    ref = evaluate.evaluate_splits(
        evaluate.Evaluator(loaded.kind, loaded.model, perm)(loaded.variables),
        {s: evaluate.eval_batches_fn(config, src) for s, src in sources.items()},
        config.dataset.name,
        config.eval.normalizer,
    )
    info = read_sidecar(out)
    info["evaluation"] = summary(got)
    info["evaluation_reference"] = summary(ref)
    write_sidecar(out, info)
    name = os.path.basename(out.rstrip("/"))
    return evaluate.format_table({f"JAX checkpoint (step {loaded.step})": ref, name: got})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fan_jax.score_exported",
        description="Score an exported model (.tflite, .onnx, SavedModel) on the test splits "
        "of the run it came from, as --mode=eval scores the checkpoint.",
    )
    parser.add_argument("--model", required=True, help="the exported file (its .json beside it)")
    parser.add_argument("--workdir", required=True, help="the training workdir it came from")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="where the dataset is built, if not where the run's record says",
    )
    parser.add_argument("--no_flip", action="store_true", help="skip the flip-test")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write the scores into the sidecar ('evaluation')",
    )
    args = parser.parse_args(argv)
    try:
        results = score(
            args.model, args.workdir, flip_test=not args.no_flip, data_dir=args.data_dir
        )
        if args.record:
            info = read_sidecar(args.model)
            info["evaluation"] = summary(results)
            write_sidecar(args.model, info)
    except (FanJaxError, OSError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(evaluate.format_table({os.path.basename(args.model.rstrip("/")): results}))
    print(f"metrics.json and plots in {args.model.rstrip('/')}.eval/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
