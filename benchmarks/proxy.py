"""Proxy of the paper's Tables 5 and 6 on synthetic 300W faces: ``python benchmarks/proxy.py --out DIR``.

Draws a synthetic 300W tree, builds it with the real 300W TFDS builder, trains the ResNet-50
teacher once, then every student row from that one teacher, `seeds` times each:

  MobileFAN | + FA | + FS | + FA + FS | MobileFAN (0.5) | MobileFAN (0.5) + FA + FS
  (--ablation: + FA1, FA2, FA3, FS1, FS2, FS3 alone, one seed each)

The KD / no-KD pairs (MobileFAN against + FA + FS, and the same at 0.5) get `proxy.seeds`
seeds; + FA alone and + FS alone get `proxy.single_term_seeds` (1 by default, for time).

and writes <out>/proxy_table.md (NME mean +- std over seeds, and each KD row's change against
its no-KD row next to the seed spread), <out>/proxy_nme.png and <out>/proxy_results.json.
A rerun skips finished runs and resumes an interrupted one from its checkpoint. The base
settings are configs/proxy.py; flags override its `proxy.*` sizes. ``--tiny`` is the smoke
test (2 steps a row, toy sizes) that CI runs so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):
    # Run as a script: make `configs` and `fan_jax` importable from a checkout.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections

ALL, NONE = (True, True, True), (False, False, False)
SPLITS = ("common", "challenging", "full")


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # run folder under <out>/runs
    label: str
    model: str  # 'student' | 'half' | 'teacher' (the config's proxy.*_model)
    fa: tuple[bool, bool, bool] = NONE
    fs: tuple[bool, bool, bool] = NONE
    baseline: str = ""  # the no-KD row this one is compared with
    seeds: int = 0  # 0: the config's proxy.seeds

    @property
    def distill(self) -> bool:
        return any(self.fa) or any(self.fs)


def _one(i: int) -> tuple[bool, bool, bool]:
    return tuple(j == i for j in range(3))  # type: ignore[return-value]


def rows(config: ml_collections.ConfigDict) -> list[Row]:
    """The table's rows, in order (Table 5's, then Table 6's ablation when asked)."""
    p = config.proxy
    out = [
        Row("teacher", "ResNet-50 teacher", "teacher", seeds=1),
        Row("mobilefan", "MobileFAN", "student"),
        Row(
            "mobilefan_fa",
            "MobileFAN + FA",
            "student",
            fa=ALL,
            baseline="mobilefan",
            seeds=p.single_term_seeds,
        ),
        Row(
            "mobilefan_fs",
            "MobileFAN + FS",
            "student",
            fs=ALL,
            baseline="mobilefan",
            seeds=p.single_term_seeds,
        ),
        Row("mobilefan_fa_fs", "MobileFAN + FA + FS", "student", ALL, ALL, baseline="mobilefan"),
        Row("mobilefan_half", "MobileFAN (0.5)", "half"),
        Row(
            "mobilefan_half_kd",
            "MobileFAN (0.5) + FA + FS",
            "half",
            ALL,
            ALL,
            baseline="mobilefan_half",
        ),
    ]
    if config.proxy.ablation:
        for i in range(3):
            out.append(
                Row(
                    f"mobilefan_fa{i + 1}",
                    f"MobileFAN + FA{i + 1}",
                    "student",
                    fa=_one(i),
                    baseline="mobilefan",
                    seeds=1,
                )
            )
        for i in range(3):
            out.append(
                Row(
                    f"mobilefan_fs{i + 1}",
                    f"MobileFAN + FS{i + 1}",
                    "student",
                    fs=_one(i),
                    baseline="mobilefan",
                    seeds=1,
                )
            )
    return out


def run_config(
    config: ml_collections.ConfigDict, row: Row, seed: int, out: str, num_train: int
) -> ml_collections.ConfigDict:
    """The fan_jax.train config of one row and seed."""
    from fan_jax import train

    p = config.proxy
    c = ml_collections.ConfigDict(config.to_dict())
    del c.proxy
    teacher = row.model == "teacher"
    c.model.name = {"teacher": p.teacher_model, "student": p.student_model, "half": p.half_model}[
        row.model
    ]
    c.seed = seed
    steps = p.teacher_steps if teacher else p.student_steps
    c.train.num_train_steps = steps
    # The schedule is in epochs; this puts the one decay at decay_at of the run's steps.
    epoch_steps = train.steps_per_epoch(c, num_train)
    decay = int(round(p.decay_at * steps))
    c.train.lr_decay_epochs = (decay / epoch_steps,) if 0 < decay < steps else ()
    c.distill.enabled = row.distill
    if row.distill:
        c.distill.fa_layers, c.distill.fs_layers = row.fa, row.fs
        c.distill.teacher_workdir = os.path.join(out, "runs", "teacher", "s0")
        c.distill.teacher_config = "benchmarks/proxy.py (its teacher row)"
    return c


def _metrics(eval_results: dict) -> dict:
    return {
        s: {k: eval_results[s]["no_flip"][k] for k in ("nme", "fr", "auc")}
        for s in SPLITS
        if s in eval_results
    }


def _log(t0: float, msg: str) -> None:
    print(f"[proxy {time.perf_counter() - t0:7.0f}s] {msg}", flush=True)


def finished(config: ml_collections.ConfigDict, out: str) -> dict[str, list[dict]]:
    """{row key: [per-seed result]} of the runs already finished in `out`."""
    results: dict[str, list[dict]] = {}
    for row in rows(config):
        for seed in range(row.seeds or config.proxy.seeds):
            done = os.path.join(out, "runs", row.key, f"s{seed}", "proxy_result.json")
            if os.path.exists(done):
                with open(done) as f:
                    results.setdefault(row.key, []).append(json.load(f))
    return results


def run(config: ml_collections.ConfigDict, out: str) -> dict | None:
    """Trains every row (skipping finished runs); returns {row key: [per-seed result]}, or
    None when SIGTERM stopped it (rerun to resume)."""
    import jax

    from fan_jax import data, synthetic_300w, train

    t0 = time.perf_counter()
    p = config.proxy
    os.makedirs(out, exist_ok=True)
    # The seeds of a row run the same programs: later seeds load them from this cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    config = ml_collections.ConfigDict(config.to_dict())
    manual = config.dataset.manual_dir or os.path.join(out, "synthetic_300w")
    data_dir = config.dataset.data_dir or os.path.join(out, "tensorflow_datasets")
    if not os.path.exists(os.path.join(manual, "synthetic_300w.json")):
        _log(t0, f"drawing {p.num_train} training and {p.num_test} test faces ({p.image_size}px)")
        synthetic_300w.write_300w_tree(
            manual, p.num_train, p.num_test, seed=config.seed, size=p.image_size, overwrite=True
        )
    data.prepare("300w", data_dir=data_dir, manual_dir=manual)
    config.dataset.data_dir, config.dataset.manual_dir = data_dir, manual
    with open(os.path.join(manual, "synthetic_300w.json")) as f:
        num_train = json.load(f)["counts"]["train"]

    results: dict[str, list[dict]] = {}
    # The KD / no-KD pairs first, the single-term rows after: a run stopped for time leaves
    # the comparisons that matter most complete (the table keeps the paper's order).
    for row in sorted(rows(config), key=lambda r: r.seeds == 1 and r.model != "teacher"):
        for seed in range(row.seeds or p.seeds):
            workdir = os.path.join(out, "runs", row.key, f"s{seed}")
            done = os.path.join(workdir, "proxy_result.json")
            if os.path.exists(done):
                with open(done) as f:
                    results.setdefault(row.key, []).append(json.load(f))
                continue
            c = run_config(config, row, seed, out, num_train)
            _log(
                t0,
                f"{row.label}, seed {seed}: {c.model.name}, {c.train.num_train_steps} "
                f"steps -> {workdir}",
            )
            t1 = time.perf_counter()
            result = train.train_and_evaluate(c, workdir)
            if result.preempted:
                _log(t0, "stopped by SIGTERM; run the same command to resume")
                return None
            r = {
                "seed": seed,
                "model": c.model.name,
                "steps": c.train.num_train_steps,
                "seconds": time.perf_counter() - t1,
                "metrics": _metrics(result.eval_results),
            }
            if jax.process_index() == 0:
                with open(done + ".tmp", "w") as f:
                    json.dump(r, f, indent=1)
                os.replace(done + ".tmp", done)
            results.setdefault(row.key, []).append(r)
            _log(t0, f"{row.label}, seed {seed}: full NME {100 * r['metrics']['full']['nme']:.2f}%")
    return results


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float]) -> str:
    mean, std = _stats([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def format_table(config: ml_collections.ConfigDict, results: dict[str, list[dict]]) -> str:
    """Markdown: per row NME (%) per split and FR@0.1 (%), mean ± std over seeds, and each KD
    row's full-split change against its no-KD row, beside the two rows' larger std."""
    p = config.proxy
    lines = [
        "| model | seeds | NME common | NME challenging | NME full | FR@0.1 full | "
        "change vs no KD (full) | minutes a run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows(config):
        runs = results.get(row.key)
        if not runs:
            continue
        cells = [_cell([r["metrics"][s]["nme"] for r in runs]) for s in SPLITS]
        fr = _cell([r["metrics"]["full"]["fr"] for r in runs])
        change = ""
        base = results.get(row.baseline)
        if base:
            m, s = _stats([100 * r["metrics"]["full"]["nme"] for r in runs])
            bm, bs = _stats([100 * b["metrics"]["full"]["nme"] for b in base])
            verdict = (
                "within the seed spread"
                if abs(m - bm) <= max(s, bs)
                else ("better" if m < bm else "worse")
            )
            change = f"{m - bm:+.2f} ({verdict}; std {max(s, bs):.2f})"
        minutes = statistics.fmean(r["seconds"] for r in runs) / 60
        lines.append(
            f"| {row.label} | {len(runs)} | {' | '.join(cells)} | {fr} | {change} | {minutes:.1f} |"
        )
    return "\n".join(lines) + (
        f"\n\nSynthetic 300W faces ({p.num_train} train, {p.num_test} test), {config.input_size}x"
        f"{config.input_size} crops, inter-ocular NME without flip-test; teacher model "
        f"'{p.teacher_model}' {p.teacher_steps} steps, students {p.student_steps} steps, batch "
        f"{config.train.batch_size}, lambda {config.distill.lam:g}. '±' is the std over seeds.\n"
    )


def plot(config: ml_collections.ConfigDict, results: dict[str, list[dict]], path: str) -> None:
    """Bars of full-split NME per row with the seed std as error bars."""
    from matplotlib.figure import Figure

    shown = [r for r in rows(config) if results.get(r.key)]
    stats = [_stats([100 * x["metrics"]["full"]["nme"] for x in results[r.key]]) for r in shown]
    fig = Figure(figsize=(7, 3.8), dpi=120)
    ax = fig.subplots()
    colors = [
        "tab:gray" if r.model == "teacher" else "tab:orange" if r.distill else "tab:blue"
        for r in shown
    ]
    ax.bar(
        range(len(shown)),
        [m for m, _ in stats],
        yerr=[s for _, s in stats],
        capsize=3,
        color=colors,
    )
    ax.set_xticks(
        range(len(shown)),
        [r.label.replace("MobileFAN", "MF") for r in shown],
        rotation=30,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("NME full (%, inter-ocular)")
    ax.set_title("Proxy of Tables 5/6 on synthetic 300W (mean ± std over seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The smoke-test sizes: 2 steps a row, toy data, two seeds (so the ± path runs)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.input_size, c.train.batch_size, c.eval.batch_size = 64, 4, 4
    c.train.warmup_steps, c.train.checkpoint_every_steps = 0, 1
    p = c.proxy
    p.num_train, p.num_test, p.image_size = 16, 6, 96
    p.teacher_steps = p.student_steps = 2
    p.seeds = 2
    return c


def main(argv: Sequence[str] | None = None, config: ml_collections.ConfigDict | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (rerun it to resume)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: 2 steps a row")
    parser.add_argument("--seeds", type=int, help="seeds a row (proxy.seeds)")
    parser.add_argument("--student_steps", type=int)
    parser.add_argument("--teacher_steps", type=int)
    parser.add_argument("--num_train", type=int)
    parser.add_argument("--ablation", action="store_true", help="add the per-layer rows")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: table and plot of the runs finished so far",
    )
    args = parser.parse_args(argv)

    from configs import proxy
    from fan_jax import errors, train_logging, validate

    config = config or proxy.get_config()
    if args.tiny:
        config = tiny(config)
    for field in ("seeds", "student_steps", "teacher_steps", "num_train"):
        if getattr(args, field) is not None:
            config.proxy[field] = getattr(args, field)
    config.proxy.ablation = config.proxy.ablation or args.ablation
    train_logging.quiet_library_logs()
    from absl import logging

    logging.set_verbosity(logging.INFO)  # the loop's progress lines (steps/s, ETA)
    try:
        validate.check(run_config(config, rows(config)[-1], 0, args.out, config.proxy.num_train))
        results = finished(config, args.out) if args.report else run(config, args.out)
    except (errors.FanJaxError, OSError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return errors.EXIT_ERROR
    if results is None:
        return errors.EXIT_PREEMPTED
    table = format_table(config, results)
    with open(os.path.join(args.out, "proxy_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "proxy_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(config, results, os.path.join(args.out, "proxy_nme.png"))
    print(table, flush=True)
    print(f"Written: {args.out}/proxy_table.md, proxy_nme.png, proxy_results.json", flush=True)
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
