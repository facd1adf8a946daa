"""The book's notebooks: committed clean, built on one skeleton, and each runs under papermill at small parameters
producing the artefacts it promises.

Convention (every notebook in notebooks/):
- one code cell tagged ``parameters`` that assigns MODEL, DATASET (or DATASETS), LIMIT_PER_CLASS, SEED and
  OUTPUT_DIR (the folder the notebook writes its artefacts to: results tables as CSV/JSON, figures);
- markdown headings Overview, Prerequisites, Summary, What's next (and an Imports section);
- ``%matplotlib inline`` in a code cell, so figures embed even when the environment sets MPLBACKEND=Agg;
- committed without outputs (no outputs, execution_count null);
- code formatted by ruff at 88 columns (``make format``; notebooks/ruff.toml), cell tags that Jupyter Book knows;
- no code repeated across chapters, kplib/ and benchmarks/ (``duplicates``, via tools/repeated_code.py).

``EXPECTATIONS`` below says, per notebook, which small parameters the test passes and what it checks afterwards.
A notebook without an entry fails ``test_every_notebook_has_expectations``: add one when adding a notebook.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import nbformat
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
REQUIRED_PARAMETERS = ("MODEL", "LIMIT_PER_CLASS", "SEED", "OUTPUT_DIR")
REQUIRED_HEADINGS = ("Overview", "Prerequisites", "Summary", "What's next")
# Cell tags myst-nb / Jupyter Book / papermill act on; another tag (a typo: "hide_input") silently does nothing.
KNOWN_TAGS = frozenset({
    "parameters", "injected-parameters", "remove-cell", "remove-input", "remove-output", "remove-stderr",
    "remove-stdout", "hide-cell", "hide-input", "hide-output", "raises-exception", "skip-execution", "scroll-output",
    "scroll-input", "output_scroll", "full-width", "margin", "thebe-init",
})
LINE_LENGTH = 88
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
sys.path.insert(0, str(REPO / "tools"))
import repeated_code  # noqa: E402  (tools/ is a folder of scripts)
# Parameters every notebook receives in the test: the untrained stand-in, few images, a fixed seed.
COMMON_PARAMETERS = {"MODEL": "standin", "LIMIT_PER_CLASS": 8, "SEED": 0}


def _check_balancing_study(out: Path) -> None:
    _check_csvs(out, ("balancing_study.csv", "transport_ablation.csv"))
    df = pd.read_csv(out / "balancing_study.csv")
    assert {"world", "imbalance", "method", "seed", "accuracy", "balanced_accuracy", "encoder"} <= set(df.columns)
    assert df["accuracy"].between(0, 1).all() and df["balanced_accuracy"].between(0, 1).all()
    assert (df["encoder"].str.contains("SIMULATED")).all()
    assert df["imbalance"].nunique() >= 2 and df["method"].nunique() >= 3
    ablation = pd.read_csv(out / "transport_ablation.csv")
    assert {"counts", "seed", "variant", "accuracy", "encoder"} <= set(ablation.columns)
    assert set(ablation["counts"]) == {"exact", "multinomial"} and ablation["variant"].nunique() >= 5
    assert ablation["accuracy"].between(0, 1).all() and ablation["encoder"].str.contains("SIMULATED").all()
    moves = pd.read_csv(out / "transport_moves.csv")
    assert {"counts", "transport", "direction", "images"} <= set(moves.columns) and (moves["images"] >= 0).all()
    meta = json.loads((out / "run.json").read_text())
    assert meta["encoder"].startswith("SIMULATED") and meta["seed"] == 0


def _check_csvs(out: Path, fraction_files: tuple[str, ...] = ()) -> None:
    """Every CSV in OUTPUT_DIR is non-empty; an ``encoder`` column never names a real encoder (the test runs the
    stand-in or the simulator; baseline rows say "none"); metric columns of ``fraction_files`` lie in [0, 1]."""
    for path in sorted(out.rglob("*.csv")):
        df = pd.read_csv(path)
        assert len(df) > 0, f"{path.name} is empty"
        if "encoder" in df:
            labels = df["encoder"].dropna().astype(str)
            # baseline rows (majority class, chance) say "none (reference line, no model)"
            assert labels.str.contains(r"UNTRAINED|SIMULATED|^none\b").all(), \
                f"{path.name}: encoder column names a real encoder in a stand-in run: {sorted(set(labels))[:3]}"
        if path.name in fraction_files:
            for col in ("accuracy", "balanced_accuracy", "macro_f1"):
                if col in df:
                    values = pd.to_numeric(df[col], errors="coerce").dropna()
                    assert len(values) and values.between(0, 1).all(), f"{path.name}: {col} outside [0, 1]"


def _check_knowledge_base(out: Path) -> None:
    """Chapter 01: the curated KBs validate, no LLM is called, and the audit finds what the chapter's prose states
    about the shared datasets (duplicate groups measured on the full folders; near-duplicates skipped in the test)."""
    _check_csvs(out)
    assert pd.read_csv(out / "validation.csv")["ok"].all()
    assert json.loads((out / "generation.json").read_text())["status"].startswith("not run")
    audit = pd.read_csv(out / "audit.csv", index_col="dataset")
    assert (audit["images"] > 0).all()
    # on the shared sets only cross-class duplicates make `kpl audit` exit 1 (no unreadable, aliased or empty folders)
    assert ((audit["groups across classes"] > 0) == (audit["exit code"] == 1)).all()
    stated = {"brain_tumor_mri": (21, 0), "chest_xray_pneumonia": (6, 0), "eye_diseases_4class": (2, 2),
              "aptos2019_dr_gaussian": (59, 14), "malaria_cells": (0, 0), "tb_cxr_nitrd_da": (0, 0)}
    for name, groups in stated.items():
        found = tuple(int(audit.loc[name, c]) for c in ("duplicate groups", "groups across classes"))
        assert found == groups, f"audit of {name}: {found} duplicate groups (all, across classes), prose says {groups}"


def _check_zero_shot(out: Path) -> None:
    """Chapter 02: with one template the simulated gap moves no zero-shot prediction (the chapter derives it), and
    the simulated gap is measured at the requested norm."""
    _check_csvs(out, ("results.csv",))
    sweep = pd.read_csv(out / "sim_gap_sweep.csv")
    one = sweep[sweep["templates"] == 1]
    assert len(one) >= 2 and (one["same prediction"] == 1.0).all(), one
    assert (sweep["same prediction"] > 0.9).all() and sweep["accuracy"].between(0, 1).all()
    simulated = json.loads((out / "gap.json").read_text())["simulated"]
    assert simulated["encoder"].startswith("SIMULATED")
    assert abs(simulated["gap_norm"] - simulated["requested_gap"]) < 1e-3


# Per notebook: extra (small) parameters, the files OUTPUT_DIR must hold, a check on their contents, and how many
# figures (image/png outputs) the executed notebook must contain at least. Entries 01-06 were written from the
# notebooks' source (files each notebook writes unconditionally).
EXPECTATIONS: dict[str, dict[str, Any]] = {
    "01_knowledge_base.ipynb": {
        "parameters": {"AUDIT_NEAR_BITS": None},  # exact duplicates only: the perceptual hashes double the audit
        "files": ["kb_counts.csv", "validation.csv", "token_lengths.csv", "published_import.csv",
                  "published_comparison.csv", "description_similarity.csv", "generation.json", "audit.csv",
                  "audit.json"],
        "check": _check_knowledge_base,
        "min_figures": 3,
    },
    "02_zero_shot_and_modality_gap.ipynb": {
        "parameters": {"MAP_METHOD": "pca", "SIM_N_IMAGES": 200},
        "files": ["sim_zero_shot_templates.csv", "sim_gap_sweep.csv", "zero_shot_templates.csv", "results.csv",
                  "gap.json"],
        "check": _check_zero_shot,
        "min_figures": 5,
    },
    "03_text_proxies.ipynb": {
        "parameters": {"KS": [2, 8], "SIM_N_IMAGES": 200},
        "files": ["sim_score_vs_truth.csv", "sim_retrieval_precision.csv", "results.csv", "sim_k_sweep.csv",
                  "retrieval_agreement.csv", "description_ranking.csv"],
        "check": lambda out: _check_csvs(out, ("results.csv", "sim_k_sweep.csv")),
        "min_figures": 4,  # simulator figures; the real-image section's sit inside its collapsed HTML block
    },
    "04_proxy_learning.ipynb": {
        "parameters": {"MAP_METHOD": "pca", "SIM_IMAGES": 200},
        "files": ["results.csv", "real_results.csv", "run.json"],
        "check": lambda out: _check_csvs(out, ("results.csv", "real_results.csv")),
        "min_figures": 9,
    },
    "05_benchmark.ipynb": {
        "parameters": {"DATASETS": ["tb_cxr_nitrd_da", "malaria_cells"], "N_BOOTSTRAP": 50, "SIM_IMAGES": 400},
        "files": ["datasets.csv", "sim_results.csv", "sim_paired.csv", "results.csv", "reported_by_authors.csv",
                  "run.json"],
        "check": lambda out: _check_csvs(out, ("results.csv", "sim_results.csv")),
        "min_figures": 2,
    },
    "06_playground.ipynb": {
        "parameters": {"N_IMAGES": 200, "DIM": 64},
        "files": ["knob_grid.csv", "run.json"],
        "check": lambda out: _check_csvs(out, ("knob_grid.csv",)),
        "min_figures": 7,  # the default run and one static panel per knob (six)
    },
    "07_balancing_study.ipynb": {
        "parameters": {"N_IMAGES": 200, "SEEDS": [0], "IMBALANCES": [1.0, 10.0]},
        "files": ["balancing_study.csv", "transport_moves.csv", "transport_ablation.csv", "run.json"],
        "check": _check_balancing_study,
        "min_figures": 5,
    },
}


def _cells(nb_path: Path) -> list:
    return nbformat.read(nb_path, as_version=4).cells


def _parameters_cell(cells: list) -> list:
    return [c for c in cells if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]


def _ids(nb_path: Path) -> str:
    return nb_path.name


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(nb_path):
    for i, cell in enumerate(_cells(nb_path)):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{nb_path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{nb_path.name} cell {i} has an execution count: clear it"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_ids)
def test_skeleton(nb_path):
    cells = _cells(nb_path)
    headings = [
        m.group(2).strip()
        for c in cells if c.cell_type == "markdown"
        for m in re.finditer(r"^(#{1,3})\s+(.+)$", c.source, flags=re.M)
    ]
    first = cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), \
        f"{nb_path.name} must start with a markdown cell holding its '# Title'"
    for required in REQUIRED_HEADINGS:
        assert any(h.lower().startswith(required.lower()) for h in headings), \
            f"{nb_path.name} lacks a '{required}' heading (skeleton: {', '.join(REQUIRED_HEADINGS)})"
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert "%matplotlib inline" in code, f"{nb_path.name} must run '%matplotlib inline' (MPLBACKEND=Agg drops figures)"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_ids)
def test_parameters_cell(nb_path):
    tagged = _parameters_cell(_cells(nb_path))
    assert len(tagged) == 1, f"{nb_path.name} needs exactly one code cell tagged 'parameters', found {len(tagged)}"
    names = {
        t.id for node in ast.parse(tagged[0].source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)
    }
    missing = [p for p in REQUIRED_PARAMETERS if p not in names]
    assert not missing, f"{nb_path.name}: the parameters cell must assign {missing}"
    assert "DATASET" in names or "DATASETS" in names, f"{nb_path.name}: the parameters cell must assign DATASET(S)"
    extra = EXPECTATIONS.get(nb_path.name, {}).get("parameters", {})
    unknown = [p for p in extra if p not in names]
    assert not unknown, f"EXPECTATIONS passes {unknown} but {nb_path.name}'s parameters cell does not define them"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_ids)
def test_cell_tags_are_known(nb_path):
    for i, cell in enumerate(_cells(nb_path)):
        unknown = set(cell.get("metadata", {}).get("tags", [])) - KNOWN_TAGS
        assert not unknown, f"{nb_path.name} cell {i + 1}: unknown tag(s) {sorted(unknown)}: use {sorted(KNOWN_TAGS)}"


def _ruff_format_check(folder: Path) -> subprocess.CompletedProcess:
    assert RUFF, "ruff is not installed: make venv (requirements.txt pins it)"
    return subprocess.run(
        [RUFF, "format", "--check", "--line-length", str(LINE_LENGTH), "--output-format", "concise", str(folder)],
        capture_output=True, text=True, cwd=REPO,
    )


def test_notebook_code_is_ruff_formatted():
    proc = _ruff_format_check(NOTEBOOK_DIR)
    assert proc.returncode == 0, f"notebook code is not ruff-formatted: run `make format`\n{proc.stdout}{proc.stderr}"


def test_ruff_format_check_reads_notebooks(tmp_path):
    """The check above can fail: a notebook with a badly formatted cell is reported, and `ruff format` fixes it."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("%matplotlib inline\nx=[1,2 ,3]")]
    nbformat.write(nb, tmp_path / "bad.ipynb")
    proc = _ruff_format_check(tmp_path)
    assert proc.returncode == 1 and "bad.ipynb" in proc.stdout, proc.stdout + proc.stderr
    subprocess.run([RUFF, "format", "--line-length", str(LINE_LENGTH), str(tmp_path)], check=True, capture_output=True)
    assert _ruff_format_check(tmp_path).returncode == 0
    assert nbformat.read(tmp_path / "bad.ipynb", as_version=4).cells[1].source == "%matplotlib inline\nx = [1, 2, 3]"


_needs_duplicates = pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` command is absent")


@_needs_duplicates
def test_no_code_repeated_across_notebooks_kplib_and_benchmarks():
    result = repeated_code.find_repeated_code(REPO)
    assert result.ok, ("`duplicates` finds repeated code (rows name notebook scripts; `make duplicates` writes them "
                       f"to _build/scripts/notebooks):\n{result.report}")


@_needs_duplicates
def test_repeated_code_check_catches_a_repeated_prelude(tmp_path):
    prelude = "\n".join(f"value_{i} = compute_{i}(OUTPUT_DIR, seed={i})" for i in range(8))
    (tmp_path / "notebooks").mkdir()
    for name in ("a", "b"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), nbformat.v4.new_code_cell(prelude)]
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    (tmp_path / "kplib").mkdir()
    (tmp_path / "kplib" / "mod.py").write_text("def f(x):\n    return x + 1\n")
    result = repeated_code.find_repeated_code(tmp_path)
    assert not result.ok and "notebooks/a.py" in result.report and "notebooks/b.py" in result.report, result.report
    (tmp_path / "notebooks" / "b.ipynb").unlink()
    assert repeated_code.find_repeated_code(tmp_path).ok


def test_every_notebook_has_expectations():
    missing = [p.name for p in NOTEBOOKS if p.name not in EXPECTATIONS]
    assert not missing, f"add an EXPECTATIONS entry in tests/test_notebooks.py for {missing}"


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.slow
@pytest.mark.book
@pytest.mark.parametrize("nb_path", [p for p in NOTEBOOKS if p.name in EXPECTATIONS], ids=_ids)
def test_notebook_runs_under_papermill(nb_path, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("MPLBACKEND", "Agg")   # the notebook itself must switch to the inline backend
    expect = EXPECTATIONS[nb_path.name]
    out_dir = tmp_path / "out"
    params = {**COMMON_PARAMETERS, **expect.get("parameters", {}), "OUTPUT_DIR": str(out_dir)}
    executed = tmp_path / nb_path.name
    pm.execute_notebook(
        str(nb_path), str(executed), parameters=params, cwd=str(NOTEBOOK_DIR), kernel_name="python3",
        progress_bar=False, execution_timeout=600,
    )
    nb = nbformat.read(executed, as_version=4)
    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{nb_path.name} raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"{nb_path.name} wrote to stderr (the browser check fails on it): {stderr[0][:500]!r}"
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= expect.get("min_figures", 1), f"{nb_path.name} produced {figures} figures"
    for name in expect.get("files", []):
        assert (out_dir / name).is_file(), f"{nb_path.name} did not write {name} into OUTPUT_DIR"
    check: Callable[[Path], None] | None = expect.get("check")
    if check is not None:
        check(out_dir)
