"""bf16 matmuls against float32 on a run's test splits: ``python benchmarks/precision_guard.py --workdir W``.

Scores the workdir's student with `fan_jax.predict.Predictor` at `--precision float32` and
`bfloat16` through the evaluator's crops and metrics (no flip-test) and prints both NMEs and
their difference per split. The accuracy guard for `--precision`: the difference should stay
within 0.05 NME points. Exit status 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fan_jax import data, evaluate, predict
from fan_jax.score_exported import run_config

TOLERANCE_POINTS = 0.05


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--which", default="latest")
    args = p.parse_args(argv)
    config = run_config(args.workdir)
    data.require_built(config)
    sources = data.sources(config, data.test_splits(config))
    loaded = predict.load_student(workdir=args.workdir, which=args.which)
    nme: dict[str, dict[str, float]] = {}
    for precision in ("float32", "bfloat16"):
        pred = predict.Predictor.from_loaded(loaded, detector=lambda im: [], precision=precision)
        res = evaluate.evaluate_splits(
            lambda images, pred=pred: (pred.predict_crops(images)[0], None),
            {s: evaluate.eval_batches_fn(config, src) for s, src in sources.items()},
            config.dataset.name,
            config.eval.normalizer,
            out_dir=None,
            model_name=precision,
        )
        nme[precision] = {s: 100 * r["no_flip"]["nme"] for s, r in res.items()}
    diff = {s: nme["bfloat16"][s] - nme["float32"][s] for s in nme["float32"]}
    ok = all(abs(d) <= TOLERANCE_POINTS for d in diff.values())
    print(json.dumps({"nme_percent": nme, "bf16_minus_f32_points": diff, "within": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
