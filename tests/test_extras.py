"""Optional dependencies stay optional: with torch, transformers and matplotlib made unimportable, the library,
train.py and sample.py import and start; the tools that need an extra answer with one line naming it."""

import pathlib
import subprocess
import sys

import pytest

from dsv3_jax.errors import MissingExtra, require

REPO = pathlib.Path(__file__).resolve().parent.parent

# Runs first in the child: any import of the blocked packages fails as if they were not installed.
BLOCK = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Absent())
"""


def _without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_library_and_entry_points_import_without_the_extras():
    r = _without_extras("""
import runpy
import dsv3_jax.train.loop, dsv3_jax.infer.sampling, dsv3_jax.interop.hf, dsv3_jax.tools.eval, dsv3_jax.tools.plan
for script in ("train.py", "sample.py"):
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, (script, e.code)
assert not any(m.split(".")[0] in ("torch", "transformers", "matplotlib") for m in sys.modules)
print("ok")
""")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("module,argv,extra", [
    ("dsv3_jax.tools.plot", ["runs/a", "--out", "plots"], "plot"),
    ("dsv3_jax.tools.bench_decode", ["--quick"], "bench"),
    ("dsv3_jax.tools.experiments", ["mtp", "--out", "/nonexistent/exp"], "plot"),
])
def test_a_tool_without_its_extra_says_so_in_one_line(module, argv, extra):
    """(tools.bench runs without torch, skipping its torch columns: tests/test_bench.py)"""
    r = _without_extras(f"import runpy; sys.argv = ['{module}', *{argv!r}]; "
                        f"runpy.run_module('{module}', run_name='__main__', alter_sys=True)")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and f"dsv3_jax[{extra}]" in lines[0]


def test_plotting_without_matplotlib_names_the_extra():
    """The module imports (matplotlib loads when a plot is drawn, so Ctrl-C at start-up is one line); drawing
    raises MissingExtra naming the extra."""
    r = _without_extras("""
import dsv3_jax.tools.plot as plot
try:
    plot.plot_runs(["runs/a"], "plots")
except ImportError as e:
    print(type(e).__name__, e)
""")
    assert r.stdout.startswith("MissingExtra matplotlib is not installed") and "dsv3_jax[plot]" in r.stdout, r.stderr


def test_require_returns_the_module_when_present_and_names_the_extra_when_absent():
    assert require("json", "test").dumps([1]) == "[1]"
    with pytest.raises(MissingExtra, match=r"no_such_module_xyz is not installed.*dsv3_jax\[bench\]") as e:
        require("no_such_module_xyz", "bench")
    assert "\n" not in str(e.value)
