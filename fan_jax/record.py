"""A workdir's record: `config.json`, the config of the run that wrote its checkpoints.

The record is what readers (eval mode, predict, export, a student's teacher loading) build
the model from, so it is written only once a run has built its model and restored any
checkpoint, atomically, and a rerun that disagrees with it fails before touching anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from fan_jax.errors import RecordMismatchError

CONFIG_FILE = "config.json"

# What defines the model and the data a checkpoint belongs to: never changed by a rerun.
DEFINING_FIELDS = (
    "model.kind",
    "model.name",
    "input_size",
    "sigma",
    "dataset.name",
    "augment.box_source",
    "augment.box_scale",
    "distill.enabled",
    "distill.fa_layers",
    "distill.adapter_kind",
    "kd.role",
    "kd.teacher_model",
)
# Where the files are and how they are read: free to differ between machines and reruns.
FREE_FIELDS = (
    "mode",
    "dataset.data_dir",
    "dataset.manual_dir",
    "dataset.prepare",
    "dataset.num_workers",
    "distill.teacher_workdir",
    "distill.teacher_config",
    "train.allow_changes",
    "train.nan_at_step",
    "eval",
    "demo",
    "kd.tough_workdir",
    "kd.tolerant_workdir",
)

# Free fields a reader takes from the record unless told otherwise: where the run's data is.
DATA_LOCATION_FIELDS = ("dataset.data_dir", "dataset.manual_dir")

# Fields added after runs were recorded, with the value an older record implies: a rerun
# of such a run with the default compares equal instead of needing allow_changes.
ADDED_FIELDS = {"train.compute_dtype": "float32"}


def read_record(workdir: str) -> dict | None:
    """The workdir's config.json as a dict, None when there is none."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordMismatchError(
            f"{path}: not valid JSON ({e}); restore it from the run's logs or delete the workdir"
        ) from e


def write_record(config: ml_collections.ConfigDict | Mapping, workdir: str) -> None:
    """Writes config.json atomically: a reader sees the old record or the new one, whole."""
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    text = (
        config.to_json_best_effort(indent=2)
        if hasattr(config, "to_json_best_effort")
        else json.dumps(config, indent=2)
    )
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    tmp.replace(directory / CONFIG_FILE)


def flatten(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """{'a.b': value} with tuples and lists compared alike."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = list(node) if isinstance(node, (tuple, list)) else node

    visit("", d)
    return out


def _is_free(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in FREE_FIELDS)


def _is_defining(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in DEFINING_FIELDS)


def record_differences(
    config: ml_collections.ConfigDict, record: Mapping
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(defining, other) fields where `config` and the record differ: (field, record, config).
    Free fields (paths, eval settings, mode) are not compared."""
    have, want = flatten(record), flatten(config)
    defining: list[tuple[str, Any, Any]] = []
    other: list[tuple[str, Any, Any]] = []
    for k in sorted(set(have) | set(want)):
        if _is_free(k):
            continue
        a, b = have.get(k, ADDED_FIELDS.get(k, "<absent>")), want.get(k, "<absent>")
        if a != b and not _both_numbers_equal(a, b):
            (defining if _is_defining(k) else other).append((k, a, b))
    return defining, other


def _both_numbers_equal(a: Any, b: Any) -> bool:
    return (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and float(a) == float(b)
    )


def _table(diffs: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {a!r} in the record, {b!r} now" for k, a, b in diffs)


def check_rerun(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, Any, Any]]:
    """Before a rerun in a workdir with a record: the model and data fields must match it, and
    other changes need `train.allow_changes`. Returns the allowed changes (for the log)."""
    record = read_record(workdir)
    if record is None:
        return []
    defining, other = record_differences(config, record)
    path = epath.Path(workdir) / CONFIG_FILE
    if defining:
        raise RecordMismatchError(
            f"{path}: this workdir holds a run of another model or data; these fields differ "
            f"from its record:\n{_table(defining)}\nUse a new --workdir for a different model "
            f"or data. Nothing was changed."
        )
    if other and not config.train.get("allow_changes", False):
        raise RecordMismatchError(
            f"{path}: rerunning with settings that differ from the run's record:\n"
            f"{_table(other)}\nRepeat the run's settings, or pass "
            f"--config.train.allow_changes=True to continue with these. Nothing was changed."
        )
    return other


def config_from_record(
    config: ml_collections.ConfigDict, workdir: str, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The config a reader should use: the record's model and data fields and its data
    location (`DATA_LOCATION_FIELDS`, unless overridden), `config`'s other free fields (eval
    settings). An override (`overrides`, the command line's) of a defining field that differs
    from the record is an error."""
    record = read_record(workdir)
    if record is None:
        return config
    path = epath.Path(workdir) / CONFIG_FILE
    rec = flatten(record)
    conflicts = []
    for k, v in (overrides or {}).items():
        if _is_defining(k) and k in rec:
            v = list(v) if isinstance(v, (tuple, list)) else v
            if v != rec[k] and not _both_numbers_equal(v, rec[k]):
                conflicts.append((k, rec[k], v))
    if conflicts:
        raise RecordMismatchError(
            f"{path}: the command line overrides fields of the trained run:\n{_table(conflicts)}"
            f"\nThe model is built from the record; drop these overrides."
        )
    out = ml_collections.ConfigDict(config.to_dict())
    merged = flatten(out)
    for k, v in rec.items():
        # Where the run's data is comes from the record too, unless the command line (or,
        # without `overrides`, the caller's config) says otherwise.
        located = k in DATA_LOCATION_FIELDS and (
            k not in overrides if overrides is not None else not merged.get(k)
        )
        if k in merged and (located or not _is_free(k)):
            node = out
            *parts, last = k.split(".")
            for p in parts:
                node = node[p]
            node[last] = tuple(v) if isinstance(v, list) else v
    return out


def commit_record(
    config: ml_collections.ConfigDict, workdir: str, changes: list[tuple[str, Any, Any]]
) -> None:
    """Once the model is built and fits the checkpoint: log the allowed changes (from
    `check_rerun`) and write the record (process 0 only)."""
    import jax

    for field, old_value, new_value in changes:
        logging.warning(
            "train.allow_changes: %s changes from %r to %r", field, old_value, new_value
        )
    if jax.process_index() == 0:
        write_record(config, workdir)
