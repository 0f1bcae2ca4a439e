"""Each package imports without the other framework: contentv_common needs neither, contentv_jax no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import contentv_jax

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
    result = _run("contentv_jax", {"torch", "torch_npu"})
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
