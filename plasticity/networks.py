"""Torsos, and the layer map every method and diagnostic uses (on any model, not only these torsos).

Every torso is an ``nn.Sequential`` whose hidden blocks are
``Linear/Conv2d -> LayerNorm (or Identity) -> ReLU`` (spec methods.md §1: LN on the
pre-activation, never on the output layer, conv LN over (C, H, W)).  Layers are
addressable by their module name, e.g. ``torso.0`` when the torso is stored as
``self.torso`` in a Q-network.

``hidden_layers(model)`` discovers those blocks by walking the model's modules in
registration order, so a model must register its modules in forward order
(torso first, then head) -- both agents do, and so does ``nn.Sequential(torso, head)``.

``torso_precision(torch.bfloat16)`` runs every torso's layers under autocast inside
a block (the agents' ``--bf16`` updates); features leave the torso as float32, so
heads, losses and whatever else reads them stay float32.
"""

from __future__ import annotations

import contextvars
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from plasticity.population import (
    CONV_LAYERS,
    NORM_LAYERS,
    WEIGHT_LAYERS,
    Generators,
    MemberConv2d,
    MemberLayerNorm,
    MemberLinear,
    bias_view,
    fan_in,
    members_of,
    out_units,
    weight_view,
)
from plasticity.streams import MemberRandom

NETWORK_NAMES = ("nature_cnn", "mlp", "cnn")

_torso_dtype: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("torso_dtype", default=None)


@contextmanager
def torso_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside this block every Torso computes in ``dtype`` autocast (None: float32, a no-op).

    Only the torso: its output is cast back to float32, so the head, Q-values, logits
    and losses keep full precision, and passes outside the block (acting, target
    updates, diagnostics, resets) are untouched.  Weights, gradients and optimiser
    state stay float32 -- autocast casts a copy of each weight per forward.
    """
    token = _torso_dtype.set(dtype)
    try:
        yield
    finally:
        _torso_dtype.reset(token)


class Torso(nn.Sequential):
    """An ``nn.Sequential`` of member layers that knows the width of its output (the features Φ).

    Inputs and outputs carry the member dimension: ``[M, batch, ...] -> [M, batch, out_features]``.
    With one member the layers inside run on ``[batch, ...]`` (a hook on one of them sees no member
    dim; ``ActivationRecorder`` adds it back), and conv torsos run channels-last (oneDNN/cuDNN
    convolutions are faster in that layout: a Nature-CNN DQN update ~14% on CPU).
    """

    def __init__(self, *modules: nn.Module, out_features: int, members: int = 1):
        super().__init__(*modules)
        self.out_features, self.members = out_features, members
        convs = [m for m in modules if isinstance(m, MemberConv2d)]
        self.channels_last = bool(convs) and convs[0].members == 1
        for conv in convs:
            conv.channels_last = self.channels_last
            if self.channels_last:  # stored channels-last, so no forward copies the kernel into that layout
                with torch.no_grad():
                    conv.weight.data = conv.weight.data.squeeze(0).contiguous(
                        memory_format=torch.channels_last).unsqueeze(0)

    def use_default_layout_(self) -> Torso:
        """Keep inputs in the default (NCHW) layout from now on, in place.

        For copies run under ``torch.func`` transforms: ``vmap`` cannot make channels-last
        copies of batched tensors (the eNTK's per-sample gradients).  Same values, same math.
        """
        self.channels_last = False
        for module in self:
            if isinstance(module, MemberConv2d):
                module.channels_last = False
                module.weight.data = module.weight.data.contiguous()
        return self

    def scale_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``[M, B, ...]`` -> float32 in [0, 1], in this torso's layout.

        The layout changes while the pixels are still uint8: a quarter of the bytes a
        float32 copy would move (measured: ~0.2 ms of an 18 ms CPU update).
        """
        if self.channels_last:
            x = x[0].contiguous(memory_format=torch.channels_last).unsqueeze(0)
        return x.to(torch.float32, copy=True).div_(255.0)  # keeps the layout; never scales the caller's tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One member: the layers run on [B, ...] inside (the plain kernels, and no reshape of every
        # layer's input in the graph: 13 fewer autograd nodes in an MNIST update); the member dim
        # comes back at the output.
        one = self.members == 1
        if one:
            x = x.squeeze(0)
        dtype = _torso_dtype.get()
        if dtype is None:
            out = super().forward(x)
        else:
            with torch.autocast(x.device.type, dtype=dtype):
                out = super().forward(x).float()
        return out.unsqueeze(0) if one else out


def _block(layer: nn.Module, norm_shape: Sequence[int] | int | None, members: int) -> list[nn.Module]:
    # Without LN an Identity holds the norm's slot, so a layer has the same module name
    # (``torso.3``) with and without --layer-norm and per-layer curves line up across variants.
    norm = MemberLayerNorm(members, norm_shape) if norm_shape is not None else nn.Identity()
    return [layer, norm, nn.ReLU()]


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _flatten(members: int) -> nn.Flatten:
    return nn.Flatten(start_dim=1 if members == 1 else 2)  # keeps [B] (one member, see Torso) or [M, B]


def nature_cnn(in_channels: int = 4, height: int = 84, width: int = 84, layer_norm: bool = False,
               members: int = 1, generators: Generators = None) -> Torso:
    """Mnih et al. 2015: conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 -> FC 512 (inputs already scaled)."""
    modules: list[nn.Module] = []
    channels, h, w = in_channels, height, width
    for out_channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
        h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
        conv = MemberConv2d(members, channels, out_channels, kernel, stride, generators=generators)
        modules += _block(conv, [out_channels, h, w] if layer_norm else None, members)
        channels = out_channels
    modules.append(_flatten(members))
    modules += _block(MemberLinear(members, channels * h * w, 512, generators=generators),
                      512 if layer_norm else None, members)
    return Torso(*modules, out_features=512, members=members)


def mlp(obs_shape: Sequence[int], hidden_sizes: Sequence[int] = (256, 256), layer_norm: bool = False,
        members: int = 1, generators: Generators = None) -> Torso:
    """Flatten -> [Linear -> (LN) -> ReLU] x len(hidden_sizes)."""
    modules: list[nn.Module] = [_flatten(members)]
    width = math.prod(obs_shape)
    for size in hidden_sizes:
        modules += _block(MemberLinear(members, width, size, generators=generators), size if layer_norm else None,
                          members)
        width = size
    return Torso(*modules, out_features=width, members=members)


def small_cnn(obs_shape: Sequence[int], layer_norm: bool = False, channels: Sequence[int] = (32, 64),
              hidden_size: int = 256, members: int = 1, generators: Generators = None) -> Torso:
    """Small CNN for 28x28 / 32x32 images: conv 3x3 (stride 2, pad 1) per entry of ``channels`` -> FC."""
    in_channels, h, w = obs_shape
    modules: list[nn.Module] = []
    for out_channels in channels:
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        conv = MemberConv2d(members, in_channels, out_channels, 3, stride=2, padding=1, generators=generators)
        modules += _block(conv, [out_channels, h, w] if layer_norm else None, members)
        in_channels = out_channels
    modules.append(_flatten(members))
    modules += _block(MemberLinear(members, in_channels * h * w, hidden_size, generators=generators),
                      hidden_size if layer_norm else None, members)
    return Torso(*modules, out_features=hidden_size, members=members)


def default_network(obs_shape: Sequence[int]) -> str:
    """Atari-style stacks (4x84x84) get the Nature CNN; small images and vectors an MLP."""
    if len(obs_shape) == 3 and obs_shape[1] >= 64 and obs_shape[2] >= 64:
        return "nature_cnn"
    return "mlp"


def build_torso(name: str, obs_shape: Sequence[int], layer_norm: bool = False,
                hidden_sizes: Sequence[int] = (256, 256), members: int = 1, generators: Generators = None) -> Torso:
    """Build a torso by name (``nature_cnn``, ``mlp`` or ``cnn``) for observations of ``obs_shape``.

    ``members`` networks at once (a population); member k's weights drawn from ``generators[k]``
    (None: the global torch generator), in module order.
    """
    if name == "nature_cnn":
        if len(obs_shape) != 3:
            raise ValueError(f"--network nature_cnn needs image observations (C, H, W); got shape {tuple(obs_shape)}")
        return nature_cnn(obs_shape[0], obs_shape[1], obs_shape[2], layer_norm=layer_norm, members=members,
                          generators=generators)
    if name == "mlp":
        return mlp(obs_shape, hidden_sizes, layer_norm=layer_norm, members=members, generators=generators)
    if name == "cnn":
        if len(obs_shape) != 3:
            raise ValueError(f"--network cnn needs image observations (C, H, W); got shape {tuple(obs_shape)}")
        return small_cnn(obs_shape, layer_norm=layer_norm, members=members, generators=generators)
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}")


def init_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member for the initial weights (CPU: the same init on every device)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def check_torso(name: str, obs_shape: Sequence[int], hidden_sizes: Sequence[int] = (256, 256)) -> None:
    """Raise ValueError when torso ``name`` cannot process observations of ``obs_shape``.

    Built and run on the meta device: shapes only, no memory and no initialisation, so
    it is free to call before anything else is built (e.g. the Nature CNN's three
    convolutions shrink a 28x28 image to nothing).
    """
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer of non-positive size warns before the forward says why
        torso = build_torso(name, obs_shape, hidden_sizes=hidden_sizes)
        try:
            torso(torch.zeros((1, 2, *obs_shape)))
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            raise ValueError(f"--network {name} cannot process observations of shape {tuple(obs_shape)}: "
                             f"{reason}") from None


@dataclass(eq=False)
class HiddenLayer:
    """One hidden block ``layer -> [norm] -> activation``, and the weight layer that consumes it.

    ``name`` is the module name of the weight layer (e.g. ``torso.0``), used in
    per-layer TensorBoard tags.  ``next_layer`` is the next Linear/Conv2d; when a
    conv layer feeds a linear one through a Flatten, each channel owns
    ``spatial = H*W`` consecutive input columns of ``next_layer``.
    """

    name: str
    layer: nn.Module  # Linear/Conv2d or their member versions
    norm: nn.Module | None
    activation: nn.Module
    next_layer: nn.Module
    spatial: int = 1

    @property
    def num_units(self) -> int:
        return out_units(self.layer)


@dataclass(eq=False)
class LayerMap:
    """All weight-carrying layers of a model, in forward order."""

    hidden: list[HiddenLayer]
    output: nn.Module
    output_name: str
    #: (name, module) for every Linear/Conv2d/LayerNorm, input to output.
    ordered: list[tuple[str, nn.Module]]


def layer_map(model: nn.Module) -> LayerMap:
    """Discover the hidden blocks of ``model`` (modules must be registered in forward order).

    A Linear/Conv2d followed (optionally through a LayerNorm) by a ReLU is hidden;
    the last Linear/Conv2d not followed by an activation is the output layer.
    """
    leaves = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (*WEIGHT_LAYERS, *NORM_LAYERS, nn.ReLU, nn.Flatten))]
    ordered = [(n, m) for n, m in leaves if isinstance(m, (*WEIGHT_LAYERS, *NORM_LAYERS))]
    pending: list[tuple[str, nn.Module, nn.Module | None, nn.Module | None]] = []
    hidden: list[HiddenLayer] = []
    current: list = []  # [name, layer, norm, activation]
    for name, module in leaves:
        if isinstance(module, WEIGHT_LAYERS):
            if current:
                pending.append(tuple(current))
            current = [name, module, None, None]
        elif isinstance(module, NORM_LAYERS) and current and current[3] is None:
            current[2] = module
        elif isinstance(module, nn.ReLU) and current:
            current[3] = module
    if not current or current[3] is not None:
        raise ValueError("layer_map: the model must end with a Linear/Conv2d output layer without activation")
    pending.append(tuple(current))
    for (name, layer, norm, act), (_, next_layer, _, _) in zip(pending[:-1], pending[1:]):
        if act is None:
            raise ValueError(f"layer_map: hidden layer {name} has no ReLU after it (pitfall 9)")
        spatial = 1
        if isinstance(layer, CONV_LAYERS) and not isinstance(next_layer, CONV_LAYERS):
            spatial = next_layer.in_features // layer.out_channels
        hidden.append(HiddenLayer(name, layer, norm, act, next_layer, spatial))
    out_name, out_layer = pending[-1][0], pending[-1][1]
    return LayerMap(hidden=hidden, output=out_layer, output_name=out_name, ordered=ordered)


def hidden_layers(model: nn.Module) -> list[HiddenLayer]:
    """Shortcut for ``layer_map(model).hidden``."""
    return layer_map(model).hidden


class ActivationRecorder:
    """Keeps the latest activations of every hidden block of a model, via forward hooks.

    ``post[name]`` is the ReLU output, ``pre[name]`` (when ``preactivations``) the
    input of the ReLU (after LayerNorm when present), always member-first
    ``[M, batch, units...]`` (an ordinary model: M = 1).  Tensors are detached
    references, no copies.  With ``only_with_grad=True`` (what CBP uses) forward
    passes under ``torch.no_grad()`` -- action selection, target computation --
    are ignored, so the stored activations are those of the last training
    forward.  Hooks check module identity, so a deep-copied target network
    never writes into the recorder of the online one.
    """

    def __init__(self, model: nn.Module, preactivations: bool = False, only_with_grad: bool = False):
        self.layers = hidden_layers(model)
        # A population of several keeps [M, B, ...] everywhere; one member (an ordinary model, or a
        # one-member torso, which runs its layers on [B, ...]) gets the member dim added here.
        self.members_first = members_of(model) > 1
        self.only_with_grad = only_with_grad
        self.post: dict[str, torch.Tensor] = {}
        self.pre: dict[str, torch.Tensor] = {}
        self._handles = []
        for hidden in self.layers:
            self._handles.append(hidden.activation.register_forward_hook(self._make_hook(hidden, preactivations)))

    def _make_hook(self, hidden: HiddenLayer, preactivations: bool):
        activation = hidden.activation

        def hook(module, inputs, output):
            if module is not activation or (self.only_with_grad and not torch.is_grad_enabled()):
                return
            first = self.members_first
            self.post[hidden.name] = output.detach() if first else output.detach().unsqueeze(0)
            if preactivations:
                self.pre[hidden.name] = inputs[0].detach() if first else inputs[0].detach().unsqueeze(0)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def fresh_weights(layer: nn.Module, random: MemberRandom | torch.Generator | None = None) -> torch.Tensor:
    """A fresh draw of the whole weight from PyTorch's default initialiser, as ``[M, out, fan_in...]``.

    ``random``: a ``MemberRandom`` (member k draws from its own stream; a population) or a
    ``torch.Generator`` / None (an ordinary one-member model).
    """
    view = weight_view(layer)
    # PyTorch's default for Linear/Conv2d: kaiming_uniform_(a=sqrt(5)) on the weight, whose
    # bound works out to 1/sqrt(fan_in) -- the same bound as the default bias init.
    fan = fan_in(layer)
    bound = 1.0 / math.sqrt(fan) if fan > 0 else 0.0
    if isinstance(random, MemberRandom):
        return random.symmetric(bound, *view.shape[1:], dtype=view.dtype).to(view.device)
    return torch.empty(view.shape, dtype=view.dtype, device=view.device).uniform_(-bound, bound, generator=random)


def reinit_(layer: nn.Module, units: torch.Tensor | None = None,
            random: MemberRandom | torch.Generator | None = None) -> None:
    """Draw fresh weights from the layer's own (PyTorch default) initialiser, in place.

    ``units``: a bool mask ``[M, out]`` of the output units to redraw (their bias set to 0:
    CBP/ReDo), without a sync; None redraws the whole layer (weights and bias, as
    ``reset_parameters``).  In place, so the optimiser keeps the same Parameters.
    An ordinary layer also takes a 1-D index or mask of its units.
    """
    view, bias = weight_view(layer), bias_view(layer)
    fresh = fresh_weights(layer, random)
    with torch.no_grad():
        if units is None:
            view.copy_(fresh)
            if bias is not None:
                fan = fan_in(layer)
                bound = 1.0 / math.sqrt(fan) if fan > 0 else 0.0
                if isinstance(random, MemberRandom):
                    bias.copy_(random.symmetric(bound, *bias.shape[1:], dtype=bias.dtype).to(bias.device))
                else:
                    bias.uniform_(-bound, bound, generator=random)
            return
        mask = unit_mask(units, view.shape[0], view.shape[1], view.device)
        view.copy_(torch.where(mask.view(*mask.shape, *([1] * (view.dim() - 2))), fresh, view))
        if bias is not None:
            bias.masked_fill_(mask.view(*mask.shape, *([1] * (bias.dim() - 2))), 0.0)


def unit_mask(units: torch.Tensor, members: int, num_units: int, device: torch.device) -> torch.Tensor:
    """``units`` as a bool mask [M, num_units]: a mask already, or (one member) a 1-D index/mask."""
    if units.dtype == torch.bool and units.shape == (members, num_units):
        return units.to(device)
    if members != 1 or units.dim() != 1:
        raise ValueError(f"units must be a bool mask of shape ({members}, {num_units}); got {tuple(units.shape)}")
    mask = torch.zeros(num_units, dtype=torch.bool, device=device)
    mask[units.to(device)] = True
    return mask.unsqueeze(0)
