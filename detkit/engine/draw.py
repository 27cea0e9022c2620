"""Detections drawn so people can read them, on any background and at any image size.

Each box gets its class's colour (a fixed palette, so a class looks the same in every
picture) and a filled label above it (inside the box when above would leave the image)
holding ``"<class name> <score>"`` in black or white, whichever contrasts more with the
label. Line width and font size follow the image size; the font is matplotlib's DejaVu Sans
(a TrueType font that scales; matplotlib is a dependency), else Pillow's default.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's "tab20" colours, the ten strong ones first: distinct for up to ten classes,
# then repeated in a lighter shade.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]  # fmt: skip
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
MIN_FONT_SIZE = 12  # pixels: below this, text is hard to read on a screen


def class_colour(label: int) -> tuple[int, int, int]:
    """The fixed colour of class ``label``."""
    return PALETTE[int(label) % len(PALETTE)]


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio on ``background``."""

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast with black (L + 0.05) / 0.05 against with white 1.05 / (L + 0.05).
    return BLACK if (luminance + 0.05) ** 2 > 0.05 * 1.05 else WHITE


def sizes(height: int, width: int) -> tuple[int, int]:
    """``(line width, font size)`` in pixels for an image of ``height`` x ``width``."""
    side = (height + width) / 2
    return max(2, round(side * 0.003)), max(MIN_FONT_SIZE, round(side * 0.035))


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` pixels (matplotlib's copy), else Pillow's default font."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        try:
            return ImageFont.load_default(size=size)  # scalable from Pillow 10.1
        except TypeError:
            return ImageFont.load_default()


def label_box(
    box: tuple[float, float, float, float], label_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Where a label of ``label_size`` (w, h) goes for ``box`` (xyxy) in an image of
    ``image_size`` (w, h): on the box's top-left corner, above the box, or just inside its
    top when above would leave the image; moved left/up as needed to stay inside the image
    (a label larger than the image starts at its top-left corner)."""
    (w, h), (width, height) = label_size, image_size
    x0 = min(max(0, round(box[0])), width - w)
    top = round(box[1])
    y0 = top - h if top - h >= 0 else top
    y0 = min(max(0, y0), height - h)
    x0, y0 = max(0, x0), max(0, y0)
    return x0, y0, x0 + w, y0 + h


def draw_detections(image: np.ndarray, boxes, labels, names: list[str], scores) -> Image.Image:
    """``image`` (``uint8 [H, W, 3]``) with each box (xyxy pixels, any array-like) drawn in
    its class colour and labelled ``"<name> <score:.2f>"``; the best scores are drawn last,
    so their labels stay on top where labels overlap."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    height, width = image.shape[:2]
    line, font_size = sizes(height, width)
    face = font(font_size)
    pad = max(1, round(font_size * 0.2))
    ascent, descent = face.getmetrics()
    draw = ImageDraw.Draw(picture)
    boxes, labels = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    for i in order:  # boxes first: no box line crosses a label
        x1, y1, x2, y2 = np.clip(boxes[i], 0, [width - 1, height - 1] * 2).tolist()
        draw.rectangle(
            (x1, y1, max(x1, x2), max(y1, y2)), outline=class_colour(labels[i]), width=line
        )
    for i in order:
        text = f"{names[i]} {scores[i]:.2f}"
        size = (round(draw.textlength(text, font=face)) + 2 * pad, ascent + descent + 2 * pad)
        x0, y0, x1, y1 = label_box(tuple(boxes[i]), size, (width, height))
        colour = class_colour(labels[i])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        draw.text((x0 + pad, y0 + pad), text, fill=text_colour(colour), font=face)
    return picture
