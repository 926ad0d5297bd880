"""setup.py: the compiled request path is all or nothing, and never a requirement. Without a C
compiler (or with STRANGLER_COMPILE=0) the wheel is the same code, uncompiled; a compiled wheel is
what scripts/test-compiled and the container tests exercise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.build

ROOT = Path(__file__).resolve().parent.parent


def _wheel(tmp_path: Path, **env: str) -> tuple[zipfile.ZipFile, str]:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "proxy", src / "proxy", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(src)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (wheel,) = out.glob("strangler-*.whl")
    return zipfile.ZipFile(wheel), done.stdout + done.stderr


def test_without_a_c_compiler_the_wheel_is_the_whole_pure_python_package(tmp_path: Path) -> None:
    wheel, log = _wheel(tmp_path, CC="/bin/false", LDSHARED="/bin/false")
    names = wheel.namelist()
    assert not [n for n in names if n.endswith(".so")], "no half-compiled package"
    assert "proxy/edge/server.py" in names and "proxy/traffic/forward.py" in names
    assert "building without mypyc" in log


def test_strangler_compile_0_skips_mypyc(tmp_path: Path) -> None:
    wheel, _ = _wheel(tmp_path, STRANGLER_COMPILE="0")
    names = wheel.namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert "proxy/edge/client.py" in names
