"""The torch Wan VAE's tiled decode spread over 2 gloo ranks: every rank gets the frames one process decoding the
same tiles gives (the demo's trained VAE, diffusers' default 256/192-pixel tiles, 2 latent frames, 3 tiles), within
fp32 rounding: each rank runs one thread, and oneDNN's convolutions sum in another order than the test process's (CI
saw 3 of 307,200 values 1.1e-6 apart at magnitude 0.5, relative 2.3e-6)."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from contentv_common.demo import DEMO_VAE
from contentv_common.vae.chunks import Tiling
from contentv_torch_npu.vae import load_vae
from tools.launch_local import free_port

LATENTS = np.random.default_rng(0).standard_normal((1, 16, 2, 8, 40)).astype(np.float32)


def _decode(group: dist.ProcessGroup | None) -> np.ndarray:
    vae = load_vae(DEMO_VAE)
    with torch.inference_mode():
        return vae.decode(vae.denormalize(torch.from_numpy(LATENTS)), Tiling(), group).numpy()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    np.save(os.path.join(folder, f"rank{rank}.npy"), _decode(dist.group.WORLD))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_tiles_over_two_ranks_equal_one_process(tmp_path, spawn_ranks):
    spawn_ranks(_worker, (2, free_port(), str(tmp_path)), 2)
    expected = _decode(None)
    assert expected.shape == (1, 3, 5, 64, 320)
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{rank}.npy"), expected, rtol=1e-5, atol=1e-6)
