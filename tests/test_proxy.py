"""benchmarks/proxy.py in its tiny mode (2 steps a row): every row trains and is tabled, a
rerun resumes instead of retraining, and the table's KD-vs-no-KD verdicts are computed."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

from benchmarks import proxy
from configs import proxy as proxy_config

helpers.register_tiny_models()


def _tiny_models():
    c = proxy_config.get_config()
    c.proxy.teacher_model = "tiny_teacher"
    c.proxy.student_model = c.proxy.half_model = "tiny_student"
    return c


def test_rows_cover_tables_5_and_6():
    c = proxy_config.get_config()
    labels = [r.label for r in proxy.rows(c)]
    assert labels[:5] == [
        "ResNet-50 teacher",
        "MobileFAN",
        "MobileFAN + FA",
        "MobileFAN + FS",
        "MobileFAN + FA + FS",
    ]
    assert "MobileFAN (0.5) + FA + FS" in labels and "MobileFAN + FS3" not in labels
    c.proxy.ablation = True
    assert [r.key for r in proxy.rows(c)][-6:] == [
        "mobilefan_fa1",
        "mobilefan_fa2",
        "mobilefan_fa3",
        "mobilefan_fs1",
        "mobilefan_fs2",
        "mobilefan_fs3",
    ]
    cfg = proxy.run_config(c, proxy.rows(c)[-1], 2, "/o", c.proxy.num_train)
    assert cfg.distill.fs_layers == (False, False, True) and cfg.distill.fa_layers == (False,) * 3
    assert cfg.model.name == "mobilefan" and cfg.seed == 2
    assert cfg.distill.teacher_workdir == "/o/runs/teacher/s0"
    # One decay, at 80% of the student's steps, expressed in the schedule's epochs.
    epoch = c.proxy.num_train // cfg.train.batch_size
    assert round(cfg.train.lr_decay_epochs[0] * epoch) == round(0.8 * c.proxy.student_steps)


def test_format_table_verdicts():
    c = proxy_config.get_config()

    def res(*nmes):
        return [
            {
                "seconds": 60.0,
                "metrics": {s: {"nme": n, "fr": 0.1, "auc": 0.5} for s in proxy.SPLITS},
            }
            for n in nmes
        ]

    table = proxy.format_table(
        c,
        {
            "mobilefan": res(0.070, 0.072, 0.074),
            "mobilefan_fa": res(0.060, 0.061, 0.062),
            "mobilefan_fs": res(0.071, 0.073, 0.072),
        },
    )
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "7.20 ± 0.20" in lines["MobileFAN"]
    assert "-1.10 (better" in lines["MobileFAN + FA"]
    assert "within the seed spread" in lines["MobileFAN + FS"]
    assert "MobileFAN + FA + FS" not in lines  # rows without results are left out


def test_tiny_mode_trains_every_row_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "proxy")
    assert proxy.main(["--out", out, "--tiny"], config=_tiny_models()) == 0
    with open(os.path.join(out, "proxy_results.json")) as f:
        results = json.load(f)
    assert set(results) == {r.key for r in proxy.rows(_tiny_models())}
    assert len(results["teacher"]) == 1 and len(results["mobilefan_fa_fs"]) == 2
    assert len(results["mobilefan_fa"]) == 1  # proxy.single_term_seeds
    for runs in results.values():
        for r in runs:
            assert r["steps"] == 2 and set(r["metrics"]) == set(proxy.SPLITS)
    for f in ("proxy_table.md", "proxy_nme.png", "runs/mobilefan_half_kd/s1/eval/metrics.json"):
        assert os.path.exists(os.path.join(out, f)), f
    table = capsys.readouterr().out
    assert "| MobileFAN (0.5) + FA + FS | 2 |" in table

    # A rerun finds every run finished: nothing trains, the same table comes back.
    marker = os.path.join(out, "runs", "teacher", "s0", "proxy_result.json")
    mtime = os.path.getmtime(marker)
    assert proxy.main(["--out", out, "--tiny"], config=_tiny_models()) == 0
    assert "seed 0:" not in capsys.readouterr().out
    assert os.path.getmtime(marker) == mtime

    # --report tables what has finished and trains nothing, even with runs missing.
    os.remove(os.path.join(out, "runs", "mobilefan_fs", "s0", "proxy_result.json"))
    assert proxy.main(["--out", out, "--tiny", "--report"], config=_tiny_models()) == 0
    printed = capsys.readouterr().out
    assert "seed 0:" not in printed and "| MobileFAN + FA | 1 |" in printed
    assert "| MobileFAN + FS |" not in printed
