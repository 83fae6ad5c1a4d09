"""The built wheel ships every module: build it from a copy of the sources, install it with
--no-deps into a fresh folder and import every module from there (not from the checkout)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = r"""
import importlib, json, pathlib, sys
site = pathlib.Path(sys.argv[1]).resolve()
names = sorted(".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__")
               for p in (site / "capstriton").rglob("*.py"))
files = {}
for name in names:
    files[name] = str(pathlib.Path(importlib.import_module(name).__file__).resolve())
print(json.dumps(files))
"""


def _checkout_modules() -> set[str]:
    """Module names the sources define: capstriton/** and kernels/** (installed as capstriton.kernels)."""
    names = set()
    for top, package in (("capstriton", "capstriton"), ("kernels", "capstriton.kernels")):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT / top).with_suffix("").parts
            name = ".".join((package, *parts))
            names.add(name.removesuffix(".__init__"))
    return names


def test_wheel_installs_and_every_module_imports_from_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("capstriton", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                          str(src)], check=True, capture_output=True, text=True, cwd=tmp_path)
    wheels = list((tmp_path / "dist").glob("capstriton-*.whl"))
    assert len(wheels) == 1
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheels[0])], check=True,
                   capture_output=True, text=True, cwd=tmp_path)

    # -S: no site-packages .pth files, so the checkout's editable install cannot answer imports;
    # the dependencies (torch, triton, ...) come from this interpreter's library folders.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sorted(deps)])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-S", "-c", IMPORT_ALL, str(site)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(files) == _checkout_modules(), set(files) ^ _checkout_modules()
    assert {"capstriton.data", "capstriton.data.provision", "capstriton.kernels"} <= set(files)
    outside = {name: f for name, f in files.items() if not f.startswith(str(site.resolve()))}
    assert not outside, f"imported from outside the installed wheel: {outside}"
