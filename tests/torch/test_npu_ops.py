"""Every NPU op wrapper runs against the fake torch_npu: layout, explicit scale, mask polarity, keep_prob, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from contentv_common.config.model import named_model_config
from contentv_torch_npu.ops import OPS, NpuOps, TorchOps, ops_for
from contentv_torch_npu.transformer import Transformer


def _qkv(b=2, h=3, n=5, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def test_attention_matches_sdpa_with_explicit_scale(fake_npu, rel_err):
    q, k, v = _qkv(d=16)
    out = NpuOps().attention(q, k, v)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-6
    ((name, args),) = fake_npu.calls
    assert name == "npu_fusion_attention" and args["input_layout"] == "BNSD"
    assert args["head_num"] == 3 and args["shape"] == (2, 3, 5, 16)
    assert args["scale"] == pytest.approx(1 / math.sqrt(16))  # the kernel's default is 1.0
    assert args["keep_prob"] == 1.0 and args["atten_mask"] is None and args["pse"] is None


def test_attention_mask_polarity_and_query_axis(fake_npu, rel_err):
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)  # SDPA convention, key-padding shape: True = attend
    keep[0, ..., 3:] = False
    keep[1, ..., :1] = False
    out = NpuOps().attention(q, k, v, mask=keep)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep)) < 1e-6
    mask = fake_npu.calls[0][1]["atten_mask"]
    assert mask.shape == (2, 1, 5, 5)  # materialised over queries
    assert bool(mask[0, 0, 2, 3]) and not bool(mask[0, 0, 2, 0])  # True = masked out
    assert not bool(mask[1, 0, 4, 3]) and bool(mask[1, 0, 4, 0])


def test_attention_keep_prob_is_one_minus_dropout(fake_npu):
    q, k, v = _qkv()
    NpuOps().attention(q, k, v, dropout=0.25)
    assert fake_npu.calls[0][1]["keep_prob"] == pytest.approx(0.75)


def test_attention_keeps_bf16(fake_npu):
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = NpuOps().attention(q, k, v)
    assert out.dtype == torch.bfloat16 and fake_npu.calls[0][1]["dtype"] == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_casts_gamma_to_x_dtype(fake_npu, rel_err, dtype):
    x = torch.randn(4, 6, 16).to(dtype)
    weight = torch.rand(16) + 0.5  # fp32 master weight
    out = NpuOps().rms_norm(x, weight, 1e-6)
    ref = TorchOps().rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and rel_err(out.float(), ref.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    ((name, args),) = fake_npu.calls
    assert name == "npu_rms_norm" and args["gamma_dtype"] == dtype and args["epsilon"] == 1e-6


def test_gelu_is_tanh(fake_npu):
    x = torch.linspace(-4, 4, 101)
    out = NpuOps().gelu_tanh(x)
    assert torch.allclose(out, F.gelu(x, approximate="tanh"), atol=0, rtol=0)
    assert not torch.allclose(out, F.gelu(x), atol=1e-6)  # the exact-erf form differs
    assert fake_npu.calls == [("npu_gelu", {"approximate": "tanh", "dtype": torch.float32})]


def test_ops_registry_choice():
    assert ops_for("auto", "npu") is OPS["npu"] and ops_for("auto", "cpu") is OPS["torch"]
    assert ops_for("auto", "cuda") is OPS["torch"] and ops_for("npu", "cpu") is OPS["npu"]
    custom = TorchOps(name="custom")
    assert ops_for(custom, "cpu") is custom
    with pytest.raises(ValueError, match="flash"):
        ops_for("flash", "cpu")


def _tiny_pair(dtype=torch.float32):
    cfg = named_model_config("tiny")
    torch.manual_seed(0)
    ref = Transformer(cfg, ops="torch").to(dtype)
    npu = Transformer(cfg, ops="npu").to(dtype)
    npu.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(2, 16, 2, 8, 8, generator=g).to(dtype),
        torch.tensor([10.0, 900.0]),
        torch.randn(2, 7, 48, generator=g).to(dtype),
        torch.randn(2, 24, generator=g).to(dtype),
    )
    return ref, npu, inputs


def test_transformer_forward_and_grad_npu_ops_match_torch_ops(fake_npu, rel_err):
    ref, npu, inputs = _tiny_pair()
    out_ref, out_npu = ref(*inputs), npu(*inputs)
    assert rel_err(out_npu.detach(), out_ref.detach()) < 1e-6
    out_ref.square().mean().backward()
    out_npu.square().mean().backward()
    for (name, p_ref), p_npu in zip(ref.named_parameters(), npu.parameters(), strict=True):
        assert rel_err(p_npu.grad, p_ref.grad) < 1e-5, name
    counts = {n: fake_npu.names().count(n) for n in ("npu_fusion_attention", "npu_rms_norm", "npu_gelu")}
    # 2 blocks: one attention each; q, k, added q, added k norms; ff (+ ff_context in the first block only)
    assert counts == {"npu_fusion_attention": 2, "npu_rms_norm": 8, "npu_gelu": 3}


def test_transformer_bf16_npu_ops(fake_npu, rel_err):
    ref, npu, inputs = _tiny_pair(torch.bfloat16)
    with torch.no_grad():
        out_ref, out_npu = ref(*inputs), npu(*inputs)
    assert out_npu.dtype == torch.bfloat16 and rel_err(out_npu.float(), out_ref.float()) < 2e-2
    assert all(a["gamma_dtype"] == torch.bfloat16 for n, a in fake_npu.calls if n == "npu_rms_norm")
    assert all(a["dtype"] == torch.bfloat16 for n, a in fake_npu.calls if n == "npu_fusion_attention")


def test_attention_window_and_precision_cover_stage5_length(fake_npu):
    """At 111,933 tokens (stage 5, 720p x 121 frames) the window covers every query and key; meta tensors carry the
    call, so nothing of that size is computed."""
    n = 111_933
    q, k, v = (torch.empty(1, 2, n, 16, device="meta") for _ in range(3))
    out = NpuOps().attention(q, k, v)
    assert out.shape == (1, 2, n, 16)
    args = fake_npu.calls[0][1]
    assert args["pre_tockens"] >= n - 1 and args["next_tockens"] >= n - 1  # 65536 would band the sequence
    assert args["inner_precise"] == 0 and args["sync"] is False and args["sparse_mode"] == 0


def test_fake_kernel_bands_a_short_window(fake_npu, rel_err):
    """The fake computes what the kernel does with a window: a band shorter than the sequence changes the result
    (so the wide window of NpuOps is what makes it equal to full attention), and inner_precise 1 loses precision."""
    q, k, v = _qkv(n=16)
    full = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(NpuOps().attention(q, k, v), full) < 1e-6
    call = dict(head_num=3, input_layout="BNSD", scale=1 / math.sqrt(8))
    banded = fake_npu.npu_fusion_attention(q, k, v, pre_tockens=4, next_tockens=4, **call)[0]
    assert rel_err(banded, full) > 1e-2
    i, j = torch.arange(16)[:, None], torch.arange(16)[None]
    band = (j - i).abs() <= 4
    assert rel_err(banded, F.scaled_dot_product_attention(q, k, v, attn_mask=band)) < 1e-6
    fast = fake_npu.npu_fusion_attention(q, k, v, inner_precise=1, **call)[0]
    assert 1e-6 < rel_err(fast, full) < 1e-2


def test_library_constructors_default_to_the_devices_fused_kernel(fake_npu, monkeypatch, tmp_path):
    """`Transformer(...)` and `load_transformer(...)` default to ops "auto", picked by the input's device at call
    time: on an NPU the forward runs npu_fusion_attention (the device type is faked here: no NPU), elsewhere SDPA
    (flash / memory-efficient kernels on CUDA)."""
    from contentv_torch_npu import transformer
    from contentv_torch_npu.loading import load_transformer, save_torch

    _, _, inputs = _tiny_pair()
    save_torch(tmp_path, Transformer(named_model_config("tiny")))
    model = load_transformer(tmp_path)
    assert Transformer(named_model_config("tiny")).ops == "auto" and model.ops == "auto"
    model(*inputs)
    assert fake_npu.calls == []  # a CPU input: SDPA
    monkeypatch.setattr(transformer, "ops_for", lambda choice, device_type: ops_for(choice, "npu"))
    model(*inputs)
    assert fake_npu.names().count("npu_fusion_attention") == 2  # one per block
