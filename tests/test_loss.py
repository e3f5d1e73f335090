"""The weighted loss of the data policy: per-image mean CE first, then Σ w_i CE_i / Σ w_i."""
import math

import pytest
import torch
import torch.nn.functional as F

from dance.engine.loss import class_balanced_cross_entropy, weighted_cross_entropy


def _logits():
    # 2 images, 2 classes, 1 x 2 pixels
    x = torch.zeros(2, 2, 1, 2)
    x[0, 0, 0, 0] = 2.0  # image 0, pixel 0: class 0 favoured by 2 nats
    x[0, 1, 0, 1] = 1.0  # image 0, pixel 1: class 1 favoured by 1
    return x.requires_grad_(True)


def test_matches_a_hand_computation():
    target = torch.tensor([[[0, 255]], [[1, 0]]])
    loss, per_image = weighted_cross_entropy(_logits(), target, torch.tensor([1.0, 3.0]))
    ce0 = math.log(1 + math.exp(-2))  # only pixel 0 is valid
    ce1 = math.log(2)  # image 1's logits are all equal: log 2 for each pixel
    assert per_image.tolist() == pytest.approx([ce0, ce1])
    assert loss.item() == pytest.approx((1 * ce0 + 3 * ce1) / 4)
    assert not per_image.requires_grad and loss.requires_grad


def test_per_image_mean_first_not_pixel_mean():
    # image 0 has 1 valid pixel, image 1 has 2: a plain pixel mean would weight image 1 double
    target = torch.tensor([[[0, 255]], [[1, 1]]])
    logits = _logits()
    loss, per_image = weighted_cross_entropy(logits, target)
    pixel_mean = F.cross_entropy(logits, target, ignore_index=255)
    assert loss.item() == pytest.approx(per_image.mean().item())
    assert loss.item() != pytest.approx(pixel_mean.item())


def test_image_without_valid_pixels_contributes_nothing():
    target = torch.tensor([[[0, 255]], [[255, 255]]])
    loss, per_image = weighted_cross_entropy(_logits(), target, torch.tensor([1.0, 5.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert per_image[1] == 0.0


def test_all_ignore_batch_is_zero_with_a_gradient():
    logits = _logits()
    loss, per_image = weighted_cross_entropy(logits, torch.full((2, 1, 2), 255))
    assert loss.item() == 0.0 and torch.isfinite(per_image).all()
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradient_follows_the_weights():
    target = torch.tensor([[[0, 0]], [[1, 1]]])
    logits = _logits()
    loss, _ = weighted_cross_entropy(logits, target, torch.tensor([0.0, 1.0]))
    loss.backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def test_class_balanced_is_the_mean_of_each_class_mean():
    # class 0: three pixels (one ignored is not counted), class 1: one pixel
    target = torch.tensor([[[0, 0]], [[1, 0]]])
    logits = _logits()
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = (ce[target == 0].mean() + ce[target == 1].mean()) / 2
    loss = class_balanced_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(expected.item())
    # a rare class weighs as much as a common one: not the pixel mean
    assert loss.item() != pytest.approx(ce.mean().item())
    target[0, 0, 1] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = (ce[target == 0].mean() + ce[target == 1].mean()) / 2
    assert class_balanced_cross_entropy(logits, target).item() == pytest.approx(expected.item())


def test_class_balanced_counts_only_present_classes_and_has_gradients():
    logits = _logits()
    target = torch.tensor([[[1, 1]], [[1, 255]]])  # class 0 absent: the mean is class 1's
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    loss = class_balanced_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(ce[target == 1].mean().item())
    loss.backward()
    assert logits.grad[1, :, 0, 1].abs().sum() == 0 and logits.grad.abs().sum() > 0


def test_class_balanced_all_ignore_is_zero_with_a_gradient():
    logits = _logits()
    loss = class_balanced_cross_entropy(logits, torch.full((2, 1, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_balanced_rejects_a_mismatched_target():
    with pytest.raises(ValueError, match="does not match"):
        class_balanced_cross_entropy(_logits(), torch.zeros(2, 2, 2, dtype=torch.long))


def test_class_balanced_is_public():
    import dance
    assert dance.class_balanced_cross_entropy is class_balanced_cross_entropy
