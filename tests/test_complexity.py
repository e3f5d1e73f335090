"""Spatial-complexity indicators on images and masks small enough to check by hand."""
import numpy as np
import pytest
import torch

import dance
from dance.data.complexity import (
    EDGE_THRESHOLD,
    IMAGE_INDICATORS,
    INDICATORS,
    all_indicators,
    luma,
    spatial_complexity,
)
from dance.errors import DanceError


def grey(values) -> np.ndarray:
    """An RGB image whose three channels hold ``values`` (so its luma is exactly ``values``)."""
    v = np.asarray(values, dtype=np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


def test_flat_image_has_no_complexity():
    scores = all_indicators(grey(np.full((128, 192), 117)), indicators=IMAGE_INDICATORS)
    assert scores["si"] == 0.0
    assert scores["gradient"] == 0.0
    assert scores["edges"] == 0.0
    assert scores["entropy"] == 0.0
    assert 0 < scores["jpeg"] < 0.05  # a flat JPEG is little more than its header


def test_checkerboard_entropy_is_exactly_one_bit():
    board = (np.indices((16, 16)).sum(axis=0) % 2) * 255
    assert spatial_complexity(grey(board), "entropy") == 1.0


def test_step_edge_gives_the_sobel_values_by_hand():
    # A vertical step of c grey levels: the two interior columns beside it have Sobel magnitude
    # 4c, the other four of the six interior columns 0.
    c = 40
    img = grey(np.tile(np.r_[np.zeros(4), np.full(4, c)], (10, 1)))
    scores = all_indicators(img, indicators=("si", "gradient", "edges"))
    p = 2 / 6
    assert scores["gradient"] == pytest.approx(4 * c * p)
    assert scores["si"] == pytest.approx(4 * c * np.sqrt(p * (1 - p)))
    assert scores["edges"] == pytest.approx(p)  # 4 * 40 = 160 >= EDGE_THRESHOLD
    weak = grey(np.tile(np.r_[np.zeros(4), np.full(4, 20)], (10, 1)))
    assert 4 * 20 < EDGE_THRESHOLD and spatial_complexity(weak, "edges") == 0.0


def test_si_matches_scipy_sobel_reference(rng):
    from scipy import ndimage

    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    y = luma(img).astype(np.float64)
    mag = np.hypot(ndimage.sobel(y, axis=1), ndimage.sobel(y, axis=0))[1:-1, 1:-1]
    assert spatial_complexity(img, "si") == pytest.approx(mag.std(), rel=1e-6)
    assert spatial_complexity(img, "gradient") == pytest.approx(mag.mean(), rel=1e-6)


def test_luma_is_bt601():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]]], dtype=np.uint8)
    expected = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(luma(rgb) - expected).max() <= 0.5 + 1e-6


def test_jpeg_bytes_per_pixel_rise_with_noise(rng):
    ramp = np.tile(np.linspace(0, 200, 64), (64, 1))
    sizes = []
    for sigma in (0, 8, 32):
        noisy = np.clip(ramp + rng.normal(0, sigma, ramp.shape), 0, 255) if sigma else ramp
        img = np.stack([noisy, noisy * 0.8, noisy * 0.5], axis=-1).astype(np.uint8)
        sizes.append(spatial_complexity(img, "jpeg"))
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] > 2 * sizes[0]


def test_label_boundary_of_two_regions():
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1  # the columns either side of the border touch the other class: 8 of 24
    assert spatial_complexity(None, "label_boundary", mask=mask) == pytest.approx(1 / 3)
    assert spatial_complexity(None, "label_boundary", mask=mask.T) == pytest.approx(1 / 3)
    assert spatial_complexity(None, "label_boundary", mask=np.full((4, 6), 3, np.uint8)) == 0.0


def test_ignore_pixels_are_excluded():
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1
    framed = np.full((6, 6), 255, np.uint8)  # ignore rows above and below: same valid pixels
    framed[1:5] = mask
    assert spatial_complexity(None, "label_boundary", mask=framed) == pytest.approx(1 / 3)
    # An ignore column between the regions: no valid pixel touches another class.
    split = np.zeros((4, 7), np.uint8)
    split[:, 3] = 255
    split[:, 4:] = 1
    assert spatial_complexity(None, "label_boundary", mask=split) == 0.0
    # Aliasing counts only valid pixels: one-pixel stripes lose half, whatever ignore surrounds.
    stripes = np.tile(np.arange(8) % 2, (8, 1)).astype(np.uint8)
    padded = np.full((8, 16), 255, np.uint8)
    padded[:, :8] = stripes
    assert spatial_complexity(None, "label_aliasing", mask=stripes) == 0.5
    assert spatial_complexity(None, "label_aliasing", mask=padded) == 0.5
    assert spatial_complexity(None, "label_aliasing", mask=np.full((8, 8), 255, np.uint8)) == 0.0


def test_label_aliasing_rises_with_boundary_length():
    def blocks(size):  # a checkerboard of size x size blocks: boundary length ~ 1 / size
        return ((np.indices((48, 48)) // size).sum(axis=0) % 2).astype(np.uint8)

    assert spatial_complexity(None, "label_aliasing", mask=np.zeros((48, 48), np.uint8)) == 0.0
    aliasing = [spatial_complexity(None, "label_aliasing", mask=blocks(s)) for s in (12, 5, 3, 1)]
    assert aliasing[0] == 0.0  # even blocks survive a 2x round trip intact
    assert aliasing == sorted(aliasing) and aliasing[1] < aliasing[2] < aliasing[3]
    assert aliasing[3] == 0.5  # one-pixel checkerboard: every small pixel has one class
    # No downsampling, no aliasing; a harsher scale loses more.
    assert spatial_complexity(None, "label_aliasing", mask=blocks(3), scale=1.0) == 0.0
    assert (spatial_complexity(None, "label_aliasing", mask=blocks(5), scale=0.25)
            > aliasing[1])


def test_tensor_and_numpy_inputs_agree(rng):
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (24, 40), dtype=np.uint8)
    expected = all_indicators(img, mask)
    assert set(expected) == set(INDICATORS)
    hwc = torch.from_numpy(img)
    chw = hwc.permute(2, 0, 1)
    for image in (hwc, chw, chw.float() / 255, chw[None].float() / 255):
        assert all_indicators(image, torch.from_numpy(mask)) == expected
    assert dance.spatial_complexity(chw, "si") == expected["si"]


def test_one_pass_gives_what_each_indicator_gives_alone(rng):
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (20, 30), dtype=np.uint8)
    together = all_indicators(img, mask, scale=0.5)
    alone = {name: spatial_complexity(img, name, mask=mask, scale=0.5) for name in INDICATORS}
    assert together == alone
    assert all_indicators(img).keys() == set(IMAGE_INDICATORS)  # no mask: image indicators


def test_bad_requests_are_one_line_errors(rng):
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with pytest.raises(DanceError, match="need a label mask"):
        spatial_complexity(img, "label_aliasing")
    with pytest.raises(DanceError, match="unknown complexity indicator 'sharpness'"):
        spatial_complexity(img, "sharpness")
    with pytest.raises(DanceError, match=r"outside \[0, 1\]"):
        spatial_complexity(img.astype(np.float32), "si")  # 0-255 floats would saturate silently
    with pytest.raises(DanceError, match="is not HxW"):
        spatial_complexity(np.zeros((2, 3, 4, 5), np.uint8), "si")


def test_luma_decode_scores_like_the_rgb_decode(tmp_path):
    from PIL import Image

    from dance.data.complexity import LUMA_INDICATORS, all_indicators
    from dance.data.io import read_image, read_luma
    rgb = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    names = tuple(sorted(LUMA_INDICATORS))
    assert all_indicators(read_luma(path), indicators=names) == \
        all_indicators(read_image(path), indicators=names)
