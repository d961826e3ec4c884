"""The KD-Loss demo's claim over seeds: the student alone and with KD-Loss, one pair of teachers.

    python -m fan_jax.main --config=configs/demo_compare.py --workdir=<demo>   # seed 0
    python benchmarks/kdloss_seeds.py --workdir <demo> --seeds 1,2

Trains both students of `configs/demo_kdloss.py` again with each seed (their init of the
parts MobileFAN lacks, dropout and data order) in <demo>/kdloss_seed<N>/, against the seed-0
run's teachers (linked from <demo>/kdloss, so only re-evaluated), on the same faces and crops;
then prints the full split's NME (no flip) and FR@0.1 per seed, with seed 0 read from
<demo>/kdloss, and writes them to <demo>/kdloss_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDENTS = {"kdloss_student_alone": "alone", "kdloss_student": "KD-Loss"}
STUDENT_ROLES = ("student_alone", "student")


def _full(rows: dict) -> dict[str, dict]:
    return {
        STUDENTS[k]: {
            "nme": 100 * v["full"]["no_flip"]["nme"],
            "fr": 100 * v["full"]["no_flip"]["fr"],
        }
        for k, v in rows.items()
        if k in STUDENTS
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a demo workdir after configs/demo_compare.py")
    ap.add_argument("--seeds", default="1,2")
    args = ap.parse_args(argv)

    import ml_collections

    from configs import demo_compare
    from fan_jax import demo

    wd = os.path.abspath(args.workdir)
    if not os.path.isdir(os.path.join(wd, "kdloss", "tough")):
        sys.exit(f"ERROR: {wd}/kdloss/tough not found: run configs/demo_compare.py on {wd} first")
    config = demo_compare.get_config()
    config.dataset.data_dir = os.path.join(wd, "tensorflow_datasets")
    config.dataset.manual_dir = os.path.join(wd, "synthetic_300w")
    results: dict[int, dict] = {}
    for seed in [0, *(int(s) for s in args.seeds.split(",") if s)]:
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed = seed
        kd = demo.demo_kdloss_config(c)
        assert kd is not None
        demo._init_from_demo(kd, wd)
        out = os.path.join(wd, "kdloss" if seed == 0 else f"kdloss_seed{seed}")
        for teacher in ("tough", "tolerant"):
            link = os.path.join(out, teacher)
            if seed and not os.path.exists(link):
                os.makedirs(out, exist_ok=True)
                os.symlink(os.path.join(wd, "kdloss", teacher), link)
        # The teachers are seed 0's, as trained: only the students run (again, for seed 0:
        # finished runs are re-evaluated).
        rows = demo.kdloss_rows(kd, out, only=list(STUDENT_ROLES))
        if rows is None:
            sys.exit("stopped by SIGTERM: run the same command to resume")
        results[seed] = _full(rows)
    summary: dict = {"seeds": results}
    for name in STUDENTS.values():
        nmes = [r[name]["nme"] for r in results.values()]
        summary[name] = {"mean_nme": statistics.mean(nmes), "spread": max(nmes) - min(nmes)}
    print("seed  alone NME / FR        KD-Loss NME / FR")
    for seed, r in results.items():
        a, k = r["alone"], r["KD-Loss"]
        print(f"{seed:4d}  {a['nme']:.2f}% / {a['fr']:.1f}%   {k['nme']:.2f}% / {k['fr']:.1f}%")
    # NME and FR in percent, full split, no flip.
    for name in STUDENTS.values():
        s = summary[name]
        print(f"{name}: mean {s['mean_nme']:.2f}%, spread {s['spread']:.2f} points")
    with open(os.path.join(wd, "kdloss_seeds.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
