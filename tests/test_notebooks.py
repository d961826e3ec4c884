"""notebooks/: the quickstart runs end to end (small switch on); the Colab TPU notebook parses
and its configuration trains one distillation step on 8 fake CPU devices."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO_ROOT, "notebooks")


def _load(name):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def python_source(cell_source: str) -> str:
    """A code cell without its IPython lines (shell `!` and magic `%` commands)."""
    return "\n".join(
        ln for ln in cell_source.splitlines() if not ln.lstrip().startswith(("!", "%"))
    )


def test_python_source_strips_shell_and_magics():
    src = "x = 1\n!pip install foo\n  %time y = 2\n%%capture\nz = x"
    assert python_source(src) == "x = 1\nz = x"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "colab_tpu_train.ipynb"])
def test_every_code_cell_parses(name):
    nb = _load(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    for i, cell in enumerate(code):
        try:
            ast.parse(python_source(cell.source))
        except SyntaxError as e:
            pytest.fail(f"{name} code cell {i} does not parse: {e}\n{cell.source}")
        assert not cell.get("outputs"), f"{name} cell {i} is saved with outputs"


def test_quickstart_runs_end_to_end(tmp_path):
    from nbclient import NotebookClient

    nb = _load("quickstart.ipynb")
    env_before = {
        k: os.environ.get(k) for k in ("FAN_JAX_NOTEBOOK_SMALL", "FAN_JAX_NOTEBOOK_WORKDIR")
    }
    os.environ["FAN_JAX_NOTEBOOK_SMALL"] = "1"
    os.environ["FAN_JAX_NOTEBOOK_WORKDIR"] = str(tmp_path / "workdir")
    try:
        # The kernel inherits this environment: same interpreter, small switch on.
        NotebookClient(
            nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    assert "small run" in text
    assert "trained 10 steps" in text
    assert "TFLite vs JAX" in text
    wd = tmp_path / "workdir"
    assert (wd / "config.json").exists() and (wd / "mobilefan.tflite").exists()
    assert json.loads((wd / "mobilefan.tflite.json").read_text())["num_landmarks"] == 68
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 3  # faces, predictions, the astronaut


_TPU_CONFIG_RUN = r"""
import json, os, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, {repo!r})
sys.path.insert(0, os.path.join({repo!r}, "tests"))
import _train_helpers
from fan_jax import train

ns = {{"os": os}}
exec({cell!r}, ns)
teacher, student, teacher_wd, student_wd = ns["make_configs"]({data!r}, {root!r})
assert jax.device_count() == 8
summary = {{"batch": student.train.batch_size, "distill": student.distill.enabled,
            "model": student.model.name, "dataset": student.dataset.name,
            "teacher_model": teacher.model.name, "teacher_workdir": student.distill.teacher_workdir,
            "data_dir": student.dataset.data_dir,
            "compute_dtype": [teacher.train.compute_dtype, student.train.compute_dtype]}}
# CPU-sized: small crops, one step, no periodic evaluation, a tiny teacher architecture
# (the teacher loader takes the architecture from the teacher run's config).
_train_helpers.register_tiny_models()
teacher.model.name = "tiny_teacher"
for c in (teacher, student):
    c.input_size = 64
    c.train.num_train_steps = 1
    c.train.eval_every_steps = -1
    c.train.log_every_steps = 1
sources = _train_helpers.fake_sources(num_train=16, num_test=8, num_landmarks=98, test_split="test")
train.train_and_evaluate(teacher, teacher_wd, sources=sources, evaluate_at_end=False)
result = train.train_and_evaluate(student, student_wd, sources=sources, evaluate_at_end=False)
summary["step"] = int(result.step)
summary["params"] = sorted(result.state.params)
print("SUMMARY " + json.dumps(summary))
"""


def test_tpu_notebook_configuration_runs_one_step_on_fake_devices(tmp_path):
    nb = _load("colab_tpu_train.ipynb")
    cells = [c for c in nb.cells if "configuration" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "the TPU notebook needs one code cell tagged 'configuration'"
    src = python_source(cells[0].source)
    # Only the definitions: the notebook's own call needs its Drive folders.
    tree = ast.parse(src)
    tree.body = [
        n
        for n in tree.body
        if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
        or (isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant))
    ]
    script = _TPU_CONFIG_RUN.format(
        repo=REPO_ROOT,
        cell=ast.unparse(tree),
        data=str(tmp_path / "tfds"),
        root=str(tmp_path / "wd"),
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")][-1]
    s = json.loads(line[len("SUMMARY ") :])
    assert s["step"] == 1
    assert s["distill"] and s["model"] == "mobilefan" and s["dataset"] == "wflw"
    assert s["teacher_model"] == "teacher"  # the notebook's config: ResNet-50
    assert s["batch"] % 8 == 0
    assert s["teacher_workdir"] == str(tmp_path / "wd" / "wflw_teacher")
    assert s["data_dir"] == str(tmp_path / "tfds")
    assert s["params"] == ["adapters", "student"]
    assert s["compute_dtype"] == ["bfloat16", "bfloat16"]  # the TPU notebook's default
    assert (tmp_path / "wd" / "wflw_distill" / "checkpoints" / "1").is_dir()
