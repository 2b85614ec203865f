"""Generated images and image folders (no downloads): smooth synthetic RGB pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def generated_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth, colourful synthetic RGB image (low-frequency sinusoids plus a disc)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    image = np.stack(channels, axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    image[mask] = rng.uniform(0, 1, size=3)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")


def make_image_folder(root: Path, count: int = 8, seed: int = 0, corrupt: bool = False) -> Path:
    """``count`` generated images in nested folders (PNG and JPEG, one grayscale, one RGBA); with
    ``corrupt`` also a truncated JPEG and a text file named ``.png``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = generated_image(seed * 1000 + i)
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        if i == 1:
            image = image.convert("L")
        if i == 2:
            image = image.convert("RGBA")
        suffix = "jpg" if i % 3 == 0 else "png"
        image.save(folder / f"img_{i:03d}.{suffix}", quality=95) if suffix == "jpg" else image.save(
            folder / f"img_{i:03d}.{suffix}"
        )
    if corrupt:
        good = root / "class_0" / "img_000.jpg"
        data = good.read_bytes()
        (root / "class_1" / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (root / "class_0" / "not_an_image.png").write_text("this is a text file, not a PNG\n")
    return root
