"""A workdir's checkpoints: the orbax manager, resume, and loading a trained network.

Layout of a training workdir:
  config.json      the record (`fan_jax.record`): the config of the run that wrote them
  checkpoints/N/   orbax steps: 'model' ({'params', 'batch_stats'}), 'opt', 'data'

Readers (eval mode, predict, export, a student's teacher loading) build the model from the
record and restore through `check_tree_matches`. Paths go through `etils.epath`, so gs://
workdirs work for every kind of run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from fan_jax.errors import CheckpointMismatchError, CheckpointSaveError
from fan_jax.record import CONFIG_FILE, read_record

PyTree = Any

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return str(epath.Path(workdir) / CHECKPOINT_DIR)


def has_checkpoints(workdir: str) -> bool:
    """Whether `workdir` holds at least one checkpoint step."""
    d = epath.Path(checkpoint_dir(workdir))
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def manager(directory: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the latest `keep` steps plus the best one by 'val_nme' (lower is better)."""
    pp = ocp.checkpoint_managers
    policy = pp.AnyPreservationPolicy(
        [
            pp.LatestN(n=keep),
            pp.BestN(
                get_metric_fn=lambda m: m["val_nme"],
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["val_nme"],
        best_mode="min",
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
    )
    handlers = {"model": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler()}
    if read_only:
        # Readers (eval, predict, export, teachers) never restore the data state, so they
        # need no grain; orbax would warn on every read that it cannot restore it.
        _quiet_unread_items()
    else:
        import grain

        handlers["data"] = grain.checkpoint.CheckpointHandler()
    if "://" not in directory:
        directory = os.path.abspath(directory)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _quiet_unread_items() -> None:
    logger = logging.get_absl_logger()
    if any(getattr(f, "_fan_jax_unread", False) for f in logger.filters):
        return

    def keep(record: Any) -> bool:
        return not (
            "was found in the checkpoint, but could not" in str(record.msg)
            and record.args == ("data",)
        )

    keep._fan_jax_unread = True  # type: ignore[attr-defined]
    logger.addFilter(keep)


def select_step(mngr: ocp.CheckpointManager, which: str) -> int | None:
    """'latest' | 'best' (lowest validation NME; latest if none was scored) | a step number."""
    if which == "latest":
        return mngr.latest_step()
    if which == "best":
        best = mngr.best_step()
        return best if best is not None else mngr.latest_step()
    step = int(which)
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {mngr.directory} (have {list(mngr.all_steps())})"
        )
    return step


def to_dict(tree: PyTree) -> PyTree:
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata -> its nested dict
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def check_tree_matches(restored_meta: PyTree, expected: PyTree, what: str) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose path or shape differs."""

    def flat(tree: PyTree) -> dict[str, tuple[int, ...]]:
        return {
            "/".join(map(str, k)): tuple(getattr(v, "shape", ()))
            for k, v in traverse_util.flatten_dict(to_dict(tree)).items()
        }

    have, want = flat(restored_meta), flat(expected)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{what}: parameter names differ from the model's: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}"
        )
    for k in sorted(want):
        if have[k] != want[k]:
            raise CheckpointMismatchError(
                f"{what}: {k} has shape {have[k]} in the checkpoint, {want[k]} in the model"
            )


# --------------------------------------------------------------------------- resume


def abstract(tree: PyTree, sharding: Any) -> PyTree:
    import jax

    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), tree
    )


def resume(
    mngr: ocp.CheckpointManager, state: Any, train_iter: Any, sharding: Any
) -> tuple[Any, Any]:
    """(state, train_iter) from the manager's latest step, or as given when there is none.
    Closes the manager when the checkpoint does not fit, so the caller only re-raises."""
    latest = mngr.latest_step()
    if latest is None:
        return state, train_iter
    try:
        restored = restore_for_resume(
            mngr,
            latest,
            {"params": state.params, "batch_stats": state.batch_stats},
            {"step": state.step, "opt_state": state.opt_state},
            train_iter,
            sharding,
        )
    except BaseException:
        mngr.close()
        raise
    m, o = restored["model"], restored["opt"]
    state = state.replace(
        params=m["params"], batch_stats=m["batch_stats"], step=o["step"], opt_state=o["opt_state"]
    )
    logging.info("Resumed from %s at step %d", mngr.directory, latest)
    return state, restored["data"]


@contextlib.contextmanager
def save_errors(mngr: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """An orbax save that fails (in this call, or in the background save it waits for) as one
    CheckpointSaveError naming the directory, the cause and the last good checkpoint."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as e:  # orbax wraps OSErrors of its writer threads in ValueError/RuntimeError
        good = [s for s in mngr.all_steps() if s != step]
        cause = _os_error_text(e)
        raise CheckpointSaveError(
            f"could not write a checkpoint to {mngr.directory}: {cause}. The last good "
            f"checkpoint ({'step ' + str(max(good)) if good else 'none'}) is intact; free space "
            f"or fix the directory, then run the same command again to resume."
        ) from None


def _os_error_text(error: BaseException) -> str:
    """The OS's words for a failed write ('No space left on device'), else the first line."""
    import errno as errno_mod

    text = str(error)
    for code in (
        errno_mod.ENOSPC,
        errno_mod.EDQUOT,
        errno_mod.EFBIG,
        errno_mod.EROFS,
        errno_mod.EACCES,
        errno_mod.EIO,
    ):
        words = os.strerror(code)
        if words in text:
            return words
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:300]


def restore_for_resume(
    mngr: ocp.CheckpointManager,
    step: int,
    model_item: PyTree,
    opt_item: PyTree,
    train_iter: Any,
    sharding: Any,
) -> dict:
    """Restores 'model', 'opt' and 'data' of `step` into the shapes of the run's fresh state.
    The model tree is checked first, so a different model is one error naming the first
    differing parameter, not an orbax traceback."""
    import grain

    what = f"checkpoint {mngr.directory}/{step}"
    check_tree_matches(to_dict(mngr.item_metadata(step)["model"]), model_item, what)
    try:
        return mngr.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract(model_item, sharding)),
                opt=ocp.args.StandardRestore(abstract(opt_item, sharding)),
                data=grain.checkpoint.CheckpointRestore(train_iter),
            ),
        )
    except ValueError as e:  # the optimizer state differs (another optimizer or schedule)
        raise CheckpointMismatchError(
            f"{what}: its optimizer or data state does not fit this run: {str(e)[:500]}"
        ) from e


# --------------------------------------------------------------------------- the student


def student_variables(tree: Mapping[str, Any]) -> dict:
    """{'params', 'batch_stats'} of the trained network alone, from a checkpoint's 'model'
    item ({'params': {'student': ..., 'adapters': ...}, ...}), a TrainState, or variables
    that are already unwrapped. The KD adapters are dropped."""
    params = getattr(tree, "params", None)
    stats = getattr(tree, "batch_stats", None)
    if params is None:
        params, stats = tree["params"], tree.get("batch_stats", {})
    stats = stats or {}
    if "student" in params:
        params, stats = params["student"], stats.get("student", {}) or {}
    return {"params": params, "batch_stats": stats}


def expected_model_item(model: Any, input_size: int) -> dict:
    """Shapes of the 'model' item a checkpoint of `model` holds (without adapters)."""
    import functools

    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, input_size, input_size, 3), jnp.float32),
    )
    return {
        "params": {"student": shapes["params"]},
        "batch_stats": {"student": shapes.get("batch_stats", {})},
    }


def restore_model(
    workdir: str, which: str = "best", *, expected: PyTree | None = None, sharding: Any = None
) -> tuple[dict, int]:
    """Restores the 'model' item ({'params', 'batch_stats'}) of a run; returns it and its step.

    With `expected` (a tree of arrays or shape structs) the checkpoint must match it
    (`check_tree_matches`); a checkpoint that also holds KD adapters matches an expected tree
    without them, and only the expected part is read. Arrays come back on `sharding`
    (default: replicated over all devices), whatever device count saved them.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}")
    if sharding is None:
        sharding = NamedSharding(Mesh(jax.devices(), ("batch",)), P())
    mngr = manager(directory, read_only=True)
    try:
        step = select_step(mngr, which)
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        meta = to_dict(mngr.item_metadata(step)["model"])
        if expected is not None:
            expected = to_dict(expected)
            extra = {
                k: {n: v for n, v in meta.get(k, {}).items() if n not in expected.get(k, {})}
                for k in meta
            }
            check_tree_matches(
                {
                    k: {n: v for n, v in meta.get(k, {}).items() if n in expected.get(k, {})}
                    for k in expected
                },
                expected,
                f"checkpoint {directory}/{step}",
            )
            # Leaves not expected (the adapters) are restored as saved, then dropped.
            target = {k: {**expected.get(k, {}), **extra.get(k, {})} for k in meta}
        else:
            target = meta
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract(target, sharding))),
        )["model"]
    finally:
        mngr.close()
    if expected is not None:
        restored = {
            k: {n: v for n, v in restored[k].items() if n in expected.get(k, {})} for k in expected
        }
    return restored, step


def _num_landmarks(kind: str, meta: Mapping[str, Any], where: str) -> int:
    """The landmark count a checkpoint's head was built for."""
    try:
        p = meta["params"]["student"]["head"]
        if kind == "regression" and "out" not in p and "log_beta" in p:
            # A heatmap FAN read out by soft-argmax (regression.resnet18_fan_softargmax).
            p = meta["params"]["student"]["encoder"]["head"]
            return int(p["conv"]["kernel"].shape[-1])
        if kind == "regression":
            return int(p["out"]["kernel"].shape[-1]) // 2
        return int(p["conv"]["kernel"].shape[-1])
    except (KeyError, TypeError, AttributeError):
        layer = "head/out/kernel" if kind == "regression" else "head/conv/kernel"
        raise CheckpointMismatchError(
            f"{where} has no {kind} head (params/student/{layer}): not a fan_jax landmark model"
        ) from None


@dataclasses.dataclass
class LoadedModel:
    """A restored network: its kind and module, its {'params', 'batch_stats'} and its run."""

    kind: str
    model: Any
    variables: dict
    record: dict
    step: int
    num_landmarks: int
    workdir: str

    @property
    def input_size(self) -> int:
        return int(self.record.get("input_size", 256))

    @property
    def box_scale(self) -> float:
        return float(self.record.get("augment", {}).get("box_scale", 1.25))

    @property
    def model_name(self) -> str:
        return self.record.get("model", {}).get("name", "?")

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "kind": self.kind,
            "dataset": self.record.get("dataset", {}).get("name"),
            "workdir": self.workdir,
            "step": self.step,
            "num_landmarks": self.num_landmarks,
            "input_size": self.input_size,
            "box_scale": self.box_scale,
        }


def load_model(
    workdir: str,
    which: str = "best",
    *,
    sharding: Any = None,
    default_record: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """The trained network of a workdir, of either kind, built from its record and restored
    through the one tree check. Used by eval mode, predict, export and teacher loading.
    `default_record` stands in for a missing config.json (eval mode passes its config).

    Raises FileNotFoundError (no record, no checkpoints) or CheckpointMismatchError."""
    from fan_jax import models

    record = read_record(workdir)
    if record is None and default_record is not None:
        record = dict(default_record)
    if record is None:
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}: not a fan_jax training "
            "workdir (python -m fan_jax.main --config=... --workdir=DIR "
            "writes one)"
        )
    directory = checkpoint_dir(workdir)
    if not has_checkpoints(workdir):
        raise FileNotFoundError(
            f"no checkpoints in {directory}: train first, e.g.\n  python -m "
            f"fan_jax.main --config=<config> --workdir={workdir}"
        )
    model_cfg = record.get("model", {})
    kind = model_cfg.get("kind", "heatmap")
    mngr = manager(directory, read_only=True)
    try:
        step = select_step(mngr, which)
        meta = to_dict(mngr.item_metadata(step)["model"])
    finally:
        mngr.close()
    where = f"checkpoint {directory}/{step}"
    num_landmarks = _num_landmarks(kind, meta, where)
    try:
        model = models.build(model_cfg, num_landmarks)
    except (ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"{workdir}/{CONFIG_FILE}: {e}") from None
    expected = expected_model_item(model, int(record.get("input_size", 256)))
    try:
        restored, step = restore_model(workdir, str(step), expected=expected, sharding=sharding)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"{e} (it does not fit model {model_cfg.get('name')!r} of {workdir}/{CONFIG_FILE})"
        ) from None
    return LoadedModel(
        kind=kind,
        model=model,
        variables=student_variables(restored),
        record=record,
        step=int(step),
        num_landmarks=num_landmarks,
        workdir=workdir,
    )
