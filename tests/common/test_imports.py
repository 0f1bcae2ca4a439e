"""Each package imports without the other framework: contentv_common needs neither, contentv_jax no torch."""

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import contentv_jax
from contentv_common.backend import BACKENDS, Backend, get

ROOT = Path(__file__).resolve().parents[2]

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ImportError(f"blocked {{name}}")
sys.meta_path.insert(0, Block())
import {module}
assert not any(m.split(".")[0] in {blocked} for m in sys.modules), sorted(sys.modules)
print("ok")
"""


def _run(module: str, blocked: set[str]) -> subprocess.CompletedProcess:
    code = BLOCK.format(module=module, blocked=sorted(blocked))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_common_needs_neither_framework():
    for module in (
        "contentv_common.config.model",
        "contentv_common.checkpoint.param_table",
        "contentv_common.checkpoint.formats",
        "contentv_common.checkpoint.convert",
        "contentv_common.training.schedules",
        "contentv_common.text.sd3_prompt, contentv_common.tiny_models",
    ):
        result = _run(module, {"jax", "torch", "flax"})
        assert result.returncode == 0 and "ok" in result.stdout, (module, result.stderr[-2000:])


def test_jax_package_without_torch():
    result = _run("contentv_jax, contentv_jax.backend", {"torch", "torch_npu"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_jax_package_never_imports_the_torch_twin():
    """Not even lazily: training's cache, sampling and reward runs use contentv_jax's own encoders."""
    root = Path(contentv_jax.__file__).parent
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n.split(".")[0] == "contentv_torch_npu" for n in names), (file, names)


def test_blocker_really_blocks():
    result = _run("contentv_torch_npu", {"torch"})
    assert result.returncode != 0 and "blocked torch" in result.stderr


def test_clis_and_backend_interface_need_neither_framework():
    """Parsing a CLI's flags imports no framework: jax or torch comes in through `contentv_common.backend.get`."""
    clis = ", ".join(f"contentv_common.cli.{name}" for name in ENTRY_POINTS)
    for module in (clis, "contentv_common.backend, contentv_common.data.prepare, contentv_common.training.demo"):
        result = _run(module, {"jax", "torch", "flax"})
        assert result.returncode == 0 and "ok" in result.stdout, (module, result.stderr[-2000:])


ENTRY_POINTS = ("train", "sample", "convert", "plan", "parity", "bench", "eval", "prepare_data")


def test_entry_points_are_declared_and_importable():
    """pyproject.toml's `contentv-*` scripts name each CLI's `entry`; `python tools/<name>.py` runs the same one."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n\n")[0]
    scripts = dict(line.replace('"', "").split(" = ") for line in section.splitlines())
    assert scripts == {
        f"contentv-{name.replace('_', '-')}": f"contentv_common.cli.{name}:entry" for name in ENTRY_POINTS
    }
    for name in ENTRY_POINTS:
        module = importlib.import_module(f"contentv_common.cli.{name}")
        assert callable(module.entry) and callable(module.main)
        assert f"from contentv_common.cli.{name} import entry" in (ROOT / "tools" / f"{name}.py").read_text()


def test_tools_use_no_sys_path_tricks():
    """The packages are installed (editable) or on PYTHONPATH: no script in tools/ edits sys.path."""
    offenders = [p.name for p in (ROOT / "tools").glob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_both_backends_implement_the_interface():
    """Every method of the Protocol exists, with the same parameters, in each backend."""
    for name in BACKENDS:
        impl = get(name)
        assert impl.name == name
        methods = [m for m in vars(Backend) if not m.startswith("_") and callable(getattr(Backend, m))]
        assert len(methods) >= 10
        for method in methods:
            wanted = list(inspect.signature(getattr(Backend, method)).parameters)
            assert list(inspect.signature(getattr(type(impl), method)).parameters) == wanted, (name, method)
