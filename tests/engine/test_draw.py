"""Pictures ``detkit predict`` draws: filled labels in the class colour with contrasting text,
sized by the image, inside the image."""

import numpy as np
import pytest

from detkit.engine.draw import (
    PALETTE,
    class_colour,
    draw_detections,
    font,
    label_box,
    sizes,
    text_colour,
)

GREY = (128, 128, 128)


def _draw(size, boxes, labels, scores=None, names=None):
    image = np.full((*size, 3), GREY, dtype=np.uint8)
    scores = scores if scores is not None else [0.9] * len(boxes)
    names = names or [f"class{label}" for label in labels]
    return np.asarray(draw_detections(image, boxes, labels, names, scores))


def _run_above(pixels, column: int, bottom: int, colour) -> int:
    """How many rows of ``colour`` end at row ``bottom`` in ``column`` (the label's height)."""
    rows = 0
    while bottom - rows >= 0 and tuple(pixels[bottom - rows, column]) == colour:
        rows += 1
    return rows


def _label_height(image_side: int) -> int:
    """The label height the drawing should use: the font's line height plus padding."""
    size = sizes(image_side, image_side)[1]
    ascent, descent = font(size).getmetrics()
    return ascent + descent + 2 * max(1, round(size * 0.2))


def test_the_label_is_a_filled_rectangle_of_the_class_colour_above_the_box():
    pixels = _draw((300, 300), [[100, 150, 200, 250]], [3])
    colour = class_colour(3)
    assert colour == PALETTE[3]
    height = _run_above(pixels, column=100, bottom=149, colour=colour)
    assert height == _label_height(300)
    top = 150 - height
    assert tuple(pixels[top - 1, 100]) == GREY  # nothing above the label
    label = pixels[top:150, 100:200]
    filled = np.all(label == colour, axis=-1)
    text = label.min(axis=-1) > 160  # white-ish (anti-aliased) text pixels; red has G=39
    assert text_colour(colour) == (255, 255, 255)  # white on this red
    assert filled.mean() > 0.5 and text.sum() > 40  # text drawn on a filled label
    assert tuple(pixels[200, 100]) == colour  # the box's left edge, in the same colour
    assert tuple(pixels[200, 150]) == GREY  # the box is not filled


def test_classes_get_different_colours_and_text_contrasts_with_them():
    pixels = _draw((300, 300), [[20, 100, 120, 200], [160, 100, 280, 200]], [0, 8])
    assert tuple(pixels[99, 20]) == class_colour(0) != class_colour(8) == tuple(pixels[99, 160])
    assert text_colour((255, 255, 0)) == (0, 0, 0)  # black on yellow
    assert text_colour((255, 255, 255)) == (0, 0, 0)
    assert text_colour((0, 0, 128)) == (255, 255, 255)  # white on navy
    assert text_colour((0, 0, 0)) == (255, 255, 255)
    assert text_colour(class_colour(8)) == (0, 0, 0)  # the olive of class 8


def test_font_and_line_grow_with_the_image():
    small = _draw((256, 256), [[64, 128, 192, 240]], [1])
    large = _draw((1024, 1024), [[256, 512, 768, 960]], [1])
    colour = class_colour(1)
    heights = [_run_above(small, 64, 127, colour), _run_above(large, 256, 511, colour)]
    assert heights == [_label_height(256), _label_height(1024)]
    assert heights[1] > 2.5 * heights[0]
    lines = [sizes(256, 256)[0], sizes(1024, 1024)[0]]
    assert lines[1] > lines[0]
    # The box edge is as thick as the line width (the left edge, halfway down the box).
    assert np.all(large[700, 256 : 256 + lines[1]] == colour)
    assert tuple(large[700, 256 + lines[1]]) == GREY


def test_a_label_that_would_leave_the_image_goes_inside():
    # A box touching the top edge and the right edge: the label goes inside the box's top,
    # moved left so that it ends at the image's right edge.
    pixels = _draw((200, 300), [[270, 0, 300, 120]], [2], names=["a long class name"])
    colour = class_colour(2)
    height = _label_height(250)
    assert _run_above(pixels, column=299, bottom=height - 1, colour=colour) == height
    row = np.all(pixels[1] == colour, axis=-1)
    assert row[299] and row[200]  # the label reaches left past the 30 px wide box


@pytest.mark.parametrize("seed", range(5))
def test_labels_stay_inside_the_image_wherever_the_box_is(seed):
    rng = np.random.default_rng(seed)
    width, height = 320, 180
    for _ in range(200):
        x, y = rng.uniform(-100, 400), rng.uniform(-100, 300)
        box = (x, y, x + rng.uniform(0, 200), y + rng.uniform(0, 200))
        size = (int(rng.integers(10, 300)), int(rng.integers(10, 150)))
        x0, y0, x1, y1 = label_box(box, size, (width, height))
        assert x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
        assert (x1 - x0, y1 - y0) == size


def test_no_detections_leave_the_image_as_it_was():
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    drawn = draw_detections(image, np.zeros((0, 4)), [], [], [])
    np.testing.assert_array_equal(np.asarray(drawn), image)
