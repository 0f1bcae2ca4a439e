"""A small synthetic text-to-video set: coloured shapes moving over a plain background, with matching captions.

It is what the tests and the README demo train on, so everything (decode, buckets, cache, training) runs without
downloading data. Captions name the shape, colour and direction, so text conditioning carries real information.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from contentv_common.data.manifest import write_manifest

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render(shape: str, colour: str, direction: str, width: int, height: int, frames: int, seed: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: one shape crossing a dark background along `direction`, through the middle
    (its path is centred on the frame, give or take a seeded jitter of a tenth of the frame)."""
    rng = np.random.default_rng(seed)
    size = min(width, height) // 4
    yy, xx = np.mgrid[0:height, 0:width]
    background = rng.integers(14, 26, size=3)
    dx, dy = DIRECTIONS[direction]
    speed = min(width, height) * 0.5 / max(frames - 1, 1)
    travel = speed * (frames - 1)
    cx0 = (rng.uniform(0.4, 0.6) * width) - dx * travel / 2
    cy0 = (rng.uniform(0.4, 0.6) * height) - dy * travel / 2
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        cx, cy = cx0 + dx * speed * t, cy0 + dy * speed * t
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
        else:
            inside = (np.abs(xx - cx) <= size / 2) & (np.abs(yy - cy) <= size / 2)
        video[t] = background
        video[t][inside] = COLOURS[colour]
    return video


def write_mp4(path: Path, video: np.ndarray, fps: int) -> None:
    """Encode uint8 [F, H, W, 3] as H.264 (yuv420p, so even sizes) to `path`."""
    import av  # here, not at the top: `render` alone (tools/make_demo_vae.py) needs no video codec

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_synthetic_set(
    out_dir: str | Path,
    num_videos: int = 64,
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64)),
    frames: int = 12,
    fps: int = 8,
    num_images: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write `num_videos` mp4 clips (and `num_images` png stills) plus `manifest.jsonl`; returns the manifest path.

    Clip i shows the i-th of the 32 (shape, colour, direction) combinations in a seeded order, cycling, so the
    default 64 clips hold every caption twice (once per size), each from its own random start and background."""
    import av

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = [(s, c, d) for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    order = rng.permutation(len(combos))
    rows = []
    for i in tqdm(range(num_videos + num_images), desc="synthetic set", disable=not progress):
        shape, colour, direction = combos[order[i % len(combos)]]  # every caption once before any repeats
        width, height = sizes[(i + i // len(combos)) % len(sizes)]  # a repeated caption gets the other size
        is_image = i >= num_videos
        video = render(shape, colour, direction, width, height, 1 if is_image else frames, seed * 100003 + i)
        if is_image:
            name = f"image_{i:04d}.png"
            av.VideoFrame.from_ndarray(video[0], format="rgb24").to_image().save(out_dir / name)
            caption = f"a {colour} {shape} on a dark background"
        else:
            name = f"clip_{i:04d}.mp4"
            write_mp4(out_dir / name, video, fps)
            caption = f"a {colour} {shape} moving {direction}"
        rows.append(
            {"path": name, "caption": caption, "width": width, "height": height}
            | ({} if is_image else {"fps": fps, "frames": frames})
        )
    return write_manifest(out_dir / "manifest.jsonl", rows)
