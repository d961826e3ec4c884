"""Parameter counts and FLOPs of the paper's three networks, beside its Table 5.

    python -m fan_jax.summary          # table
    python -m fan_jax.summary --json   # [{"name", "params", "flops"}, ...]

Parameters are trainable weights only (BatchNorm running statistics excluded). FLOPs are
XLA's cost analysis of the inference forward at 256x256 with batch 1, counting a
multiply-add as two operations (so they read about twice the multiply-add counts that
papers often call FLOPs; `macs` = flops / 2 is printed beside them).
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fan_jax.models import fan

# Table 5 of the paper (MobileFAN, MobileFAN (0.5)); the teacher's size is from the text.
PAPER: dict[str, dict[str, Any]] = {
    "mobilefan": {"label": "MobileFAN", "params": 2.02e6, "flops": 0.72e9},
    "mobilefan_0.5": {"label": "MobileFAN (0.5)", "params": 1.84e6, "flops": 0.45e9},
    "teacher": {"label": "Teacher (ResNet-50)", "params": 34e6, "flops": None},
}


def model_summary(name: str, num_landmarks: int = 98, size: int = 256) -> dict[str, Any]:
    """{'name', 'params', 'flops'} of one registered model (inference forward, batch 1)."""
    model = fan.build_model(name, num_landmarks)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])))
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0]
    assert cost is not None, "XLA gave no cost analysis for this backend"
    return {"name": name, "params": params, "flops": float(cost["flops"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--num_landmarks", type=int, default=98)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    rows = [model_summary(n, args.num_landmarks, args.size) for n in PAPER]
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"{args.size}x{args.size} input, {args.num_landmarks} landmarks; FLOPs count a "
        "multiply-add as 2 (MACs = FLOPs / 2)"
    )
    print(f"{'model':<22}{'params (M)':>11}{'paper':>8}{'GFLOPs':>9}{'GMACs':>8}{'paper':>8}")
    for r in rows:
        p = PAPER[r["name"]]
        paper_flops = f"{p['flops'] / 1e9:.2f}" if p["flops"] else "-"
        print(
            f"{p['label']:<22}{r['params'] / 1e6:>11.2f}{p['params'] / 1e6:>8.2f}"
            f"{r['flops'] / 1e9:>9.2f}{r['flops'] / 2e9:>8.2f}{paper_flops:>8}"
        )


if __name__ == "__main__":
    main()
