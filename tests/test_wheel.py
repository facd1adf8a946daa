"""Issue 13 item 9: ``pip install kplib`` works outside the repository.

The wheel is built from a copy of the sources (so nothing is written into the checkout), installed into a fresh venv
outside the checkout, and used from a temporary working directory with no ``KPL_*`` variable set: the package imports
from the fresh venv, a simulated world runs through KPL, and ``kpl --help``, ``kpl datasets`` and
``kpl kb validate brain_tumor_mri`` work without the source tree's ``../shared`` folders.

Dependencies: this machine has no network, so the fresh venv cannot download torch, transformers and the rest. The
wheel is installed with ``--no-deps --no-index`` and the venv gets the project's already-installed dependencies
through a ``.pth`` file naming ``.venv``'s site-packages. Python adds that folder to ``sys.path`` after the fresh
venv's own site-packages and does not process the ``.pth`` files inside it, so ``.venv``'s editable install of kplib
(a ``.pth`` import hook) stays inactive: ``import kplib`` can only find the wheel's copy, which the tests assert.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import kplib
from kplib.io.knowledge import list_curated

pytestmark = pytest.mark.slow  # builds a wheel and a venv, starts five fresh interpreters: ~1-2 minutes

REPO = Path(kplib.__file__).resolve().parent.parent
SIMULATION = """
import json, sys, kplib
from kplib.method.simulate import make_world
from kplib.method.methods import run_method
world = make_world(n_images=300, n_classes=3, dim=64, n_descriptions=10, seed=0)
out = {"file": kplib.__file__, "book_modules": sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules)}
for method in ("kpl_corrected", "kpl_reference"):
    r = run_method(method, world.image_embeddings, world.text, iters_proxy=200)
    out[method] = r.predictions.tolist()
out["labels"] = world.labels.tolist()
import kplib.cli, kplib.pipeline  # the whole core, as `kpl` loads it
out["book_modules_after_cli"] = sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules)
print(json.dumps(out))
"""


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPL_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "xdg-cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def _run(argv, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, wheel file, working directory, environment): the wheel installed in a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "kplib", src / "kplib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
             tmp, {**os.environ, "PIP_NO_INDEX": "1"})
    assert r.returncode == 0, r.stderr
    wheel = next(dist.glob("kplib-*.whl"))

    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, os.environ)
    assert r.returncode == 0, r.stderr
    python = venv / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
             tmp, os.environ)
    assert r.returncode == 0, r.stderr
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp,
                     os.environ).stdout.strip())
    (site / "kplib_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    (tmp / "home").mkdir()
    return venv, wheel, cwd, _clean_env(tmp)


def test_outside_the_checkout(installed):
    venv, _, cwd, _ = installed
    assert not venv.resolve().is_relative_to(REPO) and not cwd.resolve().is_relative_to(REPO)
    assert not (cwd / "shared").exists() and not (cwd.parent / "shared").exists()


def test_a_simulated_world_runs_through_the_installed_kpl(installed):
    venv, _, cwd, env = installed
    r = _run([venv / "bin" / "python", "-c", SIMULATION], cwd, env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(venv.resolve()), out["file"]  # the wheel, not the checkout
    assert not Path(out["file"]).resolve().is_relative_to(REPO)
    assert out["book_modules"] == [] and out["book_modules_after_cli"] == []  # figures' dependencies stay out
    labels = torch.tensor(out["labels"])
    for method in ("kpl_corrected", "kpl_reference"):
        pred = torch.tensor(out[method])
        assert float((pred == labels).double().mean()) > 0.8, method  # measured 0.95 / 0.96; chance is 1/3
    # the same numbers as the checkout's own code
    from kplib.method.methods import run_method
    from kplib.method.simulate import make_world

    world = make_world(n_images=300, n_classes=3, dim=64, n_descriptions=10, seed=0)
    here = run_method("kpl_corrected", world.image_embeddings, world.text, iters_proxy=200)
    assert here.predictions.tolist() == out["kpl_corrected"]


def test_kpl_help(installed):
    venv, _, cwd, env = installed
    r = _run([venv / "bin" / "kpl", "--help"], cwd, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: kpl") and all(c in r.stdout for c in ("run", "compare", "encode", "merge",
                                                                              "datasets", "audit", "kb"))


def test_kpl_datasets_asks_for_the_data_root(installed):
    venv, _, cwd, env = installed
    r = _run([venv / "bin" / "kpl", "datasets"], cwd, env)
    assert r.returncode == 0, r.stderr
    assert "KPL_DATA_ROOT" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert "brain_tumor_mri" in r.stdout  # the registry is packaged


def test_kpl_kb_validate_a_curated_kb_without_a_tokenizer(installed):
    venv, _, cwd, env = installed
    r = _run([venv / "bin" / "kpl", "kb", "validate", "brain_tumor_mri"], cwd, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "CLIP tokenizer folder not found" not in r.stdout + r.stderr
    assert "prompt token lengths not checked" in r.stdout and "KPL_TOKENIZER_DIR" in r.stdout


def test_the_standin_outside_the_checkout_names_the_tokenizer_variable(installed, tmp_path):
    venv, _, cwd, env = installed
    folder = tmp_path / "images"
    for i, c in enumerate(("a", "b")):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (100 * i, 0, 0)).save(folder / c / "x.png")
    r = _run([venv / "bin" / "kpl", "encode", folder, "--model", "standin"], cwd, env)
    assert r.returncode == 2 and "KPL_TOKENIZER_DIR" in r.stderr and "Traceback" not in r.stderr


def test_the_wheel_holds_the_package_data_and_metadata(installed):
    _, wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode("utf-8")
        entry = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode("utf-8")
    assert {"kplib/io/datasets.json", "kplib/io/generic_descriptions.json"} <= names
    assert {f"kplib/io/kbs/{k}.json" for k in list_curated()} <= names and list_curated()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "notebooks/", "book/", "benchmarks/")) for n in names)
    assert "License-Expression: MIT" in meta
    core = [line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names_only = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in core}
    assert {"torch", "transformers", "pot", "platformdirs"} <= names_only
    assert not names_only & {"matplotlib", "seaborn", "psutil", "umap-learn"}
    assert "torch>=2.6" in core
    assert "kpl = kplib.cli:main" in entry
