"""The package as pip builds it: a non-editable install has its configs and runs."""
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """``pip wheel .`` of a copy of the checkout (setuptools writes build/ beside the sources,
    and files left there by an older build would slip into the wheel)."""
    src = out / "src-copy"
    shutil.copytree(REPO / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # the setuptools at hand where it builds wheels (seconds); else pip fetches one, as pip
    # install does
    isolation = ["--no-build-isolation"] if _builds_wheels() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation,
                    "-q", "-w", str(out)], check=True, timeout=300)
    (wheel,) = out.glob("dance-*.whl")
    return wheel


def _builds_wheels() -> bool:
    """Whether the setuptools at hand builds wheels: its own bdist_wheel (70.1 on), or
    ``wheel``'s beside an older one."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    return any(importlib.util.find_spec(m) is not None
               for m in ("setuptools.command.bdist_wheel", "wheel"))


def test_the_wheel_carries_every_module_and_the_ready_configs(tmp_path):
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    sources = {str(p.relative_to(REPO / "src")) for p in (REPO / "src" / "dance").rglob("*.py")}
    configs = {str(p.relative_to(REPO / "src"))
               for p in (REPO / "src" / "dance" / "configs").rglob("*.yaml")}
    assert "dance/configs/synth.yaml" in configs
    assert sources <= names and configs <= names


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_trains_a_packaged_config(tmp_path):
    """pip wheel . -> a fresh venv -> pip install -> dance train --config synth (about two
    minutes: the venv installs torch from the registry)."""
    wheel = build_wheel(tmp_path / "wheel")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", str(wheel)], check=True, timeout=1200)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def dance(*args):
        return subprocess.run([str(bin_dir / "dance"), *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    assert "synth" in dance("configs").stdout
    assert dance("synth", "--out", "data/synth", "--train", "16", "--val", "4",
                 "--size", "64x128").returncode == 0
    r = dance("train", "--config", "synth", "--out", "runs/w", "train.epochs=1",
              "train.batch_size=4", "train.crop=64x128", "train.workers=0",
              "model.options={width_mult: 0.35, aspp_channels: 16}", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (work / "runs" / "w" / "metrics.json").is_file()
    # the installed package, not this checkout, ran
    where = subprocess.run([str(bin_dir / "python"), "-c", "import dance; print(dance.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True).stdout
    assert str(env_dir) in where
