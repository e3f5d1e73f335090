"""Joint train/eval transforms: shapes per plan scale, ignore padding, reproducibility, flips."""
import numpy as np
import pytest
import torch

from dance.data.transforms import EvalTransform, TrainTransform, scaled_crop

CROP = (64, 128)


@pytest.fixture
def sample(rng):
    # 8x8 blocks of random classes (objects larger than a pixel), one row of them ignored.
    mask = np.kron(rng.integers(0, 19, (12, 20)), np.ones((8, 8))).astype(np.uint8)
    mask[:8] = 255
    # The image encodes the mask (class k -> grey 10k), so image/mask alignment is checkable.
    image = np.repeat((mask.astype(np.uint16) * 10 % 256).astype(np.uint8)[..., None], 3, -1)
    return image, mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scaled_crop_rounds_to_multiples_of_8():
    assert scaled_crop((512, 1024), 1.0) == (512, 1024)
    assert scaled_crop((512, 1024), 0.5) == (256, 512)
    assert scaled_crop((100, 200), 0.625) == (64, 128)  # 62.5 -> 64, 125 -> 128
    assert scaled_crop((16, 16), 0.1) == (8, 8)  # never below one multiple


@pytest.mark.parametrize("scale, shape", [(1.0, (64, 128)), (0.5, (32, 64)), (0.75, (48, 96))])
def test_train_sample_shape_dtype_and_values(sample, scale, shape):
    t = TrainTransform(CROP)
    for seed in range(5):  # every draw of one scale has the same shape, so batches stack
        image, mask = t(*sample, scale=scale, generator=gen(seed))
        assert image.shape == (3, *shape) and image.dtype == torch.float32
        assert mask.shape == shape and mask.dtype == torch.int64
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(mask.unique().tolist()) <= set(range(19)) | {255}


def test_plan_scale_keeps_the_field_of_view(sample):
    """Scale 0.5 without augmentation: half the pixels per side, same content (nearest)."""
    image, mask = sample
    full = TrainTransform((96, 160), scale_range=(1.0, 1.0), hflip=0.0)
    half = full(image, mask, scale=0.5, generator=gen(0))[1]
    assert half.shape == (48, 80)
    assert torch.equal(full(image, mask, generator=gen(0))[1], torch.from_numpy(mask).long())
    # Pixel-centre nearest: output pixel (i, j) reads source pixel (2i + 1, 2j + 1).
    assert torch.equal(half, torch.from_numpy(mask[1::2, 1::2]).long())


def test_padding_uses_ignore_for_the_mask_and_zero_for_the_image(sample):
    image, mask = sample[0][:40, :50], sample[1][:40, :50]
    t = TrainTransform(CROP, scale_range=(1.0, 1.0), hflip=0.0)
    out_image, out_mask = t(image, mask, generator=gen(1))
    assert out_mask.shape == CROP
    # The 40x50 sample sits at the top-left; everything else is padding.
    assert torch.equal(out_mask[:40, :50], torch.from_numpy(mask).long())
    assert (out_mask[40:] == 255).all() and (out_mask[:, 50:] == 255).all()
    assert (out_image[:, 40:] == 0).all() and (out_image[:, :, 50:] == 0).all()


def test_same_generator_same_sample_and_other_seed_differs(sample):
    t = TrainTransform(CROP)
    a, b, c = (t(*sample, scale=0.75, generator=gen(s)) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # The draws do not depend on the image size: the generator's stream advances the same.
    g1, g2 = gen(3), gen(3)
    t(*sample, generator=g1)
    t(sample[0][:20, :20], sample[1][:20, :20], generator=g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_flip_moves_image_and_mask_together(sample):
    image, mask = sample
    flip = TrainTransform((96, 160), scale_range=(1.0, 1.0), hflip=1.0)
    out_image, out_mask = flip(image, mask, generator=gen(0))
    assert torch.equal(out_mask, torch.from_numpy(mask[:, ::-1].copy()).long())
    assert torch.equal(out_image, torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1) / 255)
    # With random scale, crop and flip the pair stays aligned: grey level still encodes the
    # class inside the blocks (bilinear only blends near block edges), and not when mirrored.
    t = TrainTransform(CROP, scale_range=(1.0, 2.0))
    for seed in range(8):
        out_image, out_mask = t(image, mask, generator=gen(seed))
        grey = (out_image[0] * 255).round().long()
        inside = out_mask != 255
        aligned = (grey == out_mask * 10 % 256)[inside].float().mean()
        mirrored = (grey == out_mask.flip(-1) * 10 % 256)[inside].float().mean()
        assert aligned > 0.6 and mirrored < 0.3, (aligned, mirrored)


def test_eval_transform_converts_without_resizing(sample):
    image, mask = sample
    out_image, out_mask = EvalTransform()(image, mask)
    assert out_image.shape == (3, 96, 160) and out_image.dtype == torch.float32
    assert torch.allclose(out_image, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(out_mask, torch.from_numpy(mask).long())


def test_bad_arguments_are_rejected(sample):
    with pytest.raises(ValueError, match="crop"):
        TrainTransform((0, 64))
    with pytest.raises(ValueError, match="mask shape"):
        EvalTransform()(sample[0], sample[1][:10])


def test_jitter_that_follows_the_scale_is_weaker_on_downsampled_images():
    """A fixed 2x jitter becomes 1.5x at plan scale 0.5: the crop then covers 4/3 as many
    source columns as without (the field of view the plan asked for, enlarged less)."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (64, 1))  # column index as the mask value
    image = np.repeat(ramp[..., None], 3, -1)

    def columns_seen(follow: bool, scale: float) -> int:
        t = TrainTransform((32, 64), scale_range=(2.0, 2.0), hflip=0.0, jitter_follows_scale=follow)
        mask = t(image, ramp, scale=scale, generator=gen(0))[1]
        return int(mask[0].max() - mask[0].min()) + 1

    assert columns_seen(False, 0.5) == pytest.approx(32, abs=1)
    assert columns_seen(True, 0.5) == pytest.approx(32 * 4 / 3, abs=1)
    assert columns_seen(True, 1.0) == columns_seen(False, 1.0) == pytest.approx(32, abs=1)


def test_the_mask_crop_equals_resizing_the_whole_mask_first():
    """`crop_mask` gathers the crop's pixels straight from the stored mask: the same labels as
    torch's nearest-exact resize of the whole mask, then pad, crop and flip. (The reference
    resize is torch's own: torchvision's resize of a Mask took nearest, whatever the mode
    asked, in older versions, 0.18 among them.)"""
    import numpy as np
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F
    rng = np.random.default_rng(0)
    for t in range(300):
        h, w = (int(v) for v in rng.integers(5, 400, 2))
        mask = rng.integers(0, 250, (h, w)).astype(np.uint8)
        crop = (int(rng.integers(8, 200)), int(rng.integers(8, 200)))
        transform = TrainTransform(crop, scale_range=(0.3, 2.5))
        d = transform.draw((h, w), float(rng.choice([0.25, 0.5, 0.75, 1.0])),
                           torch.Generator().manual_seed(t))
        m = tv_tensors.Mask(torch.from_numpy(mask)[None])
        if list(m.shape[-2:]) != list(d.size):
            m = tv_tensors.Mask(torch.nn.functional.interpolate(
                m[None].float(), size=list(d.size), mode="nearest-exact")[0].to(torch.uint8))
        m = F.pad(m, [0, 0, d.pad[1], d.pad[0]], fill=255)
        m = F.crop(m, d.top, d.left, *d.crop)
        if d.flip:
            m = F.horizontal_flip(m)
        assert torch.equal(transform.crop_mask(mask, d), m.as_subclass(torch.Tensor)[0].long()), t
