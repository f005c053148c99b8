"""The emulator's stand-in for FLUX.1 Kontext [max]: a visible, deterministic Pillow transform.

This is not the model and does not pretend to be: every output is stamped
"fal emulator" with the prompt and seed. It honours what the pipeline depends
on: ``num_images`` outputs, ``output_format``, ``aspect_ratio`` (centre crop),
and ``seed`` (same seed, prompt and input give the same bytes; each image of a
request gets its own tint).
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

MAX_SIDE = 1024


@dataclass(frozen=True)
class EditedImage:
    data: bytes
    content_type: str
    width: int
    height: int
    file_name: str


def _crop_to_ratio(image: Image.Image, ratio: str | None) -> Image.Image:
    if not ratio:
        return image
    across, down = (int(x) for x in ratio.split(":"))
    width, height = image.size
    if width * down > height * across:
        new_width = max(1, height * across // down)
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = max(1, width * down // across)
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def describe(source: bytes) -> dict[str, object]:
    """What the runner fetched: its stored width and height, format, and EXIF orientation (1 = upright)."""
    image: Image.Image = Image.open(io.BytesIO(source))
    orientation = image.getexif().get(0x0112, 1)
    return {"width": image.width, "height": image.height, "format": image.format, "orientation": int(orientation)}


def edit(source: bytes, *, prompt: str, seed: int, num_images: int, output_format: str, aspect_ratio: str | None) -> list[EditedImage]:
    base: Image.Image = Image.open(io.BytesIO(source))
    base = ImageOps.exif_transpose(base).convert("RGB")
    base = _crop_to_ratio(base, aspect_ratio)
    base.thumbnail((MAX_SIDE, MAX_SIDE))
    grey = ImageOps.grayscale(base)
    font = ImageFont.load_default()
    results = []
    for index in range(num_images):
        rng = random.Random(f"{seed}:{index}:{hashlib.sha256(prompt.encode()).hexdigest()}")
        dark = tuple(rng.randrange(0, 90) for _ in range(3))
        light = tuple(rng.randrange(160, 256) for _ in range(3))
        toned = ImageOps.colorize(grey, black=dark, white=light)
        draw = ImageDraw.Draw(toned)
        band = max(14, toned.height // 12)
        draw.rectangle((0, toned.height - band, toned.width, toned.height), fill=(0, 0, 0))
        caption = f"fal emulator | seed {seed} #{index} | {prompt}"[:200]
        draw.text((4, toned.height - band + 2), caption.encode("ascii", "replace").decode(), fill=(255, 255, 255), font=font)
        buffer = io.BytesIO()
        if output_format == "png":
            toned.save(buffer, format="PNG")
            content_type, suffix = "image/png", "png"
        else:
            toned.save(buffer, format="JPEG", quality=90)
            content_type, suffix = "image/jpeg", "jpg"
        results.append(
            EditedImage(
                data=buffer.getvalue(),
                content_type=content_type,
                width=toned.width,
                height=toned.height,
                file_name=f"edited-{index}.{suffix}",
            )
        )
    return results
