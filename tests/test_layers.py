"""The package's layering (docs/architecture.md): the import-linter contract in pyproject.toml holds, it catches an
upward import, and no module takes part in an import cycle (function-level imports included)."""

import os
import pathlib
import shutil
import subprocess
import sys

import grimp
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)


def test_the_layers_contract_is_kept():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module,upward", [
    ("kernels/precision.py", "from dsv3_jax.train import loop"),  # two layers up
    ("model/routing.py", "from dsv3_jax.presets import load_config"),  # one layer up
    ("data/sources.py", "from dsv3_jax.parallel import sharding"),  # a sibling in the same layer
])
def test_a_planted_upward_import_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(REPO / "dsv3_jax", tmp_path / "dsv3_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "dsv3_jax" / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {upward}\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "0 kept, 1 broken" in r.stdout, r.stdout[-3000:]
    assert "dsv3_jax." + module[:-3].replace("/", ".") in r.stdout


def _cycles(graph) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while True:
                n = stack.pop()
                on.discard(n)
                group.append(n)
                if n == m:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("dsv3_jax", cache_dir=None)
    assert _cycles(graph) == []
    graph.add_import(importer="dsv3_jax.kernels.precision", imported="dsv3_jax.model.routing")  # plant one
    graph.add_import(importer="dsv3_jax.model.routing", imported="dsv3_jax.kernels.precision")
    assert ["dsv3_jax.kernels.precision", "dsv3_jax.model.routing"] in _cycles(graph)
