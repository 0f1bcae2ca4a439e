"""`tools/sample.py --backend torch --mesh ...` under torchrun: 4 gloo ranks sample the narrow model (38 heads, 333
text tokens) with the cond/uncond rows on two rank groups or the prompts over two data groups, image tokens over
Ulysses sequence pairs, and get the final latents of one process. Training's in-loop clip runs the same sampler over
the training ranks (FSDP x Ulysses) and gets one process's clip."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from contentv_common.checkpoint.formats import write_torch
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import MeshConfig
from contentv_common.sample_mesh import SampleMesh
from contentv_common.tiny_models import random_weights
from contentv_torch_npu.backend import BACKEND
from contentv_torch_npu.distributed import Topology, enable_sequence_parallel, init_distributed, shard_model
from contentv_torch_npu.loading import load_transformer
from contentv_torch_npu.sampling import load_sampling_transformer, sample
from contentv_torch_npu.train import clip_latents
from tests.narrow_model import NARROW, POOLED, TEXT, WIDTH
from tools.launch_local import free_port

MESHES = {"cfg2_sp2": SampleMesh(sequence=2, cfg=2), "data2_sp2": SampleMesh(data=2, sequence=2)}


def _inputs() -> dict[str, np.ndarray]:
    """2 prompts; 2 latent frames x 3 x 3 patches = 18 image tokens."""
    rng = np.random.default_rng(0)
    return {
        "noise": rng.standard_normal((2, 16, 2, 6, 6), dtype=np.float32),
        "text": rng.standard_normal((2, TEXT, WIDTH), dtype=np.float32),
        "pooled": rng.standard_normal((2, POOLED), dtype=np.float32),
        "neg_text": rng.standard_normal((2, TEXT, WIDTH), dtype=np.float32),
        "neg_pooled": rng.standard_normal((2, POOLED), dtype=np.float32),
    }


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, mesh in MESHES.items():
        groups = BACKEND.join_sampling("cpu", mesh)
        assert groups.together and groups.owners == {"cfg2_sp2": (0,), "data2_sp2": (0, 2)}[name]
        model = load_sampling_transformer(f"{folder}/transformer", torch.float32, "cpu", mesh)
        latents = sample(model, **_inputs(), steps=2, guidance=6.0, progress=False, mesh=mesh)
        if rank == 0:
            np.save(f"{folder}/{name}.npy", latents)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_4_ranks_give_the_latents_of_one_process(tmp_path, rel_err, spawn_ranks):
    cfg = ModelConfig(**NARROW)
    write_torch(tmp_path / "transformer", cfg, iter(random_weights(BACKEND.transformer_shapes(cfg), 3).items()))
    spawn_ranks(_worker, (4, free_port(), str(tmp_path)), 4)
    model = load_transformer(tmp_path / "transformer").eval()
    one = sample(model, **_inputs(), steps=2, guidance=6.0, progress=False, mesh=SampleMesh())
    assert rel_err(one, _inputs()["noise"]) > 0.1, "the steps changed the latents"
    for name in MESHES:
        got = np.load(tmp_path / f"{name}.npy")
        assert rel_err(got, one) < 1e-5, (name, rel_err(got, one))


def _clip_inputs(copies: int) -> dict[str, np.ndarray]:
    """One prompt's in-loop clip inputs (contentv_common.training.evaluation.eval_clip_inputs), `copies` rows each."""
    return {k: np.repeat(v[:1], copies, axis=0) for k, v in _inputs().items()}


def _clip_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    topo = init_distributed("cpu", MeshConfig(data=2, sequence=2))  # as training: two data groups, Ulysses pairs
    model = shard_model(load_transformer(f"{folder}/transformer"), topo.shard_mesh)
    enable_sequence_parallel(model, topo.sp_group, "cpu")
    latents = clip_latents(model, _clip_inputs(topo.dp), topo)
    if rank == 0:
        np.save(f"{folder}/clip.npy", latents)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_the_in_loop_clip_over_training_ranks_is_one_process_clip(tmp_path, rel_err, spawn_ranks):
    cfg = ModelConfig(**NARROW)
    write_torch(tmp_path / "transformer", cfg, iter(random_weights(BACKEND.transformer_shapes(cfg), 5).items()))
    spawn_ranks(_clip_worker, (4, free_port(), str(tmp_path)), 4)
    one = clip_latents(load_transformer(tmp_path / "transformer").eval(), _clip_inputs(1), Topology())
    assert one.shape == _inputs()["noise"][:1].shape and rel_err(one, _inputs()["noise"][:1]) > 0.1
    got = np.load(tmp_path / "clip.npy")
    assert rel_err(got, one) < 1e-5, rel_err(got, one)
