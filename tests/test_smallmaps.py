"""The small-map shortcuts of a CPU training forward give the convolution's values and gradients,
take effect only inside their block and only in a training forward, and the trainer uses them."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dance
from dance.network.smallmaps import SmallMapConv2d, small_map_conv2d, small_map_convs


def _grads(fn, x, w, b):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]


CASES = [
    # (channels in, out, groups, kernel, stride, padding, dilation, map size)
    *[(c, c, c, 3, 1, d, d, hw) for c in (8, 24) for d in (1, 2, 6)
      for hw in ((1, 1), (1, 2), (2, 4), (3, 5), (6, 4))],  # depthwise, padded to keep size
    *[(8, 16, 1, 3, 1, d, d, hw) for d in (1, 2, 12) for hw in ((1, 2), (2, 4), (13, 3))],
    (8, 8, 8, 3, 2, 1, 1, (1, 2)), (8, 8, 8, 3, 2, 1, 1, (2, 5)),  # strided depthwise
    (8, 8, 8, 5, 1, 4, 2, (2, 3)), (8, 8, 8, 5, 1, 2, 1, (1, 4)),  # 5x5 kernels
    (8, 8, 8, 3, 1, 0, 1, (4, 4)), (8, 8, 8, 3, 1, (2, 1), 2, (2, 4)),  # other paddings
    (8, 16, 8, 3, 1, 2, 2, (1, 3)),  # grouped, not depthwise
    (8, 8, 8, 1, 1, 0, 1, (2, 3)),  # depthwise 1x1
    *[(64, 72, 1, 1, 1, 0, 1, hw) for hw in ((1, 1), (1, 2), (2, 4), (4, 5))],  # pointwise
    (24, 40, 1, 1, 1, 0, 1, (2, 4)), (64, 72, 1, 1, 2, 0, 1, (2, 4)),  # small; strided
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_small_map_conv2d_equals_conv2d_values_and_gradients(case, bias):
    cin, cout, groups, k, stride, padding, dilation, hw = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *hw, generator=g, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True) if bias else None
    ref, ref_grads = _grads(lambda *a: F.conv2d(*a, stride, padding, dilation, groups), x, w, b)
    got, got_grads = _grads(lambda *a: small_map_conv2d(*a, stride, padding, dilation, groups),
                            x, w, b)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_the_block_swaps_layers_and_always_restores_them():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, padding="same"),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    keys = list(model.state_dict())
    with small_map_convs(model) as n:
        assert n == 3  # not the string padding or the reflecting one
        assert [type(m) for m in model] == [SmallMapConv2d, SmallMapConv2d, SmallMapConv2d,
                                            nn.Conv2d, nn.Conv2d]
        assert list(model.state_dict()) == keys
    assert all(type(m) is nn.Conv2d for m in model)
    with pytest.raises(RuntimeError, match="boom"), small_map_convs(model):
        raise RuntimeError("boom")
    assert all(type(m) is nn.Conv2d for m in model)
    with small_map_convs(model, enabled=False) as n:
        assert n == 0 and all(type(m) is nn.Conv2d for m in model)


def test_only_a_training_forward_takes_the_shortcut(monkeypatch):
    import dance.network.smallmaps as sm
    calls = []
    monkeypatch.setattr(sm, "small_map_conv2d",
                        lambda *a: calls.append(1) or F.conv2d(*a))
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
    x = torch.randn(1, 4, 2, 3)
    with small_map_convs(conv), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation
        torch.jit.trace(conv.train(), x, check_trace=False)
        conv.eval()(x)
        assert calls == []
        conv.train()(x)
        assert calls == [1]


FAMILIES = [("deeplabv3plus_mbv2", {"width_mult": 0.5, "aspp_channels": 32,
                                    "decoder_channels": 32}),
            ("pspnet_r18", {}), ("bisenet_v1_r18", {}), ("hrnet_w18_small", {}),
            ("lraspp_mobilenet_v3_large", {})]


@pytest.mark.parametrize("name,options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_training_step_of_every_family_is_unchanged(name, options):
    """Loss and every gradient of a training forward and backward at crops whose deepest maps
    are 1x1 to 1x2 pixels, with and without the shortcuts, in float64: equal but for the order
    of sums (in float32 the tiny BatchNorm batches of such maps amplify that order's rounding
    to 3e-4 of the largest gradient, which is why the comparison is made in float64)."""
    torch.manual_seed(0)
    model = dance.build_model(name, 5, **options).train().double()
    x = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 32, 48))
    results = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)  # the same dropout masks
        with small_map_convs(model, enabled) as n:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((n, loss.detach(), {k: p.grad.clone() for k, p in
                                           model.named_parameters() if p.grad is not None}))
        model.load_state_dict(state)  # BatchNorm statistics as they were
    (n0, loss0, grads0), (n1, loss1, grads1) = results
    assert n0 == 0 and n1 > 0
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    assert grads1.keys() == grads0.keys()
    scale = max(g.abs().max().item() for g in grads0.values())
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("case,expected", [
    ((64, 64, 1, 3, 1, 12, 12, (1, 2)), []),  # ASPP-like: the middle tap left, a matrix product
    ((8, 16, 1, 3, 1, 12, 12, (1, 2)), [(1, 1, 1)]),  # the middle tap left, too few weights
    ((64, 64, 1, 3, 1, 12, 12, (3, 4)), [(3, 1, 1)]),  # the middle tap left, too many pixels
    ((64, 64, 1, 1, 1, 0, 1, (2, 4)), []),  # pointwise on 8 pixels: a matrix product
    ((64, 64, 1, 1, 1, 0, 1, (3, 3)), [(3, 1, 1)]),  # pointwise on 9 pixels: as usual
    ((64, 64, 1, 1, 1, 0, 1, (1, 1)), [(1, 1, 1)]),  # on one pixel: as usual
    ((8, 8, 8, 3, 1, 6, 6, (1, 2)), []),  # depthwise left 1x1: a per-channel product
    ((8, 8, 8, 3, 1, 2, 2, (2, 4)), []),  # depthwise left one dilated row: a shifted sum
    ((8, 8, 8, 3, 1, 1, 1, (2, 4)), [(3, 3, 3)]),  # depthwise shorter than its kernel: padded
    ((8, 8, 8, 3, 1, 1, 1, (4, 4)), [(4, 3, 3)]),  # nothing to rewrite
])
def test_each_rewrite_is_the_one_taken(case, expected, monkeypatch):
    """(map height, kernel height, kernel width) of every convolution actually run."""
    cin, cout, groups, k, stride, padding, dilation, hw = case
    seen, conv2d = [], F.conv2d

    def spy(x, w, *a):
        seen.append((x.shape[-2], *w.shape[-2:]))
        return conv2d(x, w, *a)
    monkeypatch.setattr(F, "conv2d", spy)
    small_map_conv2d(torch.randn(1, cin, *hw), torch.randn(cout, cin // groups, k, k), None,
                     stride, padding, dilation, groups)
    assert seen == expected


def test_a_channels_last_input_gives_the_same_values():
    """The trainer's channels-last option hands layers channels-last maps: each rewrite reads
    them as the convolution does."""
    g = torch.Generator().manual_seed(0)
    for cin, cout, groups, k, padding, dilation, hw in ((64, 72, 1, 1, 0, 1, (2, 4)),
                                                        (8, 8, 8, 3, 2, 2, (2, 4)),
                                                        (8, 16, 1, 3, 6, 6, (1, 2))):
        x = torch.randn(2, cin, *hw, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin // groups, k, k, generator=g)
        torch.testing.assert_close(small_map_conv2d(x, w, None, 1, padding, dilation, groups),
                                   F.conv2d(x, w, None, 1, padding, dilation, groups),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [(0, 0), (0, 1), (0, 2), (1, 2)], ids=str)
def test_one_row_kernels_of_any_padding(padding):
    """A depthwise layer built with a 1x3 dilated kernel is a shifted sum only when padded to
    keep its size; any other padding gives the convolution's own output shape and values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 2, 9, generator=g, requires_grad=True)
    w = torch.randn(8, 1, 1, 3, generator=g, requires_grad=True)
    ref, ref_grads = _grads(lambda *a: F.conv2d(*a, 1, padding, 2, 8), x, w, None)
    got, got_grads = _grads(lambda *a: small_map_conv2d(*a, 1, padding, 2, 8), x, w, None)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
