"""The emulator's stand-in edit honours what the pipeline relies on."""

from __future__ import annotations

import io

from PIL import Image

from kontext_s3_tools.emulator.editing import edit
from tests.helpers import jpeg_bytes

SOURCE = jpeg_bytes(300, 200)


def test_same_seed_prompt_and_input_give_the_same_bytes() -> None:
    first = edit(SOURCE, prompt="p", seed=5, num_images=2, output_format="png", aspect_ratio=None)
    again = edit(SOURCE, prompt="p", seed=5, num_images=2, output_format="png", aspect_ratio=None)
    assert [i.data for i in first] == [i.data for i in again]
    other_seed = edit(SOURCE, prompt="p", seed=6, num_images=1, output_format="png", aspect_ratio=None)
    assert other_seed[0].data != first[0].data
    assert first[0].data != first[1].data  # each image of a request differs


def test_num_images_format_and_aspect_ratio_are_honoured() -> None:
    images = edit(SOURCE, prompt="p", seed=1, num_images=3, output_format="jpeg", aspect_ratio="1:1")
    assert len(images) == 3
    for image in images:
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.format == "JPEG" and image.content_type == "image/jpeg"
        assert decoded.size == (200, 200) == (image.width, image.height)
    [tall] = edit(SOURCE, prompt="p", seed=1, num_images=1, output_format="png", aspect_ratio="9:16")
    assert Image.open(io.BytesIO(tall.data)).format == "PNG"
    assert (tall.width, tall.height) == (112, 200)  # 9:16 cut from the 300x200 input, to the pixel
