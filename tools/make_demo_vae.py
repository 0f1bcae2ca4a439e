"""Train the demo's tiny Wan2.1 VAE on the synthetic moving-shapes clips: `python tools/make_demo_vae.py`.

The README demo needs a VAE whose latents mean something: a random VAE decodes anything the transformer learns into
coloured noise. This script trains the smallest Wan2.1-architecture VAE (base_dim 8, one res block, 16 latent
channels) as an autoencoder on clips rendered up front, sets its latent statistics so normalised latents have unit
variance per channel, and writes it in float16 as a diffusers `AutoencoderKLWan` folder (about 1.3 MB) with
`training.json` (held-out reconstruction error on whole 9-frame clips). The result ships in `configs/demo_vae/`.

The shipped one was trained on one H200 GPU in 5.5 minutes (1475 steps of 32 whole clips from a pool of 5000
pre-rendered clips per size; 28.1 dB held-out PSNR, every caption of the set still measurable after reconstruction):

    python tools/make_demo_vae.py --device cuda --batch 32 --crop 0 --pool 5000 --steps 200000 --max-minutes 5.5

On a CPU, `--crop 32` (windows around the shape) and fewer steps train a usable but blurrier one in about half an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from contentv_common.data.synthetic import COLOURS, DIRECTIONS, SHAPES, render
from contentv_common.demo import DEMO_VAE
from contentv_common.vae.config import VAEConfig
from contentv_torch_npu.vae import WanVAE, load_vae, save_vae

SIZES = ((64, 64), (96, 64))  # (width, height) of the tiny recipe's video buckets
CLIP_FRAMES = 12  # as the synthetic set renders them, so shapes move at the data's speed
LATENT_NOISE = 0.1
LATENT_PENALTY = 1e-3


def demo_vae_config() -> VAEConfig:
    return VAEConfig(base_dim=8, num_res_blocks=1)


def render_pool(rng: np.random.Generator, n: int, size: tuple[int, int]) -> np.ndarray:
    """n random clips of the synthetic set's kind, uint8 [n, CLIP_FRAMES, H, W, 3], rendered once up front."""
    out = []
    for _ in range(n):
        shape, colour, direction = SHAPES[rng.integers(2)], *(list(d)[rng.integers(4)] for d in (COLOURS, DIRECTIONS))
        out.append(render(shape, colour, direction, *size, CLIP_FRAMES, int(rng.integers(2**31))))
    return np.stack(out)


def clips(
    rng: np.random.Generator, pool: np.ndarray, n: int, frames: int, crop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """n clips drawn from `pool`, each a random `frames`-long window, [n, 3, frames, H, W] in [-1, 1], and their
    foreground masks [n, 1, frames, H, W] (the shape).

    With `crop`, each clip is a crop x crop window (on the 8-pixel latent grid), every other one around its moving
    shape and the rest anywhere: the VAE is convolutional, so windows teach it shapes and plain background alike at a
    fraction of the cost of whole frames.
    """
    height, width = pool.shape[2:4]
    videos = []
    for i in rng.integers(len(pool), size=n):
        start = int(rng.integers(CLIP_FRAMES - frames + 1))
        clip = pool[i, start : start + frames]
        if crop is not None:
            ys, xs = np.nonzero(clip[frames // 2].max(axis=-1) > 100)
            if len(videos) % 2 or not len(xs):
                ys, xs = rng.uniform(0, height, 1), rng.uniform(0, width, 1)
            y0, x0 = (int(np.clip((c.mean() - crop / 2 + rng.integers(-8, 9)) // 8 * 8, 0, lim - crop))
                      for c, lim in ((ys, height), (xs, width)))  # fmt: skip
            clip = clip[:, y0 : y0 + crop, x0 : x0 + crop]
        videos.append(clip)
    video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    foreground = (video.amax(dim=1, keepdim=True) > -0.5).float()  # background channels stay below 50 / 255
    return video, foreground


def loss_fn(vae: WanVAE, video: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted reconstruction MSE + latent penalty, plain reconstruction MSE).

    The decoder sees the posterior mean plus fixed-scale noise and the mean is kept small (a fixed-variance VAE), so
    the latent space is smooth around the data: what the transformer generates decodes into clean shapes.
    """
    mean = vae.encode(video)
    # unclamped decoder output: `decode` clamps to [-1, 1], which would stop the gradient of any pixel pushed past it
    recon = vae._decode_frames(mean + LATENT_NOISE * torch.randn_like(mean))
    err = (recon - video).square()
    return (err * weight).mean() + LATENT_PENALTY * mean.square().mean(), err.mean()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEMO_VAE)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--foreground-weight",
        type=float,
        default=4.0,
        help="loss weight of shape pixels vs background",
    )
    ap.add_argument("--frames", type=int, default=9, help="frames per training clip (1 + 4k)")
    ap.add_argument("--init", type=Path, help="start from this VAE folder (e.g. a shorter run's) instead of random")
    ap.add_argument("--crop", type=int, default=32, help="train on crop x crop windows around the shape (0: whole)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early after this long (slow machines)")
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    ap.add_argument("--pool", type=int, default=1024, help="clips rendered up front per frame size")
    args = ap.parse_args(argv)
    args.crop = args.crop or None
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = (WanVAE(demo_vae_config()) if args.init is None else load_vae(args.init)).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    pools = [render_pool(rng, args.pool, size) for size in SIZES]
    start = time.perf_counter()
    for step in range(args.steps):
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps, elapsed / (60 * args.max_minutes) if args.max_minutes else 0.0)
        for group in opt.param_groups:  # cosine decay over the steps, or over the time limit if that comes first
            group["lr"] = args.lr * 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0)))
        video, foreground = clips(rng, pools[step % len(pools)], args.batch, args.frames, crop=args.crop)
        video, foreground = video.to(args.device), foreground.to(args.device)
        weight = 1.0 + (args.foreground_weight - 1.0) * foreground
        loss, mse = loss_fn(vae, video, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.5f} mse {mse.item():.5f} ({elapsed:.0f} s)", flush=True)
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            print(f"stopping after step {step}: --max-minutes {args.max_minutes}")
            args.steps = step + 1
            break
    vae = vae.cpu().eval()
    held_out = np.random.default_rng(args.seed + 1)
    with torch.no_grad():
        video, _ = clips(held_out, render_pool(held_out, 16, SIZES[0]), 16, 9)
        latents = vae.encode(video)
        mse = float((vae.decode(latents) - video).square().mean())
        mean = latents.mean(dim=(0, 2, 3, 4))
        std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.cfg = dataclasses.replace(
        vae.cfg, latents_mean=tuple(float(m) for m in mean), latents_std=tuple(float(s) for s in std)
    )
    folder = save_vae(args.out, vae.half(), overwrite=True)
    psnr = 10 * np.log10(4.0 / mse)  # pixels in [-1, 1]: peak-to-peak 2
    report = {"steps": args.steps, "batch": args.batch, "seed": args.seed, "held_out_mse": mse, "psnr_db": psnr}
    (folder / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {folder}: held-out reconstruction MSE {mse:.5f} ({psnr:.1f} dB PSNR) on 16 held-out clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
