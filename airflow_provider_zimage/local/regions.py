"""Outpainting and crop-and-zoom inpainting (`maskMargin`) on diffusers' Z-Image inpainting pipeline.

diffusers ships no Z-Image outpainting pipeline and no "only masked" inpainting, but both are the
inpainting pipeline run on a prepared picture, then pasted back:

* `outpaint`: the seed image on a larger canvas (the new border is a blurred stretch of the source, so
  a `strength` below 1 starts from colours that belong there), a mask over the new border.
* `maskMargin`: the mask's bounding box plus the margin is cut out, scaled up to about the output's pixel
  count (the "zoom": small masked areas get the model's full resolution), inpainted, scaled back.

Both paste the result back through the mask onto the source pixels: a VAE round trip changes every
pixel a little, and a user asking to extend or touch up a picture expects the rest of it unchanged, to
the byte (where the mask is 0). PIL only: planning runs before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageFilter

from airflow_provider_zimage.local.refusals import issue

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_SIDE", "MIN_SIDE", "Region", "mask_margin_region", "outpaint_region", "paste_back"]

MIN_SIDE, MAX_SIDE, MULTIPLE = 128, 2048, 16  # the API's width/height range and step
_SIDES = ("top", "right", "bottom", "left")


@dataclass(frozen=True, eq=False)
class Region:
    """What the pipeline is called with, and how its picture goes back onto the output.

    :param original: the output-sized picture whose pixels are kept where `mask` is 0.
    :param mask: output-sized, 255 where the generated pixels go (values between blend).
    :param box: where the generated picture lands in the output (left, top, right, bottom).
    :param image: / :param mask_image: / :param size: the pipeline call's inputs and (width, height).
    """

    original: Image.Image = field(repr=False)
    mask: Image.Image = field(repr=False)
    box: tuple[int, int, int, int]
    image: Image.Image = field(repr=False)
    mask_image: Image.Image = field(repr=False)
    size: tuple[int, int]

    def pipeline_inputs(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "mask_image": self.mask_image,
            "width": self.size[0],
            "height": self.size[1],
        }


def outpaint_region(
    outpaint: Any,
    seed_image: Image.Image,
    mask_image: Image.Image | None,
    width: int | None,
    height: int | None,
    issues: list[dict[str, Any]],
) -> Region | None:
    """The canvas of `outpaint` around `seed_image`, or None with the reasons appended to `issues`.

    Runware: "Final width/height must account for original image plus extensions". So the output is
    the seed image's size plus the extensions; a `width`/`height` saying otherwise is refused (naming
    it and the size it must be) rather than silently stretching the source.
    """
    pads = {side: int(getattr(outpaint, side, None) or 0) for side in _SIDES}
    source_w, source_h = seed_image.size
    final_w = source_w + pads["left"] + pads["right"]
    final_h = source_h + pads["top"] + pads["bottom"]
    before = len(issues)
    for axis, source, final, first, second, given in (
        ("width", source_w, final_w, "left", "right", width),
        ("height", source_h, final_h, "top", "bottom", height),
    ):
        grows = second if pads[second] or not pads[first] else first
        if not (MIN_SIDE <= final <= MAX_SIDE and final % MULTIPLE == 0):
            fixed = pads[grows] + _valid_near(final) - final
            hint = f"; e.g. outpaint.{grows} {fixed}" if fixed >= 0 else ""
            issues.append(
                issue(
                    f"outpaint.{grows}",
                    f"makes the {axis} {source} + {pads[first]} + {pads[second]} = {final} pixels (the seed "
                    f"image's {axis} plus outpaint.{first} and outpaint.{second}); it must be a multiple "
                    f"of {MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}{hint}",
                    pads[grows],
                )
            )
        elif given is not None and given != final:
            issues.append(
                issue(
                    axis,
                    f"must be {final} with outpaint: the seed image's {axis} ({source}) plus "
                    f"outpaint.{first} ({pads[first]}) and outpaint.{second} ({pads[second]}); "
                    f"or leave {axis} out",
                    given,
                )
            )
    if len(issues) > before:
        return None
    origin = (pads["left"], pads["top"])
    # The new border starts as a blurred stretch of the source: with strength < 1 the pipeline keeps
    # some of the init picture, and grey or black there would show through.
    canvas = seed_image.resize((final_w, final_h), Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=max(final_w, final_h) / 32))
    canvas.paste(seed_image, origin)
    mask = Image.new("L", (final_w, final_h), 255)
    if mask_image is None:
        mask.paste(Image.new("L", seed_image.size, 0), origin)
    else:
        # A maskImage with outpaint marks what to repaint inside the source as well.
        mask.paste(mask_image.resize(seed_image.size, Image.Resampling.NEAREST), origin)
    return Region(canvas, mask, (0, 0, final_w, final_h), canvas, mask, (final_w, final_h))


def mask_margin_region(
    margin: int,
    seed_image: Image.Image,
    mask_image: Image.Image,
    issues: list[dict[str, Any]],
) -> Region | None:
    """The crop-and-zoom of `mask_image`'s painted area plus `margin` pixels (images at output size)."""
    bbox = mask_image.getbbox()
    if bbox is None:
        issues.append(
            issue(
                "inputs.maskImage",
                "is empty (every pixel 0): maskMargin crops around the painted area; paint what to "
                "repaint white (maskMargin between 32 and 128)",
            )
        )
        return None
    out_w, out_h = seed_image.size
    box = (
        max(0, bbox[0] - margin),
        max(0, bbox[1] - margin),
        min(out_w, bbox[2] + margin),
        min(out_h, bbox[3] + margin),
    )
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # Zoom so the crop gets about the output's pixel count (never shrink it), on the 16-pixel grid.
    zoom = max(1.0, math.sqrt(out_w * out_h / (box_w * box_h)))
    size = (_grid(box_w * zoom), _grid(box_h * zoom))
    image = seed_image.crop(box).resize(size, Image.Resampling.LANCZOS)
    crop_mask = mask_image.crop(box).resize(size, Image.Resampling.NEAREST)
    return Region(seed_image, mask_image, box, image, crop_mask, size)


def paste_back(region: Region, array: np.ndarray) -> np.ndarray:
    """The pipeline's HxWx3 floats in [0, 1] -> the output, source pixels kept where the mask is 0."""
    import numpy as np

    generated = Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype("uint8"))
    left, top, right, bottom = region.box
    if generated.size != (right - left, bottom - top):
        generated = generated.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
    layer = region.original.copy()
    layer.paste(generated, (left, top))
    out = Image.composite(layer, region.original, region.mask)
    # Exact: encode_image's (x / 255 * 255).round() gives back every 8-bit value.
    return np.asarray(out, dtype=np.float32) / 255.0


def _grid(side: float) -> int:
    return int(min(MAX_SIDE, max(MULTIPLE, round(side / MULTIPLE) * MULTIPLE)))


def _valid_near(value: int) -> int:
    """The valid side nearest to `value`, rounding up where possible (a bigger canvas loses nothing)."""
    up = max(MIN_SIDE, -(-value // MULTIPLE) * MULTIPLE)
    return up if up <= MAX_SIDE else MAX_SIDE
