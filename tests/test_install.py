"""The package as users install it: a wheel, not the editable install the suite runs under.

`pip install .` builds a wheel from pyproject.toml; a subpackage the build leaves out (bertino.plumbing,
bertino.speedups) breaks every import outside the clone while an editable install still finds it next to the
code. So: build the wheel, install it (without dependencies: they are the ones this environment already has) into
a fresh virtual environment that sees this one's packages but not its bertino, and from a folder outside the clone import every module
the source tree has and run every `python -m bertino.X --help`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT

COMMANDS = ["bertino.check", "bertino.convert", "bertino.mine", "bertino.plot"]


def source_modules() -> list[str]:
    """Every module of the source tree's bertino package, dotted (bertino, bertino.plumbing.cli, ...)."""
    names = []
    for path in sorted((ROOT / "bertino").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# Run inside the fresh environment: import every module from the installed wheel (never from the clone), then
# each command's --help exactly as `python -m` runs it (runpy, as __main__), in one process to load torch once.
CHECK_INSTALLED = r"""
import contextlib, importlib, io, json, runpy, sys
modules, commands, site = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name in modules:
    module = importlib.import_module(name)
    assert module.__file__.startswith(site), (name, module.__file__, site)
for name in commands:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code in (0, None), (name, e.code)
    assert out.getvalue().startswith("usage:"), (name, out.getvalue()[:200])
print("ok", len(modules), "modules", len(commands), "commands")
"""


def test_the_wheel_installs_every_module_and_command(tmp_path):
    import json

    # Build from a copy: a build in the clone would leave build/ and *.egg-info there (and a stale build/lib
    # could put a deleted module into the wheel)
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                ".venv*", ".pytest_cache", ".hypothesis"))
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # --no-build-isolation: the build uses this environment's setuptools, so it needs no network
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(wheels), str(source)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("bertino-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("bertino/") and n.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "bertino").rglob("*.py")}
    assert expected <= packaged, f"the wheel leaves out {sorted(expected - packaged)}"

    # A fresh virtual environment that sees this environment's packages (torch and the other dependencies) but
    # not its bertino: its site-packages folders go into a .pth file as plain paths, so their own .pth files (the
    # editable install's finder among them) are not run. (`venv --system-site-packages` would miss them when
    # this environment is itself a virtual environment: it links the base interpreter's site-packages.)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(site) / "dependencies.pth").write_text("".join(p + "\n" for p in ours))
    # this environment's pip, found through that .pth, installs into the venv's own prefix
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                              "--disable-pip-version-check", str(wheel)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr

    outside = tmp_path / "elsewhere"  # not the clone: nothing may be imported from the working tree
    outside.mkdir()
    proc = subprocess.run([str(python), "-c", CHECK_INSTALLED, json.dumps(source_modules()), json.dumps(COMMANDS),
                           site], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout
