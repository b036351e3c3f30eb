import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PRESETS = {"alnet/configs/paper.yaml", "alnet/configs/subject.yaml", "alnet/configs/grid.yaml"}


def test_presets_and_the_search_grid_resolve_by_name_from_the_package():
    import alnet
    from alnet.config import ConfigError, RunConfig, resolve_preset
    from alnet.train.tune import read_grid

    assert resolve_preset("paper").parent == Path(alnet.__file__).parent / "configs"
    paper = RunConfig.load("paper", epochs=3)
    assert (paper.protocol, paper.double_offline, paper.epochs) == ("paper", True, 3)
    search, fixed = read_grid()  # the default grid: the paper's, shipped with the package
    assert search["lr"] == [1.0e-4, 1.0e-3] and fixed["model"] == "alnet"
    with pytest.raises(ConfigError, match=r"papr: no such file; pass a YAML file or a preset name \(paper, subject\)"):
        RunConfig.load("papr")
    with pytest.raises(ConfigError, match=r"\(grid\)"):
        read_grid("paper")  # a run preset is not a search grid


@pytest.mark.slow
def test_a_built_wheel_carries_the_presets_and_finds_them_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source)
    shutil.copytree(REPOSITORY / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("alnet-*.whl"))
    assert PRESETS | {"alnet/data/cnmc-kaggle-sha256.csv.gz"} <= set(zipfile.ZipFile(wheel).namelist())

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = ("import alnet, sys; from alnet.cli import app; print(alnet.__file__, flush=True); "
            "sys.argv = ['alnet', 'train', '--config', 'paper', '--data', 'no-such-data']; app()")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.startswith(str(site)), "the installed wheel, not the checkout, was imported"
    assert "paper: no such file" not in done.stderr
    assert done.returncode == 2 and "no-such-data: no such directory" in done.stderr
