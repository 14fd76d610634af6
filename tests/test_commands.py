"""The console scripts declared in pyproject.toml: each names a `main` that exists, answers --help from its
signature, and is what `python -m <module>` runs."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_is_declared():
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    assert modules == {"rwkv_clip.datamodules.prepare", "rwkv_clip.describe.__main__", "rwkv_clip.tokenizer",
                       "rwkv_clip.convert", "rwkv_clip.ops.build"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_point_answers_help(script, capsys):
    module, attr = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module), attr)
    try:
        status = main(["--help"])
    except SystemExit as exit:
        status = exit.code
    assert status in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_script_runs(script):
    path = shutil.which(script) or (str(Path(sys.executable).parent / script)
                                    if (Path(sys.executable).parent / script).exists() else None)
    if path is None:
        pytest.skip(f"{script} is not installed in this environment: pip install -e .")
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_bad_input_exits_1_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwkv_clip.convert", str(tmp_path / "missing.pt"),
                           str(tmp_path / "out.ckpt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing.pt" in proc.stderr
