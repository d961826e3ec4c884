"""grain input pipelines: decode, affine crop + augmentation, batching, sharding.

Sources are random-access sequences of dicts with the TFDS features of the contract
('image', 'landmarks', 'box', 'to_original', 'original_landmarks', 'file_name', extras);
``tfds.data_source(...)`` returns one, and so does a plain list (images may be decoded
uint8 arrays or encoded JPEG/PNG bytes).

Images leave the host as uint8 NHWC, not normalised float32: that is 4x less host->device
traffic and host memory in the prefetch buffers. The step calls :func:`normalize` (jnp, on
device) to get ImageNet mean/std float32. Heatmap targets are rendered on device too; this
module only ships landmarks in crop pixel coordinates.

Train batches: {'image' uint8 [B,S,S,3], 'landmarks' float32 [B,L,2]}, B = global / hosts.
Eval batches add what maps predictions back: 'crop_to_original' float32 [B,2,3],
'original_landmarks' [B,L,2], 'index' int32 [B], 'file_name' bytes [B], 'valid' bool [B],
plus the dataset's extras ('attributes', 'occluded', 'subset') when present.

Checkpointing: :func:`train_iterator` returns grain's own ``DatasetIterator``.
``it.get_state()`` is a JSON-serialisable dict and ``it.set_state(state)`` resumes with
exactly the next batch. With orbax, save it as an item handled by
``grain.checkpoint.CheckpointHandler`` via ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` (one JSON file per process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import grain
import jax
import numpy as np
from absl import flags

from fan_jax import geometry

# Dataset-specific features passed through to eval batches when a source has them.
EVAL_EXTRAS = ("attributes", "occluded", "subset")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Crop and augmentation settings (defaults: the public MobileFAN code)."""

    output_size: int = 256
    box_source: str = "landmarks"  # 'landmarks' (public code) or 'dataset'
    box_scale: float = 1.25
    p_rotate: float = 0.6
    max_rotation_deg: float = 30.0
    scale_range: tuple[float, float] = (0.75, 1.25)
    p_flip: float = 0.5
    photometric: bool = False
    brightness: float = 0.2  # factor in [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self):
        if self.box_source not in ("landmarks", "dataset"):
            raise ValueError(
                f"box_source must be 'landmarks' or 'dataset', got {self.box_source!r}"
            )
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | Any) -> AugmentConfig:
        """Picks the known fields out of a dict or ml_collections.ConfigDict; ignores the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        items = m.items() if hasattr(m, "items") else vars(m).items()
        return cls(**{k: v for k, v in items if k in names})


# ---------------------------------------------------------------------------------------
# Normalisation (device side)


# ---------------------------------------------------------------------------------------
# Per-example transforms (picklable: grain's worker processes are spawned)


def decode_image(image: Any) -> np.ndarray:
    """Decoded uint8 HxWx3 RGB from an array (HxW, HxWx1, HxWx3) or encoded JPEG/PNG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        buf = np.frombuffer(bytes(image), dtype=np.uint8)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError("could not decode image bytes")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def _as_bytes(v: Any) -> bytes:
    return v.encode("utf-8") if isinstance(v, str) else bytes(v)


def _box(example: Mapping[str, Any], landmarks: np.ndarray, box_source: str) -> np.ndarray:
    if box_source == "landmarks":
        return geometry.box_from_landmarks(landmarks)
    return np.asarray(example["box"], dtype=np.float64)


def compose_affine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[2,3] affine of x -> a(b(x))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.concatenate([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2] + a[:, 2])[:, None]], axis=1)


def _photometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    # Draw every factor up front so the stream does not depend on the image.
    fb, fc, fs = rng.uniform(-1.0, 1.0, size=3) * (cfg.brightness, cfg.contrast, cfg.saturation)
    x = image.astype(np.float32) * (1.0 + fb)
    luma = np.asarray([0.299, 0.587, 0.114], np.float32)
    grey = x @ luma
    x = grey.mean() + (x - grey.mean()) * (1.0 + fc)
    grey = x @ luma
    x = grey[..., None] + (x - grey[..., None]) * (1.0 + fs)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class TrainTransform(grain.transforms.RandomMap):
    """Example -> {'image' uint8 [S,S,3], 'landmarks' float32 [L,2]} with random affine + flip."""

    def __init__(self, num_landmarks: int, config: AugmentConfig = AugmentConfig()):
        self.config = config
        self.num_landmarks = int(num_landmarks)
        self.perm = (
            np.asarray(geometry.flip_permutation(num_landmarks)) if config.p_flip > 0 else None
        )

    def sample_params(self, rng: np.random.Generator) -> tuple[float, float, bool]:
        """(rotation_deg, scale, flip); always draws the same count so streams stay aligned."""
        c = self.config
        u_rot, u_angle, u_scale, u_flip = rng.random(4)
        rotation = (2.0 * u_angle - 1.0) * c.max_rotation_deg if u_rot < c.p_rotate else 0.0
        lo, hi = c.scale_range
        scale = lo + (hi - lo) * u_scale
        return float(rotation), float(scale), bool(u_flip < c.p_flip)

    def apply(
        self, example: Mapping[str, Any], rotation: float, scale: float, flip: bool
    ) -> dict[str, np.ndarray]:
        """The deterministic part: crop with the given parameters (no photometric jitter)."""
        c = self.config
        lm = np.asarray(example["landmarks"], dtype=np.float64)
        if lm.shape != (self.num_landmarks, 2):
            raise ValueError(f"landmarks shape {lm.shape}, expected ({self.num_landmarks}, 2)")
        m = geometry.crop_transform(
            _box(example, lm, c.box_source),
            c.output_size,
            c.box_scale,
            rotation_deg=rotation,
            scale=scale,
            flip=flip,
        )
        image = geometry.warp_image(decode_image(example["image"]), m, c.output_size)
        # crop_transform already mirrored x; the permutation keeps index i on the same
        # anatomical point (subject's right eye stays index 36 in 300W).
        pts = geometry.apply_affine(m, lm)
        if flip:
            pts = pts[self.perm]
        return {"image": image, "landmarks": pts.astype(np.float32)}

    def random_map(
        self, example: Mapping[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        out = self.apply(example, *self.sample_params(rng))
        if self.config.photometric:
            out["image"] = _photometric(out["image"], rng, self.config)
        return out


class EvalTransform(grain.transforms.Map):
    """(index, valid, example) -> deterministic crop plus the map back to the original frame."""

    def __init__(
        self, output_size: int = 256, box_source: str = "landmarks", box_scale: float = 1.25
    ):
        if box_source not in ("landmarks", "dataset"):
            raise ValueError(f"box_source must be 'landmarks' or 'dataset', got {box_source!r}")
        self.output_size = output_size
        self.box_source = box_source
        self.box_scale = box_scale

    def map(self, element: tuple[int, bool, Mapping[str, Any]]) -> dict[str, Any]:
        index, valid, ex = element
        lm = np.asarray(ex["landmarks"], dtype=np.float64)
        m = geometry.crop_transform(_box(ex, lm, self.box_source), self.output_size, self.box_scale)
        to_orig = np.asarray(ex.get("to_original", np.eye(2, 3)), dtype=np.float64)
        out = {
            "image": geometry.warp_image(decode_image(ex["image"]), m, self.output_size),
            "landmarks": geometry.apply_affine(m, lm).astype(np.float32),
            "crop_to_original": compose_affine(to_orig, geometry.invert_affine(m)).astype(
                np.float32
            ),
            "original_landmarks": np.asarray(
                ex.get("original_landmarks", geometry.apply_affine(to_orig, lm)), dtype=np.float32
            ),
            "index": np.int32(index),
            "file_name": np.bytes_(_as_bytes(ex.get("file_name", b""))),
            "valid": np.bool_(valid),
        }
        for k in EVAL_EXTRAS:
            if k in ex:
                v = ex[k]
                out[k] = np.bytes_(_as_bytes(v)) if isinstance(v, (str, bytes)) else np.asarray(v)
        return out


# ---------------------------------------------------------------------------------------
# Pipelines


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return int(shard_index), int(shard_count)


def _ensure_flags_parsed() -> None:
    # grain's multiprocess prefetch reads absl flags in the main process; outside an
    # absl app (pytest, notebooks, benchmarks) nobody parsed them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _seeds(seed: int, shard_index: int) -> tuple[int, int]:
    """Independent (shuffle, augment) uint32 seeds; per shard, so hosts augment independently."""
    s = np.random.SeedSequence([int(seed), int(shard_index)]).generate_state(2)
    return int(s[0]), int(s[1])


def train_dataset(
    source: Sequence[Mapping[str, Any]],
    num_landmarks: int,
    *,
    seed: int,
    global_batch_size: int,
    augment: AugmentConfig | Mapping[str, Any] | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.MapDataset:
    """Infinite, shuffled (reshuffled each epoch), augmented MapDataset of per-host batches.

    Batch k is a pure function of (source, seed, shard, k): grain's per-element seed drives
    the augmentation, so the stream does not depend on worker or thread counts.
    """
    if augment is None:
        augment = AugmentConfig()
    elif not isinstance(augment, AugmentConfig):
        augment = AugmentConfig.from_mapping(augment)
    shard_index, shard_count = _shard(shard_index, shard_count)
    if global_batch_size % shard_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {shard_count} hosts")
    host_batch = global_batch_size // shard_count
    shuffle_seed, aug_seed = _seeds(seed, shard_index)

    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError("empty training shard")
    ds = ds.shuffle(seed=shuffle_seed).repeat()
    ds = ds.random_map(TrainTransform(num_landmarks, augment), seed=aug_seed)
    return ds.batch(host_batch, drop_remainder=True)


def train_iterator(
    source: Sequence[Mapping[str, Any]],
    num_landmarks: int,
    *,
    seed: int,
    global_batch_size: int,
    augment: AugmentConfig | Mapping[str, Any] | None = None,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """Endless iterator of train batches for this host (see module docstring).

    shard_index/shard_count default to jax.process_index()/process_count(); each host reads
    only source[shard_index::shard_count] and yields global_batch_size // shard_count
    examples per batch. num_workers > 0 runs the map in that many spawned processes (each
    with num_threads threads). The returned grain iterator supports get_state()/set_state();
    the batches do not depend on num_workers, but the state's layout does, so restore with
    the num_workers it was saved with.
    """
    ds = train_dataset(
        source,
        num_landmarks,
        seed=seed,
        global_batch_size=global_batch_size,
        augment=augment,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads)
        )
    )
    if num_workers > 0:
        _ensure_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(it_ds)


class _PaddedShard:
    """Random-access view: this shard's examples, then copies of its last one up to `length`.

    Elements are (source index, valid, example); padding repeats a real example (not
    zeros) so every transform sees well-formed data.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: range, length: int):
        self.source, self.indices, self.length = source, indices, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(i)
        valid = i < len(self.indices)
        j = self.indices[min(i, len(self.indices) - 1)] if len(self.indices) else 0
        return j, valid, self.source[j]


def eval_batches(
    source: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    output_size: int = 256,
    box_source: str = "landmarks",
    box_scale: float = 1.25,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Re-iterable eval batches in source order, every batch of shape batch_size.

    The last batch is padded (valid=False rows). With several hosts every host yields
    the same number of batches (ceil(ceil(N / hosts) / batch_size)); use 'index' and
    'valid' to gather and de-duplicate.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    n = len(source)
    if n == 0:
        raise ValueError("empty eval source")
    indices = range(shard_index, n, shard_count)
    length = num_eval_batches(n, batch_size, shard_count) * batch_size
    ds = grain.MapDataset.source(_PaddedShard(source, indices, length))
    ds = ds.map(EvalTransform(output_size, box_source, box_scale)).batch(batch_size)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
    )
    if num_workers > 0:
        _ensure_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def num_eval_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches per host that :func:`eval_batches` yields."""
    per_host = -(-num_examples // shard_count)
    return -(-per_host // batch_size)
