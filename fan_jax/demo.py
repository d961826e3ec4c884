"""The demos: the whole pipeline on synthetic faces, on a CPU, in minutes.

`run_demo(config, workdir)` (configs/demo.py, `--mode=demo`): draws a 300W-layout tree
(`fan_jax.synthetic`), builds it with the real 300W TFDS builder, trains a teacher, MobileFAN
and MobileFAN + KD, then (`demo.kdloss_enabled`, configs/demo_compare.py) the KD-Loss teachers
and student on the same faces; evaluates all, prints one table and writes plots. Each stage
is a plain `fan_jax.train.train_and_evaluate` run in its own sub-workdir, so a rerun resumes
finished stages. A KD-Loss config in demo mode (configs/demo_kdloss.py) runs the KD-Loss
roles alone on in-memory faces (`run_kdloss_demo`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fan_jax import evaluate, synthetic, synthetic_300w, tasks
from fan_jax.tasks import kdloss
from fan_jax.train import steps_per_epoch, train_and_evaluate

Source = Sequence[Mapping]


def _demo_log(t0: float, msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[demo {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def demo_configs(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
    """{label: (run dir, config)} for the demo's teacher, MobileFAN and MobileFAN + KD.

    Each stage decays its learning rate x`train.lr_decay_factor` for its last
    `demo.lr_decay_fraction` of steps. The two students share step counts, so their schedules
    are equal.
    """
    d = config.demo

    def derive(model: str, steps_: int, distill: bool) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(config.to_dict())
        c.mode = "train"
        c.model.name = model
        c.train.num_train_steps = steps_
        frac = d.get("lr_decay_fraction", 0.0)
        epoch = steps_per_epoch(c, d.num_train)
        c.train.lr_decay_epochs = ((1 - frac) * steps_ / epoch,) if frac > 0 else ()
        c.distill.enabled = distill
        c.distill.teacher_workdir = os.path.join(workdir, "teacher")
        c.distill.teacher_config = "configs/demo.py (its teacher stage)"
        return c

    return {
        "teacher": ("teacher", derive(d.teacher_model, d.teacher_steps, False)),
        "MobileFAN": ("mobilefan", derive(config.model.name, d.student_steps, False)),
        "MobileFAN + KD": ("mobilefan_kd", derive(config.model.name, d.student_steps, True)),
    }


def _plot_demo(rows: Mapping[str, dict], path: str, splits: Sequence[str]) -> None:
    # A bare Figure renders to files without pyplot, leaving the caller's backend alone
    # (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    for i, (label, res) in enumerate(rows.items()):
        vals = [100 * res[s]["flip" if "flip" in res[s] else "no_flip"]["nme"] for s in splits]
        ax.bar(np.arange(len(splits)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(splits)) + width * (len(rows) - 1) / 2, splits)
    ax.set_ylabel("NME (%, inter-ocular)")
    ax.set_title("Synthetic 300W: heatmap KD (MobileFAN) and KD-Loss (regression)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def demo_kdloss_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The demo's KD-Loss config (`config.demo.kdloss`), reading the demo's built 300W data."""
    kd = config.demo.get("kdloss")
    if kd is None or not config.demo.get("kdloss_enabled", True):
        return None
    kd = ml_collections.ConfigDict(kd.to_dict())
    kd.dataset.name = config.dataset.name
    kd.dataset.data_dir, kd.dataset.manual_dir = config.dataset.data_dir, config.dataset.manual_dir
    kd.dataset.prepare = False
    kd.dataset.val_split = config.dataset.val_split
    kd.eval.splits = tuple(config.eval.splits)
    kd.seed = config.seed
    return kd


def _init_from_demo(kd: ml_collections.ConfigDict, workdir: str) -> None:
    """Starts the KD-Loss teachers' trunks from the demo's heatmap teacher (ResNet-18) and the
    students' from its MobileFAN encoder (configs/demo_kdloss.py says why)."""
    if kd.kd.get("teacher_init_from_demo", False):
        kd.kd.teacher_init_from = os.path.join(workdir, "teacher")
    if kd.kd.get("student_init_from_demo", False):
        kd.model.init_from = os.path.join(workdir, "mobilefan")


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict] | None:
    """The whole pipeline on synthetic faces (a KD-Loss config: `run_kdloss_demo`): draw a
    300W-layout tree, build it with the 300W TFDS builder, train a teacher, MobileFAN and MobileFAN + KD, then (`demo.kdloss`) the
    KD-Loss teachers and student on the same data; evaluate all, print one table and write
    `demo_table.txt` and `demo_nme.png` (each run's CED and landmark grid are in
    <workdir>/<run>/eval/). Re-running resumes finished stages; SIGTERM stops after saving
    and returns None."""
    from fan_jax import data

    if tasks.is_regression(config):
        return run_kdloss_demo(config, workdir)
    t0 = time.perf_counter()
    d = config.demo
    os.makedirs(workdir, exist_ok=True)
    # Each stage compiles its own steps; identical programs (the students' init and
    # evaluation) then come from this cache instead of compiling again.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    manual = config.dataset.manual_dir or os.path.join(workdir, "synthetic_300w")
    data_dir = config.dataset.data_dir or os.path.join(workdir, "tensorflow_datasets")
    if not os.path.exists(os.path.join(manual, "synthetic_300w.json")):
        _demo_log(
            t0,
            f"drawing {d.num_train} training and {d.num_test} test faces "
            f"({d.image_size}px) into {manual}",
        )
        synthetic_300w.write_300w_tree(
            manual, d.num_train, d.num_test, seed=config.seed, size=d.image_size, overwrite=True
        )
    _demo_log(t0, "building them with the 300W TFDS builder")
    data.prepare("300w", data_dir=data_dir, manual_dir=manual)
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.data_dir, config.dataset.manual_dir = data_dir, manual
    rows: dict[str, dict] = {}
    for label, (name, c) in demo_configs(config, workdir).items():
        _demo_log(
            t0,
            f"training {label} ({c.model.name}, {c.train.num_train_steps} steps, batch "
            f"{c.train.batch_size}, {c.input_size}x{c.input_size} crops) -> "
            f"{workdir}/{name}",
        )
        result = train_and_evaluate(c, os.path.join(workdir, name))
        if result.preempted:
            _demo_log(t0, f"stopped by SIGTERM during {label}; run the same command to resume")
            return None
        assert result.eval_results is not None  # evaluate_at_end and not preempted
        rows[label] = result.eval_results
    kd_config = demo_kdloss_config(config)
    if kd_config is not None:
        _demo_log(
            t0,
            f"KD-Loss: Tough and Tolerant teachers ({kd_config.kd.teacher_model}, "
            f"{kd_config.kd.get('teacher_steps', 0) or kd_config.train.num_train_steps} steps), "
            f"then the {kd_config.model.name} student alone and with KD-Loss "
            f"({kd_config.train.num_train_steps} steps each), "
            f"{kd_config.input_size}x{kd_config.input_size} crops -> {workdir}/kdloss",
        )
        _init_from_demo(kd_config, workdir)
        kd_rows = kdloss_rows(kd_config, os.path.join(workdir, "kdloss"))
        if kd_rows is None:
            _demo_log(t0, "stopped by SIGTERM during KD-Loss; run the same command to resume")
            return None
        labels = {
            "kdloss_teacher_tough": "KD-Loss Tough teacher",
            "kdloss_teacher_tolerant": "KD-Loss Tolerant teacher",
            "kdloss_student_alone": "MobileNetV2 regression alone",
            "kdloss_student": "MobileNetV2 regression + KD-Loss",
        }
        rows.update({labels.get(k, k): v for k, v in kd_rows.items()})
    table = evaluate.format_table(rows)
    splits = list(next(iter(rows.values())))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "demo_table.txt"), "w") as f:
            f.write(table + "\n")
        _plot_demo(rows, os.path.join(workdir, "demo_nme.png"), splits)
        _demo_log(
            t0,
            f"done. Synthetic 300W test faces ({d.num_test}), NME normalised by the "
            f"outer eye corners. Teacher: {d.teacher_model}, {d.teacher_steps} steps; "
            f"students: {config.model.name}, {d.student_steps} steps each; batch "
            f"{config.train.batch_size}, {config.input_size}x{config.input_size} crops.",
        )
        print(table, flush=True)
        print(
            f"\nPlots: {workdir}/demo_nme.png and {workdir}/<run>/eval/ced_300w.png, faces_*.png",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- KD-Loss


def kdloss_rows(
    config: ml_collections.ConfigDict,
    workdir: str,
    sources: Mapping[str, Source] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, dict] | None:
    """Trains Tough, Tolerant, the student alone (`kd.student_alone`, MSE to the ground truth,
    the baseline) and the KD-Loss student in `workdir/{tough,tolerant,student_alone,student}`.

    `config` is one KD-Loss config (e.g. configs/demo_kdloss.py); the roles, workdirs and
    `kd.teacher_model` for the teachers are filled in here. `sources=None` reads the
    config's TFDS dataset; `only` trains just those roles (the others' workdirs are still
    where the students look for their teachers). Returns {label: eval results} rows for
    `fan_jax.evaluate.format_table`, or None when SIGTERM stopped a run (it saved first).
    """
    rows: dict[str, dict] = {}
    roles = (*kdloss.ROLES[:2], kdloss.ALONE, kdloss.ROLES[2])
    dirs = {r: os.path.join(workdir, r.replace("teacher_", "")) for r in roles}
    for role in roles:
        if role == kdloss.ALONE and not config.kd.get("student_alone", True):
            continue
        if only is not None and role not in only:
            continue
        c = ml_collections.ConfigDict(config.to_dict())
        c.kd.role = role
        c.kd.tough_workdir, c.kd.tolerant_workdir = dirs["teacher_tough"], dirs["teacher_tolerant"]
        if role.startswith("teacher"):
            c.model.name = config.kd.get("teacher_model", "efficientnet_b3_reg")
            c.model.dropout_rate = -1.0
            c.model.init_from = config.kd.get("teacher_init_from", "")
            c.train.num_train_steps = int(
                config.kd.get("teacher_steps", 0) or config.train.num_train_steps
            )
        res = train_and_evaluate(c, dirs[role], sources=sources)
        if res.preempted:
            return None
        assert res.eval_results is not None  # evaluate_at_end and not preempted
        rows[f"kdloss_{role}"] = res.eval_results
    return rows


def run_kdloss_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict] | None:
    """KD-Loss on in-memory synthetic faces: both teachers and the student, then one table;
    None when SIGTERM stopped it."""
    d = config.demo
    sources = synthetic.sources(d.num_train, d.num_test, seed=config.seed, size=d.image_size)
    rows = kdloss_rows(config, workdir, sources)
    if rows is None:
        print("stopped by SIGTERM; run the same command to resume", flush=True)
        return None
    if jax.process_index() == 0:
        table = evaluate.format_table(rows)
        print(table, flush=True)
        with open(os.path.join(workdir, "demo_table.txt"), "w") as f:
            f.write(table + "\n")
    return rows
