"""Vendor APIs stay inside contentv_torch_npu/device.py, and the package imports without jax or torch_npu."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from contentv_torch_npu import device

ROOT = Path(__file__).resolve().parents[2]
BANNED = {
    "torch.cuda": re.compile(r"torch\.cuda\b"),
    "nccl string": re.compile(r"""["']nccl["']"""),
    "import torch_npu": re.compile(r"^\s*(import torch_npu|from torch_npu)", re.M),
    "transfer_to_npu": re.compile(r"transfer_to_npu"),
}


def _library_files() -> list[Path]:
    files = sorted((ROOT / "contentv_torch_npu").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    return [f for f in files if f != ROOT / "contentv_torch_npu" / "device.py"]


def test_no_vendor_api_outside_device_module():
    offenders = [
        f"{f.relative_to(ROOT)}: {what}"
        for f in _library_files()
        for what, rx in BANNED.items()
        if rx.search(f.read_text())
    ]
    assert len(_library_files()) >= 4 and offenders == []


def test_device_module_never_uses_transfer_to_npu():
    assert "transfer_to_npu" not in (ROOT / "contentv_torch_npu" / "device.py").read_text()


def test_the_grep_catches_violations():
    sample = 'x = torch.cuda.is_available()\ndist.init_process_group("nccl")\nimport torch_npu\n'
    assert [what for what, rx in BANNED.items() if rx.search(sample)] == [
        "torch.cuda",
        "nccl string",
        "import torch_npu",
    ]


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import contentv_torch_npu, contentv_torch_npu.train, contentv_torch_npu.distributed
from contentv_torch_npu import device
assert device.resolve_device("auto").type == "cpu"
assert not device.npu_available()
try:
    device.resolve_device("npu")
except RuntimeError as e:
    assert "torch_npu is not importable" in str(e)
else:
    raise AssertionError("npu without torch_npu must fail")
assert not any(m.split(".")[0] in {blocked!r} for m in sys.modules)
print("ok")
"""


@pytest.mark.parametrize("blocked", [["jax", "flax", "optax", "orbax"], ["torch_npu"]])
def test_import_without(blocked):
    code = _BLOCKER.replace("{blocked!r}", repr(set(blocked)))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_device_choice(fake_npu):
    assert device.resolve_device("auto") == torch.device("cpu")  # fake reports no NPU
    assert device.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="tpu"):
        device.resolve_device("tpu")
    assert [device.dist_backend(torch.device(t)) for t in ("cpu", "cuda")] == ["gloo", "nccl"]
    assert device.dist_backend(types.SimpleNamespace(type="npu")) == "hccl"
    assert device.accelerator(torch.device("cpu")) is None and device.local_device(torch.device("cpu"), 1).type == "cpu"


def test_auto_prefers_npu_when_available(monkeypatch):
    monkeypatch.setattr(device, "npu_available", lambda: True)
    monkeypatch.setattr(torch, "device", lambda name: ("device", name))
    assert device.resolve_device("auto") == ("device", "npu")
