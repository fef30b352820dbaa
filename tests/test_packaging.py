"""The README's example runs as written, and a built wheel installed outside the source tree
imports, finds the CUDA sources and the reference, and runs the demo."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheels = list((tmp / "dist").glob("sparge_cupy-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
                    str(wheels[0])], check=True, capture_output=True)
    return tmp


def _run_outside(tmp, code_or_args):
    env = dict(os.environ, PYTHONPATH=str(tmp / "site"), MPLBACKEND="Agg")
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_carries_reference_cuda_and_data(installed_wheel):
    code = (
        "import sparge_cupy, sparge_cupy.reference as r, sparge_cupy.data as d\n"
        "from sparge_cupy import _resources\n"
        f"site = {str(installed_wheel / 'site')!r}\n"
        "assert sparge_cupy.__file__.startswith(site), sparge_cupy.__file__\n"
        "assert r.__file__.startswith(site), r.__file__\n"
        "cu = sorted(p.name for p in _resources.cuda_dir().iterdir())\n"
        "assert str(_resources.cuda_dir()).startswith(site)\n"
        "assert 'sparse_attn.cu' in cu and 'common.cuh' in cu, cu\n"
        "assert d.load_default_qkv()['q'].ndim == 4\n"
        "from sparge_cupy.cli import tuned_thresholds\n"
        "assert tuned_thresholds()['cdfthreshd'].shape == (12,)\n"
        "print('ok', cu)\n"
    )
    res = _run_outside(installed_wheel, code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


def test_wheel_runs_demo(installed_wheel):
    res = _run_outside(installed_wheel, ["-m", "sparge_cupy", "demo", "--cpu", "--out", str(installed_wheel / "figs")])
    assert res.returncode == 0, res.stdout + res.stderr
    pngs = list((installed_wheel / "figs").glob("*.png"))
    assert len(pngs) >= 2 and all(p.stat().st_size > 10_000 for p in pngs), pngs
