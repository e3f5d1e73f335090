"""Structural channel slimming (docs/method.md#channel-slimming).

A *channel group* is a set of channels that can only be removed together: the output channels of a
convolution and its BatchNorm, every layer that reads them (sliced on its input side), and, where
tensors meet, every other producer coupled to them: the streams summed by a residual addition
(ResNet, MobileNet's inverted residuals, HRNet's fusion), both sides of an elementwise product
(attention, squeeze-excitation), the in/out channels of a depthwise convolution, and the slice of a
concatenation (ASPP's projection, the DeepLabV3+ decoder input, BiSeNet's fusion, HRNet's head).
The groups are found by Torch-Pruning's dependency graph (``torch-pruning`` on PyPI; Fang et al.,
"DepGraph", CVPR 2023), which traces one forward pass; it also does the surgery. The tests check,
per model family, that removing a group equals masking it to zero (to 1e-5), which is what proves
the grouping right through each family's concatenations.

Removal is recorded in the model's architecture (``model.dance_arch.removed``) as
``{"layer": <root convolution's path>, "channels": [indices]}`` in order with the removed
branches, so a checkpoint rebuilds the slimmed shapes by replaying the record on a fresh model
(``replay``): no pickled modules.

Groups whose channels reach the logits (the classifiers, and anything added to them) are never
slimmed, nor is a group that passes a GroupNorm (its width must stay a multiple of the norm's
groups; FPN-style decoders of segmentation_models.pytorch), nor a group below ``ROUND_TO``
channels; removal keeps every group's width a multiple of ``ROUND_TO`` (8), so slimmed shapes
stay fast on real hardware.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from dance.errors import DanceError
from dance.network.flops import architecture_signature, sites_of

ROUND_TO = 8
# The dependency graph does not depend on the input size; trace on a small one (every model's
# coarsest feature map is still at least 2x2 at 64x64).
_TRACE_SHAPE = (1, 3, 64, 64)
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COSTED = (nn.Conv2d, nn.BatchNorm2d)  # the layers whose activations a channel's cost counts


@dataclass
class ChannelGroup:
    """One removable channel group of a model as it is now.

    ``layer`` is the path of its root convolution (the one ``remove_channels`` names),
    ``channels`` its width, ``layers`` every layer whose output channels it removes, ``bns`` the
    BatchNorms among them (whose scales the sparsity term pushes down), and
    ``gflops_per_channel`` the inference GFLOPs one of its channels costs at the shape it was
    measured at (every layer it touches, counted per channel: linear in the channels removed,
    exact for one group at a time), ``melems_per_channel`` the million activation elements one
    of its channels makes an inference write (in its convolutions and BatchNorms) and read (in
    the dense convolutions that consume it).
    """

    layer: str
    channels: int
    layers: list[str]
    bns: list[str]
    gflops_per_channel: float
    melems_per_channel: float = 0.0

    def cost(self, memory_weight: float = 0.0) -> float:
        """What one channel costs in the slimmer's ranking: its GFLOPs plus ``memory_weight``
        GFLOPs per million activation elements it moves (docs/method.md#channel-cost)."""
        return self.gflops_per_channel + memory_weight * self.melems_per_channel

    def chunk(self, round_to: int = ROUND_TO) -> int:
        """How many channels the next removal takes (``chunk_size``)."""
        return chunk_size(self.channels, round_to)


def chunk_size(width: int, round_to: int = ROUND_TO) -> int:
    """How many channels a removal from a group of ``width`` takes: down to the next multiple of
    ``round_to`` below ``width`` (0 when that would leave fewer than ``round_to``)."""
    keep = (width - 1) // round_to * round_to
    return width - keep if keep >= round_to else 0


class _Graph:
    """Torch-Pruning's dependency graph of one architecture state, with its prunable groups."""

    def __init__(self, model: nn.Module):
        self.model = model
        first = next(model.parameters())
        device, dtype = first.device, first.dtype
        gates = [p for p in model.parameters() if p.dim() == 0]
        was_training = model.training
        model.eval()  # tracing runs a forward: BatchNorm statistics must not move
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.dg = tp.DependencyGraph().build_dependency(
                    model, torch.zeros(_TRACE_SHAPE, device=device, dtype=dtype),
                    ignored_params=gates,
                    verbose=False)
        finally:
            model.train(was_training)
        self.names = {m: n for n, m in model.named_modules()}
        self.outputs = output_layers(model)  # modules stay the same through channel removals
        # the groups' roots, which channel removals never change (a removal keeps every layer)
        self.roots: frozenset[str] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Mark the groups stale after a removal made through this graph: Torch-Pruning keeps
        its graph valid across its own surgery (a branch removal, which swaps modules, needs a
        new trace; the signature check sees to that). They are re-read when next asked for, so a
        run of removals (a checkpoint's record replayed, a pruning point's chunks) re-reads them
        once."""
        self.signature = architecture_signature(self.model)
        self._groups: dict[str, tp.Group] | None = None

    @property
    def groups(self) -> dict[str, tp.Group]:
        """The removable groups as the model is now, by root layer."""
        if self._groups is None:
            self._groups = {}
            for group in self.dg.get_all_groups(ignored_layers=self.outputs,
                                                root_module_types=[nn.Conv2d]):
                if any(isinstance(dep.target.module, nn.GroupNorm) for dep, _ in group):
                    continue  # its width must stay a multiple of the norm's groups: left whole
                root = group[0].dep.target.module
                self._groups[self.names[root]] = group
            if self.roots is None:
                self.roots = frozenset(self._groups)
        return self._groups

    def out_items(self, group: tp.Group) -> list[tuple[str, nn.Module]]:
        """The layers whose output channels ``group`` removes, with their paths."""
        seen, items = set(), []
        for dep, _ in group:
            module = dep.target.module
            if (isinstance(module, nn.Module) and self.dg.is_out_channel_pruning_fn(dep.handler)
                    and id(module) not in seen and module in self.names):
                seen.add(id(module))
                items.append((self.names[module], module))
        return items

    def in_items(self, group: tp.Group) -> list[tuple[str, nn.Module]]:
        """The convolutions that read ``group``'s channels (sliced on their input side)."""
        seen, items = set(), []
        for dep, _ in group:
            module = dep.target.module
            if (isinstance(module, nn.Conv2d) and module.groups == 1
                    and not self.dg.is_out_channel_pruning_fn(dep.handler)
                    and id(module) not in seen):
                seen.add(id(module))
                items.append((self.names[module], module))
        return items

    def group(self, layer: str, channels: Sequence[int]) -> tp.Group:
        """The pruning group of ``layer``'s output ``channels``; a DanceError when ``layer`` is not
        the root of a removable group or an index is out of range."""
        roots = self.roots if self.roots is not None else frozenset(self.groups)
        if layer not in roots:
            raise DanceError(f"{layer!r} is not the root convolution of a removable channel group; "
                             f"the model has {', '.join(self.groups) or 'none'}")
        module = self.model.get_submodule(layer)
        width = module.out_channels
        bad = [c for c in channels if not 0 <= c < width]
        if bad or len(set(channels)) != len(channels):
            raise DanceError(f"{layer}: channel indices must be distinct and in [0, {width}), "
                             f"got {sorted(channels)}")
        if len(channels) >= width:
            raise DanceError(f"{layer}: cannot remove all {width} channels of its group")
        pruner = self.dg.get_pruner_of_module(module)
        return self.dg.get_pruning_group(module, pruner.prune_out_channels, list(channels))


def _graph(model: nn.Module) -> _Graph:
    cached = _GRAPHS.get(model)
    if cached is None or cached.signature != architecture_signature(model):
        cached = _GRAPHS[model] = _Graph(model)
    return cached


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions that produce the logits: those whose outputs reach the model's output
    through no other convolution (the classifiers, both of LR-ASPP's, an auxiliary head's). Found
    by one forward pass at a small size, walking the autograd graph back from the output; not by
    channel count, which a hidden layer may share with the classes."""
    arch = getattr(model, "dance_arch", None)
    if arch is None:
        raise DanceError(f"{type(model).__name__}: channel slimming needs to know which layers "
                         "give the logits: build the model with dance.build_model, or prepare "
                         "yours with dance.slimmable(model, num_classes)")
    made: dict = {}  # autograd node of a convolution's output -> the convolution

    def record(module: nn.Module, _, out) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made[out.grad_fn] = module

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    first = next(model.parameters())
    was_training = model.training
    model.eval()  # BatchNorm statistics must not move
    try:
        with torch.enable_grad():
            x = torch.zeros(_TRACE_SHAPE, device=first.device, dtype=first.dtype,
                            requires_grad=True)
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    stack = [t.grad_fn for t in _tensors(out)]
    seen, found = set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made:
            if made[node] not in found:
                found.append(made[node])
            continue
        stack.extend(f for f, _ in node.next_functions)
    if not found:
        raise DanceError(f"{type(model).__name__}: no convolution produces its output; channel "
                         "slimming needs the logits to come from a Conv2d")
    return found


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or a dict, list or tuple of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def layer_costs(model: nn.Module, input_shape: Sequence[int]
                ) -> dict[str, tuple[float, float, float]]:
    """Per convolution and BatchNorm of ``model`` at ``input_shape``, by path: its inference
    GFLOPs (multiply-add = 2, like dance's FLOPs counter; 0 for a BatchNorm), and the million
    activation elements it writes per output channel and reads per input channel (``N·H·W``);
    from the layers' sites (``sites_of``)."""
    out: dict[str, tuple[float, float, float]] = {}
    modules = dict(model.named_modules())
    for name, m, c in sites_of(model, input_shape).each(modules, _COSTED):
        flops = 0.0
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            flops = 2.0 * (c.out_per_channel * m.out_channels) * k / 1e9
        prev = out.get(name, (0.0, 0.0, 0.0))
        out[name] = (prev[0] + flops, prev[1] + c.out_per_channel / 1e6,
                     prev[2] + c.in_per_channel / 1e6)
    return out


def activation_traffic(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Million activation elements one inference at ``input_shape`` writes in its convolutions
    and BatchNorms and reads in its dense (not depthwise) convolutions: what a channel group's
    ``melems_per_channel`` counts, summed over the model (docs/method.md#channel-cost)."""
    total = 0.0
    for name, (_, out_per, in_per) in layer_costs(model, input_shape).items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            total += out_per * m.out_channels + (in_per * m.in_channels if m.groups == 1 else 0.0)
        else:
            total += out_per * m.num_features
    return total


def channel_groups(model: nn.Module, input_shape: Sequence[int] = (1, 3, 512, 1024)
                   ) -> list[ChannelGroup]:
    """Every removable channel group of ``model`` as it is now, with what a channel of it costs
    at ``input_shape``."""
    g = _graph(model)
    costs = layer_costs(model, input_shape)
    none = (0.0, 0.0, 0.0)
    groups = []
    for layer, group in g.groups.items():
        outs, ins = g.out_items(group), g.in_items(group)
        gflops = sum(costs.get(n, none)[0] / m.out_channels for n, m in outs
                     if isinstance(m, nn.Conv2d))
        gflops += sum(costs.get(n, none)[0] / m.in_channels for n, m in ins)
        melems = sum(costs.get(n, none)[1] for n, m in outs if isinstance(m, _COSTED))
        melems += sum(costs.get(n, none)[2] for n, _ in ins)
        groups.append(ChannelGroup(
            layer=layer, channels=model.get_submodule(layer).out_channels,
            layers=[n for n, _ in outs],
            bns=[n for n, m in outs if isinstance(m, nn.BatchNorm2d)],
            gflops_per_channel=gflops, melems_per_channel=melems))
    return groups


def channel_importance(model: nn.Module, kind: str = "taylor") -> dict[str, torch.Tensor]:
    """Per removable group (by root layer), the importance of each of its channels, on the CPU.

    ``"taylor"``: the first-order estimate of the loss change when the channel is removed, summed
    over the group, from the gradients the parameters hold now (Molchanov et al., CVPR 2019);
    comparable across groups (units of loss). ``"bn_scale"``: the sum of the group's BatchNorm
    scales ``|gamma|`` (Network Slimming, Liu et al. 2017); groups without a BatchNorm get
    ``inf`` (never chosen). Both through Torch-Pruning's group importances, unnormalised.
    """
    g = _graph(model)
    if kind == "taylor":
        scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    elif kind == "bn_scale":
        scorer = tp.importance.BNScaleImportance(group_reduction="sum", normalizer=None)
    else:
        raise DanceError(f"channel importance must be taylor or bn_scale, got {kind!r}")
    out = {}
    for layer, group in g.groups.items():
        width = model.get_submodule(layer).out_channels
        try:
            imp = scorer(group)
        except (RuntimeError, IndexError):
            # Torch-Pruning cannot map this group's indices (seen: a depthwise convolution over a
            # concatenation, in smp's DeepLabV3+ decoder): it is never chosen, so never cut wrong
            imp = None
        if imp is None or len(imp) != width:
            imp = torch.full((width,), float("inf"))
        out[layer] = imp.detach().float().cpu()
    return out


def taylor_importance(model: nn.Module, batches, loss_fn, per_batch: bool = False
                      ) -> dict[str, torch.Tensor]:
    """``channel_importance(model, "taylor")`` from the gradients of ``loss_fn`` over
    ``batches`` (``(input, target)`` pairs): of their mean loss, or with ``per_batch`` of each
    batch's loss, averaged over the batches. The model's gradients are cleared before and after;
    its train/eval mode is the caller's."""
    rounds = [[b] for b in batches] if per_batch else [list(batches)]
    total: dict[str, torch.Tensor] = {}
    try:
        for group in rounds:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for x, y in group:
                    (loss_fn(model(x), y) / len(group)).backward()
            for layer, imp in channel_importance(model, "taylor").items():
                total[layer] = total[layer] + imp if layer in total else imp
    finally:
        model.zero_grad(set_to_none=True)
    return {layer: imp / len(rounds) for layer, imp in total.items()}


def remove_channels(model: nn.Module, layer: str, channels: Iterable[int]) -> nn.Module:
    """Remove output ``channels`` of the group rooted at ``layer`` structurally, in place, with
    every layer coupled to them; record it in ``model.dance_arch.removed``. Bad names or indices
    are DanceErrors raised before anything changes."""
    channels = sorted(int(c) for c in channels)
    graph = _graph(model)
    group = graph.group(layer, channels)
    with torch.no_grad():
        group.prune(record_history=False)
    arch = getattr(model, "dance_arch", None)
    if arch is not None:  # recorded first: the architecture key (flops.py) reads the record
        arch.removed.append({"layer": layer, "channels": channels})
    graph.refresh()
    _check_concats(model)
    return model


@torch.no_grad()
def mask_channels(model: nn.Module, layer: str, channels: Iterable[int]) -> nn.Module:
    """Zero the channels ``remove_channels`` would remove, in place, without changing shapes:
    every coupled convolution's and BatchNorm's output weights and biases. In eval mode the model
    then computes what its slimmed copy computes."""
    channels = sorted(int(c) for c in channels)
    g = _graph(model)
    group = g.group(layer, channels)
    for dep, idxs in group:
        module = dep.target.module
        if not (isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
                and g.dg.is_out_channel_pruning_fn(dep.handler)):
            continue
        idx = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        module.weight[idx] = 0
        if module.bias is not None:
            module.bias[idx] = 0
    return model


def _check_concats(model: nn.Module) -> None:
    """Every gated concatenation must still add up after a removal (its branch bookkeeping reads
    the branches' widths); a mismatch is a bug, caught here rather than at the next branch
    removal."""
    from dance.network.gates import GatedBranches
    for path, m in model.named_modules():
        if isinstance(m, GatedBranches) and m.project is not None:
            total = sum(m.out_channels(n) for n in m.branches)
            conv = m._projection_conv()[2]
            if total != conv.in_channels:
                raise RuntimeError(f"{path}: branches give {total} channels, the projection "
                                   f"reads {conv.in_channels}")


def replay(model: nn.Module, removed: Sequence[str | dict]) -> nn.Module:
    """Apply an architecture record (``Architecture.removed``: branch names and channel
    removals, in order) to a freshly built model, in place."""
    from dance.network.gates import remove_branches
    for entry in removed:
        if isinstance(entry, str):
            remove_branches(model, [entry])
        else:
            remove_channels(model, entry["layer"], entry["channels"])
    return model
