"""Layers whose parameters carry a leading member dimension: M networks computed as one.

A population (spec populations.md) is M independent networks of the same shape.  These
layers hold member k's parameters at index k of every parameter and take inputs
``[M, batch, ...]``: member k's rows meet only member k's weights (a batched matmul,
a grouped convolution), so the members never mix.  Adam is elementwise, so one
optimiser over these parameters is M independent Adams, and summing the members'
losses gives each member its own gradient.

Methods and diagnostics see every weight-carrying layer through a member view (a
view, so in-place writes land in the layer):

    weight_view(layer)      [M, out, fan_in...]   rows are output units
    bias_view(layer)        [M, out] or None
    as_weight_view(layer, t) the same view of any tensor shaped like the weight
                             parameter (its gradient, its Adam moments)

An ordinary ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm`` is a population of one
(``weight.unsqueeze(0)``), so every method works on any PyTorch model too.

Member k's slice of every parameter is what the ordinary layer holds (``weight [M, out, in]``).
With one member the layers call the plain kernels (``F.linear``, ``conv2d``, ``layer_norm``),
as fast as ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm``; with several, a batched matmul whose
backward writes each gradient in its parameter's layout, and a grouped convolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Generators = Sequence[torch.Generator] | None


def _draw(shape: Sequence[int], bound: float, generators: Generators, members: int) -> torch.Tensor:
    """[M, *shape] uniform in [-bound, bound): member k drawn from ``generators[k]`` (CPU, then moved)."""
    out = torch.empty(members, *shape)
    for k in range(members):
        out[k].uniform_(-bound, bound, generator=None if generators is None else generators[k])
    return out


def _one_member(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """The one member's parameters without the member dim (views, for the plain kernels).

    With gradients: fresh ``squeeze`` views (autograd sees them).  Without (acting, targets):
    views made once and kept while the parameters keep their storage, so a no-grad forward
    does not pay two view ops per layer (~10 us per env step on the MNIST MLP).
    """
    if torch.is_grad_enabled() or not isinstance(weight, nn.Parameter):  # functional_call, torch.func: fresh
        return weight.squeeze(0), None if bias is None else bias.squeeze(0)
    key = (weight.data_ptr(), weight.stride(), None if bias is None else bias.data_ptr())
    cache = module.__dict__.get("_one_member_views")
    if cache is None or cache[0] != key:  # new storage (.to(), .data =): views of it
        views = (weight.detach().squeeze(0), None if bias is None else bias.detach().squeeze(0))
        cache = module.__dict__["_one_member_views"] = (key, views)
    return cache[1]


def _check_generators(generators: Generators, members: int) -> None:
    if members < 1:
        raise ValueError(f"a population needs at least one member; got members={members}")
    if generators is not None and len(generators) != members:
        raise ValueError(f"one generator per member: got {len(generators)} for {members} members")


class _BatchedLinear(torch.autograd.Function):
    """``x [M, B, in] @ weight[M, out, in]^T + bias`` with a backward that writes the weight gradient as
    ``[M, out, in]`` directly: autograd's own backward of the transposed batched matmul makes a
    transposed copy, ~1.5x slower over a 16-member update (measured on this CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        # Under autocast (--bf16) the forward ran in bfloat16: the gradients follow the inputs' dtypes.
        grad_x = torch.bmm(grad, weight.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x.to(grad.dtype)).to(weight.dtype)
        grad_bias = grad.sum(1).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class MemberLinear(nn.Module):
    """M linear layers: ``x [M, B, in] -> [M, B, out]``; PyTorch's default init, member k from generator k.

    ``weight [M, out, in]``, ``bias [M, out]``: member k's slice is an ``nn.Linear``'s parameters.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True,
                 generators: Generators = None):
        super().__init__()
        _check_generators(generators, members)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = nn.Parameter(_draw((out_features, in_features), bound, generators, members))
        self.bias = nn.Parameter(_draw((out_features,), bound, generators, members)) if bias else None

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.shape[0] == 1:
            # squeeze, not [0]: indexing's backward writes a zero-filled copy of every weight gradient.
            # F.linear keeps the leading member dim of x itself.
            return F.linear(x, *_one_member(self, weight, bias))
        return _BatchedLinear.apply(x, weight, bias)

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class MemberConv2d(nn.Module):
    """M convolutions: ``x [M, B, C, H, W] -> [M, B, C', H', W']`` as one grouped convolution.

    ``weight [M, out, in, kh, kw]``.  With one member: a plain ``conv2d`` (channels-last when
    ``channels_last``, the faster layout of oneDNN/cuDNN, measured ~14% on a Nature-CNN update).
    """

    def __init__(self, members: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, generators: Generators = None):
        super().__init__()
        _check_generators(generators, members)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kernel_size, kernel_size), stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        self.weight = nn.Parameter(_draw((out_channels, in_channels, kernel_size, kernel_size), bound, generators,
                                         members))
        self.bias = nn.Parameter(_draw((out_channels,), bound, generators, members))
        self.channels_last = False

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        members, batch = weight.shape[0], x.shape[1]
        if members == 1:  # [1, B, C, H, W], or [B, C, H, W] inside a one-member torso
            inputs, (kernel, one_bias) = (x if x.dim() == 4 else x.squeeze(0)), _one_member(self, weight, bias)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
                kernel = kernel.contiguous(memory_format=torch.channels_last)
            out = F.conv2d(inputs, kernel, one_bias, self.stride, self.padding)
            return out if x.dim() == 4 else out.unsqueeze(0)
        grouped = x.transpose(0, 1).reshape(batch, members * self.in_channels, *x.shape[3:])
        out = F.conv2d(grouped, weight.reshape(members * self.out_channels, *weight.shape[2:]), bias.reshape(-1),
                       self.stride, self.padding, groups=members)
        return out.view(batch, members, self.out_channels, *out.shape[2:]).transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"members={self.members}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MemberLayerNorm(nn.Module):
    """M LayerNorms over the trailing ``normalized_shape`` dims of ``x [M, B, *normalized_shape]``."""

    def __init__(self, members: int, normalized_shape: Sequence[int] | int, eps: float = 1e-5):
        super().__init__()
        _check_generators(None, members)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = nn.Parameter(torch.ones(members, *shape))
        self.bias = nn.Parameter(torch.zeros(members, *shape))

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == 1:
            return F.layer_norm(x, self.normalized_shape, *_one_member(self, self.weight, self.bias), self.eps)
        expand = (x.shape[0], 1, *self.normalized_shape)
        normed = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return torch.addcmul(self.bias.view(expand), normed, self.weight.view(expand))

    def extra_repr(self) -> str:
        return f"members={self.members}, {self.normalized_shape}, eps={self.eps}"


MEMBER_WEIGHT_LAYERS = (MemberLinear, MemberConv2d)
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, *MEMBER_WEIGHT_LAYERS)
NORM_LAYERS = (nn.LayerNorm, MemberLayerNorm)
LINEAR_LAYERS = (nn.Linear, MemberLinear)
CONV_LAYERS = (nn.Conv2d, MemberConv2d)


def is_member_module(module: nn.Module) -> bool:
    """Whether ``module`` is a member layer (its parameters carry the member dimension).

    Other modules whose parameters are member-first (Parseval's diagonal layers) say so with a
    class attribute ``member_module = True``.
    """
    return isinstance(module, (*MEMBER_WEIGHT_LAYERS, MemberLayerNorm)) or getattr(module, "member_module", False)


def weight_param(layer: nn.Module) -> nn.Parameter:
    """The Parameter holding ``layer``'s weight (what an optimiser's state is keyed on)."""
    return layer.weight


def as_weight_view(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``weight_param(layer)``) as ``[M, out, fan_in...]``; a view."""
    return tensor if is_member_module(layer) else tensor.unsqueeze(0)


def weight_view(layer: nn.Module) -> torch.Tensor:
    """``[M, out, fan_in...]`` view of a Linear/Conv2d/LayerNorm weight (plain layers: M = 1)."""
    return as_weight_view(layer, weight_param(layer))


def bias_view(layer: nn.Module) -> torch.Tensor | None:
    """``[M, out...]`` view of the bias, or None."""
    if layer.bias is None:
        return None
    return layer.bias if isinstance(layer, (*MEMBER_WEIGHT_LAYERS, MemberLayerNorm)) else layer.bias.unsqueeze(0)


def out_units(layer: nn.Module) -> int:
    """Output units (features of a linear layer, channels of a convolution)."""
    return layer.out_features if isinstance(layer, LINEAR_LAYERS) else layer.out_channels


def fan_in(layer: nn.Module) -> int:
    """Inputs of one output unit (in_features, or in_channels * kh * kw)."""
    return math.prod(weight_view(layer).shape[2:])


def members_of(model: nn.Module) -> int:
    """M of a model built from member layers (1 for an ordinary model)."""
    for module in model.modules():
        if isinstance(module, (*MEMBER_WEIGHT_LAYERS, MemberLayerNorm)):
            return module.members
    return 1


def member_parameters(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Member ``index``'s parameters and buffers as a one-member population (``functional_call``-ready views).

    ``torch.func.functional_call(model, member_parameters(model, k), (x[k:k+1],))`` is member k
    alone: the layers read M from their parameters.  Ordinary models: their own tensors.
    """
    members = members_of(model)
    if members == 1:
        return dict(model.named_parameters()) | dict(model.named_buffers())
    sliced = {}
    member_modules = {name for name, m in model.named_modules() if is_member_module(m)}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        sliced[name] = tensor[index:index + 1] if owner in member_modules else tensor
    return sliced
