"""The README's table of export formats for one trained workdir: size, batch-1 latency, NME.

    python benchmarks/export_table.py --workdir workdirs/demo/mobilefan_kd --out out/exports

Exports each format through `python -m fan_jax.export ... --evaluate` (so int8 calibrates on
the run's own training split and every file is scored on the run's test splits by the
evaluator training uses), then times each file in its runtime at batch 1 next to the jitted
JAX model, interleaved (`harness.time_interleaved`), on one synthetic face crop. Writes
`export_table.md` and `export_table.json` to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import time_interleaved

FORMATS = (  # (name, --format, --quantize, file)
    ("TFLite float32", "tflite", "none", "m_f32.tflite"),
    ("TFLite float16", "tflite", "float16", "m_f16.tflite"),
    ("TFLite int8", "tflite", "int8", "m_int8.tflite"),
    ("ONNX float32", "onnx", "none", "m.onnx"),
)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--split", default=None, help="the split in the table (default: first)")
    args = parser.parse_args(argv)

    import jax

    from fan_jax import compiler, export, predict
    from fan_jax.export_graph import inference_fn
    from fan_jax.exported import load_exported, read_sidecar

    os.makedirs(args.out, exist_ok=True)
    rows = {}
    for name, fmt, quant, file in FORMATS:
        path = os.path.join(args.out, file)
        cli = ["--workdir", args.workdir, "--format", fmt, "--out", path, "--evaluate"]
        if quant != "none":
            cli += ["--quantize", quant]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = export.main([*cli, "--no_verify"])
        print(buf.getvalue(), flush=True)
        if status:
            print(f"{name}: export failed ({status})", file=sys.stderr)
            return status
        rows[name] = {"path": path, "sidecar": read_sidecar(path)}

    loaded = predict.load_student(workdir=args.workdir)
    size = loaded.input_size
    x = export.synthetic_crops(1, size, seed=3).astype(np.float32)
    jitted = jax.jit(
        inference_fn(loaded.model, loaded.variables, native_convs=False),
        compiler_options=compiler.compiler_options("predict"),
    )
    iters = args.iters
    fns = {"JAX (jit, CPU)": lambda: [jax.block_until_ready(jitted(x)) for _ in range(iters)]}
    for name, row in rows.items():
        rt = load_exported(row["path"])
        fns[name] = lambda rt=rt: [rt(x) for _ in range(iters)]
    times = time_interleaved(fns, args.repeats, 1)
    ms = {k: 1e3 * float(np.median(v)) / iters for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / float(np.median(v)) for k, v in times.items()}

    first = next(iter(rows.values()))["sidecar"]
    split = args.split or next(iter(first["evaluation"]))
    ref = first["evaluation_reference"][split]
    lines = [
        f"{loaded.model_name}, {size} px, {loaded.num_landmarks} landmarks, step {loaded.step}; "
        f"NME (%) on the `{split}` split ({ref['count']} faces, no flip), batch-1 latency "
        f"median of {args.repeats} x {iters} calls, interleaved, on {cpu_model()} "
        f"({os.cpu_count()} cores)",
        "",
        "| format | size (MiB) | batch-1 ms | NME | NME - JAX | FR@0.1 | int8 calibration |",
        "|---|---|---|---|---|---|---|",
        f"| JAX checkpoint | | {ms['JAX (jit, CPU)']:.2f} | {100 * ref['nme']:.2f} | | "
        f"{100 * ref['fr']:.1f} | |",
    ]
    table = {"split": split, "reference": ref, "jax_ms": ms["JAX (jit, CPU)"], "formats": {}}
    for name, row in rows.items():
        info = row["sidecar"]
        ev = info["evaluation"][split]
        size_mib = export.file_size(row["path"]) / 2**20
        cal = info.get("calibration")
        cal_text = f"{cal['source']} ({cal['count']} crops)" if cal else ""
        lines.append(
            f"| {name} | {size_mib:.2f} | {ms[name]:.2f} | {100 * ev['nme']:.2f} | "
            f"{100 * (ev['nme'] - ref['nme']):+.2f} | {100 * ev['fr']:.1f} | {cal_text} |"
        )
        table["formats"][name] = {
            "size_mib": size_mib,
            "latency_ms": ms[name],
            "spread": spread[name],
            "evaluation": info["evaluation"],
            "calibration": cal,
        }
    table["cpu"] = cpu_model()
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "export_table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "export_table.json"), "w") as f:
        json.dump(table, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
