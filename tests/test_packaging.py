"""The wheel: every package listed, and a non-editable install that finds its configs and assets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_under_src_is_listed_in_pyproject() -> None:
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"clmerge.conf"}


def _data_files(package_dir: Path) -> set[str]:
    """Every non-Python file a package directory ships (configs, JSON, model config, weights)."""
    return {str(p.relative_to(package_dir)) for p in package_dir.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


def test_a_non_editable_install_in_a_fresh_venv_finds_configs_and_assets(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the working tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("clmerge-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(fresh), "platbase": str(fresh)}))
    # The dependencies come from the dev environment (after the fresh site-packages); clmerge only from the wheel.
    (site / "dev_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)

    check = (
        "import json, importlib.resources as r, clmerge\n"
        "from clmerge.hydra_app import compose_config\n"
        "root = r.files('clmerge')\n"
        "cfg = compose_config(['benchmark=domain_incremental/world', 'finetune=reference'])\n"
        "files = sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())\n"
        "print(json.dumps({'file': clmerge.__file__, 'setting': cfg.benchmark.setting, 'files': files}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([str(fresh / "bin" / "python"), "-c", check], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert Path(info["file"]).is_relative_to(site), info["file"]
    assert info["setting"] == "domain_incremental"
    installed = set(info["files"])
    shipped = {f"conf/{name}" for name in _data_files(ROOT / "conf")} | _data_files(ROOT / "src" / "clmerge")
    assert shipped <= installed, f"missing from the wheel: {sorted(shipped - installed)}"
    assert "assets/model_configs/world-tiny.json" in installed and "conf/config.yaml" in installed

    show = subprocess.run([str(fresh / "bin" / "clmerge"), "config", "show", "--pretrain"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert show.returncode == 0 and "num_pairs:" in show.stdout, show.stderr
