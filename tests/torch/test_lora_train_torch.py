"""LoRA training in the torch twin: only the adapters train (from the `init_from` base), the checkpoints hold their
AdamW moments and EMA alone, the adapter file follows each checkpoint, a resumed run continues exactly, and 2 gloo
processes under FSDP2 (adapters sharded with their base) follow one."""

import numpy as np
import pytest
import torch

from contentv_common.config.model import named_model_config
from contentv_common.lora.adapters import load_adapters
from contentv_common.lora.training import adapter_file
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu.loading import save_torch
from contentv_torch_npu.train import run
from contentv_torch_npu.transformer import Transformer
from tests.torch.test_train_torch import _losses, _recipe, _worker
from tools.launch_local import free_port

LORA = {"lora.rank": 4, "lora.alpha": 8.0}


def test_lora_run_trains_adapters_only_and_resumes_exactly(tiny_dataset, tmp_path, rel_err):
    torch.manual_seed(1)
    base_model = Transformer(named_model_config("tiny"))
    save_torch(tmp_path / "base", base_model)
    base = {k: v.numpy() for k, v in base_model.state_dict().items()}
    opts = {**LORA, "init_from": str(tmp_path / "base")}
    straight = tmp_path / "straight"
    run(_recipe(tiny_dataset, straight, steps=4, **opts), device="cpu", progress=False)
    interrupted = tmp_path / "interrupted"
    run(_recipe(tiny_dataset, interrupted, steps=2, **opts), device="cpu", progress=False)
    at_2, _, _ = load_adapters(adapter_file(interrupted / "ckpt"))
    run(_recipe(tiny_dataset, interrupted, steps=4, **opts), device="cpu", progress=False)
    assert _losses(interrupted) == _losses(straight)
    a = ckpt.load_state(straight / "ckpt" / "step_00000004")
    b = ckpt.load_state(interrupted / "ckpt" / "step_00000004")
    lora_names = sorted(n for n in a.params if ".lora_" in n)
    assert len(lora_names) == 42
    for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
        x, y = getattr(a, field), getattr(b, field)
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), field
    assert sorted(a.exp_avg) == sorted(a.ema) == lora_names  # optimizer state and EMA: the adapters only
    assert all(np.array_equal(a.params[k], base[k]) for k in base)  # the base is the init_from one, untouched
    adapters, rank, alpha = load_adapters(adapter_file(straight / "ckpt"))
    assert (rank, alpha) == (4, 8.0) and sorted(adapters) == lora_names
    assert all(np.array_equal(adapters[k], a.ema[k]) for k in lora_names)  # the EMA, as the export takes it
    assert any(not np.array_equal(adapters[k], at_2[k]) for k in lora_names)  # rewritten at each checkpoint
    assert rel_err(a.params["blocks.0.ff.fc1.lora_B.weight"], np.zeros(1)) > 0  # B moved from zero


@pytest.mark.slow
def test_lora_fsdp2_follows_one_process(tiny_dataset, tmp_path, rel_err, spawn_ranks):
    single = tmp_path / "single"
    run(_recipe(tiny_dataset, single, steps=3, **LORA), device="cpu", progress=False)
    multi = tmp_path / "multi"
    spawn_ranks(_worker, (2, free_port(), tiny_dataset, multi, {"steps": 3, "mesh.fsdp": 2, **LORA}), 2, outputs=multi)
    assert rel_err(_losses(multi), _losses(single)) < 1e-5
    a = ckpt.load_state(single / "ckpt" / "step_00000003")
    b = ckpt.load_state(multi / "ckpt" / "step_00000003")  # sharded: each rank wrote its slices
    assert sorted(b.exp_avg) == sorted(a.exp_avg) == sorted(n for n in a.params if ".lora_" in n)
    for k in a.params:
        assert rel_err(b.params[k], a.params[k]) < 1e-4, k
    x, _, _ = load_adapters(single / "ckpt" / "lora.safetensors")
    y, _, _ = load_adapters(multi / "ckpt" / "lora.safetensors")
    assert sorted(x) == sorted(y) and all(rel_err(y[k], x[k]) < 1e-4 for k in x)


def test_bf16_base_with_fp32_adapters():
    """The frozen base may be stored in bf16 (with bf16 compute) while the adapters and their gradients stay fp32."""
    import pytest

    from contentv_common.config.recipe import LoraConfig
    from contentv_common.errors import ConfigError
    from contentv_torch_npu.lora import add_adapters

    torch.manual_seed(0)
    model = Transformer(named_model_config("tiny"), compute_dtype=torch.bfloat16, ops="torch")
    add_adapters(model, LoraConfig(rank=4, base_dtype="bfloat16"), seed=0)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    rng = np.random.default_rng(0)
    out = model(
        torch.from_numpy(rng.standard_normal((1, 16, 1, 8, 8), dtype=np.float32)),
        torch.tensor([500.0]),
        torch.from_numpy(rng.standard_normal((1, 333, 48), dtype=np.float32)),
        torch.from_numpy(rng.standard_normal((1, 24), dtype=np.float32)),
    )
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n and g.dtype == torch.float32 for n, g in grads.items())
    with pytest.raises(ConfigError, match="lora.base_dtype: bfloat16 needs compute_dtype: bfloat16"):
        add_adapters(Transformer(named_model_config("tiny")), LoraConfig(base_dtype="bfloat16"), seed=0)


def test_a_bf16_base_is_read_in_bf16(tmp_path, monkeypatch):
    """One process reads a LoRA recipe's `init_from` straight in the base dtype (an 8B base is never whole in fp32
    on the device): the loader is asked for bf16, and the base equals the fp32 checkpoint rounded to bf16."""
    from contentv_common.config.recipe import load_recipe
    from contentv_torch_npu import train
    from contentv_torch_npu.distributed import Topology

    torch.manual_seed(1)
    base_model = Transformer(named_model_config("tiny"))
    save_torch(tmp_path / "base", base_model)
    asked = []

    def spy(path, dtype, *args, **kwargs):
        asked.append(dtype)
        return load_transformer(path, dtype, *args, **kwargs)

    load_transformer = train.load_transformer
    monkeypatch.setattr(train, "load_transformer", spy)
    opts = {**LORA, "lora.base_dtype": "bfloat16", "compute_dtype": "bfloat16", "init_from": str(tmp_path / "base")}
    model = train.build_model(load_recipe("tests/recipes/tiny.yaml", opts), Topology())
    assert asked == [torch.bfloat16]
    params = dict(model.named_parameters())
    for name, p in base_model.named_parameters():
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], p.detach().bfloat16()), name
