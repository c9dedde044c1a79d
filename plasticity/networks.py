"""Torsos, and the layer map every method and diagnostic uses (on any model, not only these torsos).

Every torso is an ``nn.Sequential`` whose hidden blocks are
``Linear/Conv2d -> LayerNorm (or Identity) -> ReLU`` (spec methods.md §1: LN on the
pre-activation, never on the output layer, conv LN over (C, H, W)); with
``activation="crelu"``/``"dff"`` (methods-v2.md §8) the ReLU is a ``CReLU``/``DFF``, which
emits 2n outputs for n pre-activations (output i and i + n belong to unit i).  Layers are
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
from contextlib import contextmanager, nullcontext
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


def torso_dtype() -> torch.dtype | None:
    """The dtype the torsos compute in here (``torso_precision``), None for float32."""
    return _torso_dtype.get()


def torso_autocast(device_type: str):
    """The autocast block a torso's layers run under here: bfloat16 inside ``torso_precision``, else a no-op."""
    dtype = _torso_dtype.get()
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


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
        with torso_autocast(x.device.type):
            out = super().forward(x)
        out = out.float() if torso_dtype() is not None else out  # features leave the torso as float32
        return out.unsqueeze(0) if one else out


ACTIVATIONS = ("relu", "crelu", "dff")
ACTIVATION_WIDTHS = ("double", "halve")


class PairedActivation(nn.Module):
    """An activation with two outputs per pre-activation unit, concatenated: ``[f(z), g(z)]`` (methods-v2.md §8).

    Unit i of n owns outputs i and i + n.  The halves are joined on the feature axis of a
    linear output (``dim=-1``) or the channel axis of a conv output (``dim=-3``), counted from
    the end so the same module serves a one-member torso (``[B, ...]``) and a population
    (``[M, B, ...]``).
    """

    #: f(cz) = c·f(z) for c > 0 (SWR's Theorem 1 and NaP's LN-affine projection need it)
    homogeneous: bool = True
    #: every output is >= 0 (then mean |h| = mean h)
    nonnegative: bool = True
    #: outputs per pre-activation unit
    halves: int = 2

    def __init__(self, dim: int = -1):
        super().__init__()
        if dim not in (-1, -3):
            raise ValueError(f"{type(self).__name__}: dim must be -1 (linear outputs) or -3 (conv channels); "
                             f"got {dim}")
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class CReLU(PairedActivation):
    """CReLU(z) = [ReLU(z), ReLU(−z)] (Shang et al. 2016; Abbas et al. 2023)."""

    homogeneous, nonnegative = True, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.cat((x, x.neg()), dim=self.dim))


class DFF(PairedActivation):
    """Deep Fourier features: DFF(z) = [sin z, cos z] (Lewandowski et al. 2025).  Not homogeneous."""

    homogeneous, nonnegative = False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((torch.sin(x), torch.cos(x)), dim=self.dim)


ACTIVATION_MODULES = (nn.ReLU, CReLU, DFF)


def activation_name(module: nn.Module) -> str:
    """``"relu"``, ``"crelu"`` or ``"dff"`` of a hidden block's activation module."""
    if isinstance(module, CReLU):
        return "crelu"
    if isinstance(module, DFF):
        return "dff"
    if isinstance(module, nn.ReLU):
        return "relu"
    raise ValueError(f"unknown activation module {type(module).__name__}")


def is_homogeneous(module: nn.Module) -> bool:
    """Whether an activation module is positively homogeneous (ReLU, CReLU: yes; DFF: no)."""
    return bool(getattr(module, "homogeneous", isinstance(module, nn.ReLU)))


def activation_halves(module: nn.Module) -> int:
    """Outputs per pre-activation unit: 1 for ReLU, 2 for CReLU and DFF."""
    return int(getattr(module, "halves", 1))


def check_activation(activation: str, activation_width: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown --activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if activation_width not in ACTIVATION_WIDTHS:
        raise ValueError(f"unknown --activation-width {activation_width!r}; choose one of "
                         f"{', '.join(ACTIVATION_WIDTHS)}")


class _Widths:
    """Width bookkeeping of one torso for ``activation`` and ``activation_width`` (methods-v2.md §8).

    ``units(n)``: the pre-activation units of a block of nominal width n (n/2 when halving, which needs
    an even n); ``outputs(units)``: what the block emits (2·units for CReLU/DFF).  ``relu``: both identity.
    """

    def __init__(self, activation: str, activation_width: str):
        check_activation(activation, activation_width)
        self.activation = activation
        self.halves = 1 if activation == "relu" else 2
        self.halve = self.halves == 2 and activation_width == "halve"

    def units(self, width: int, what: str) -> int:
        if not self.halve:
            return width
        if width % 2:
            raise ValueError(f"--activation {self.activation} --activation-width halve needs even widths; {what} "
                             f"has {width}")
        return width // 2

    def outputs(self, units: int) -> int:
        return self.halves * units

    def module(self, conv: bool) -> nn.Module:
        if self.activation == "relu":
            return nn.ReLU()
        return (CReLU if self.activation == "crelu" else DFF)(dim=-3 if conv else -1)


_RELU = _Widths("relu", "double")


def _block(layer: nn.Module, norm_shape: Sequence[int] | int | None, members: int,
           widths: _Widths = _RELU) -> list[nn.Module]:
    # Without LN an Identity holds the norm's slot, so a layer has the same module name
    # (``torso.3``) with and without --layer-norm and per-layer curves line up across variants.
    # LN normalises the n pre-activations; the activation (ReLU, CReLU, DFF) comes after it.
    norm = MemberLayerNorm(members, norm_shape) if norm_shape is not None else nn.Identity()
    return [layer, norm, widths.module(isinstance(layer, CONV_LAYERS))]


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _flatten(members: int) -> nn.Flatten:
    return nn.Flatten(start_dim=1 if members == 1 else 2)  # keeps [B] (one member, see Torso) or [M, B]


def nature_cnn(in_channels: int = 4, height: int = 84, width: int = 84, layer_norm: bool = False,
               members: int = 1, generators: Generators = None, activation: str = "relu",
               activation_width: str = "double") -> Torso:
    """Mnih et al. 2015: conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 -> FC 512 (inputs already scaled).

    CReLU/DFF (§8): ``double`` keeps those widths as pre-activation units and doubles every next
    layer's input (the FC input 2·64·7·7 = 6272, features 1024); ``halve`` has 16/32/32/256 units,
    so every next layer's input (and the 512 features) is unchanged.
    """
    widths = _Widths(activation, activation_width)
    modules: list[nn.Module] = []
    channels, h, w = in_channels, height, width
    for index, (out_channels, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
        h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
        units = widths.units(out_channels, f"conv {index}")
        conv = MemberConv2d(members, channels, units, kernel, stride, generators=generators)
        modules += _block(conv, [units, h, w] if layer_norm else None, members, widths)
        channels = widths.outputs(units)
    modules.append(_flatten(members))
    units = widths.units(512, "the FC layer")
    modules += _block(MemberLinear(members, channels * h * w, units, generators=generators),
                      units if layer_norm else None, members, widths)
    return Torso(*modules, out_features=widths.outputs(units), members=members)


def mlp(obs_shape: Sequence[int], hidden_sizes: Sequence[int] = (256, 256), layer_norm: bool = False,
        members: int = 1, generators: Generators = None, activation: str = "relu",
        activation_width: str = "double") -> Torso:
    """Flatten -> [Linear -> (LN) -> act] x len(hidden_sizes); act ReLU, CReLU or DFF (§8 width modes)."""
    widths = _Widths(activation, activation_width)
    modules: list[nn.Module] = [_flatten(members)]
    width = math.prod(obs_shape)
    for index, size in enumerate(hidden_sizes):
        units = widths.units(size, f"hidden layer {index} (--hidden-sizes)")
        modules += _block(MemberLinear(members, width, units, generators=generators), units if layer_norm else None,
                          members, widths)
        width = widths.outputs(units)
    return Torso(*modules, out_features=width, members=members)


def small_cnn(obs_shape: Sequence[int], layer_norm: bool = False, channels: Sequence[int] = (32, 64),
              hidden_size: int = 256, members: int = 1, generators: Generators = None, activation: str = "relu",
              activation_width: str = "double") -> Torso:
    """Small CNN for 28x28 / 32x32 images: conv 3x3 (stride 2, pad 1) per entry of ``channels`` -> FC."""
    widths = _Widths(activation, activation_width)
    in_channels, h, w = obs_shape
    modules: list[nn.Module] = []
    for index, out_channels in enumerate(channels):
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        units = widths.units(out_channels, f"conv {index}")
        conv = MemberConv2d(members, in_channels, units, 3, stride=2, padding=1, generators=generators)
        modules += _block(conv, [units, h, w] if layer_norm else None, members, widths)
        in_channels = widths.outputs(units)
    modules.append(_flatten(members))
    units = widths.units(hidden_size, "the FC layer")
    modules += _block(MemberLinear(members, in_channels * h * w, units, generators=generators),
                      units if layer_norm else None, members, widths)
    return Torso(*modules, out_features=widths.outputs(units), members=members)


def default_network(obs_shape: Sequence[int]) -> str:
    """Atari-style stacks (4x84x84) get the Nature CNN; small images and vectors an MLP."""
    if len(obs_shape) == 3 and obs_shape[1] >= 64 and obs_shape[2] >= 64:
        return "nature_cnn"
    return "mlp"


def build_torso(name: str, obs_shape: Sequence[int], layer_norm: bool = False,
                hidden_sizes: Sequence[int] = (256, 256), members: int = 1, generators: Generators = None,
                activation: str = "relu", activation_width: str = "double") -> Torso:
    """Build a torso by name (``nature_cnn``, ``mlp`` or ``cnn``) for observations of ``obs_shape``.

    ``members`` networks at once (a population); member k's weights drawn from ``generators[k]``
    (None: the global torch generator), in module order.  ``activation``: ``relu`` (default),
    ``crelu`` or ``dff`` (methods-v2.md §8); ``activation_width`` (CReLU/DFF only): ``double``
    (n units emit 2n, the next layer's fan-in doubles) or ``halve`` (n/2 units, the next layer
    unchanged; widths must be even).  The torso's ``out_features`` is the head's fan-in.
    """
    kwargs = dict(layer_norm=layer_norm, members=members, generators=generators, activation=activation,
                  activation_width=activation_width)
    if name == "nature_cnn":
        if len(obs_shape) != 3:
            raise ValueError(f"--network nature_cnn needs image observations (C, H, W); got shape {tuple(obs_shape)}")
        return nature_cnn(obs_shape[0], obs_shape[1], obs_shape[2], **kwargs)
    if name == "mlp":
        return mlp(obs_shape, hidden_sizes, **kwargs)
    if name == "cnn":
        if len(obs_shape) != 3:
            raise ValueError(f"--network cnn needs image observations (C, H, W); got shape {tuple(obs_shape)}")
        return small_cnn(obs_shape, **kwargs)
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}")


def init_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member for the initial weights (CPU: the same init on every device)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def check_torso(name: str, obs_shape: Sequence[int], hidden_sizes: Sequence[int] = (256, 256),
                activation: str = "relu", activation_width: str = "double") -> None:
    """Raise ValueError when torso ``name`` cannot process observations of ``obs_shape``.

    Built and run on the meta device: shapes only, no memory and no initialisation, so
    it is free to call before anything else is built (e.g. the Nature CNN's three
    convolutions shrink a 28x28 image to nothing).
    """
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer of non-positive size warns before the forward says why
        torso = build_torso(name, obs_shape, hidden_sizes=hidden_sizes, activation=activation,
                            activation_width=activation_width)
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
    conv layer feeds a linear one through a Flatten, each output channel owns
    ``spatial = H*W`` consecutive input columns of ``next_layer``.

    A unit is a pre-activation index (``num_units`` of them).  With CReLU/DFF each unit i has
    ``halves = 2`` outputs, i and i + n (conv: channels c and c + C), so the activation emits
    ``num_outputs = 2n`` features/channels and ``next_layer`` consumes all of them.
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

    @property
    def halves(self) -> int:
        """Outputs per unit: 1 (ReLU) or 2 (CReLU, DFF)."""
        return activation_halves(self.activation)

    @property
    def num_outputs(self) -> int:
        """Width of the activation's output (features, or channels of a conv): ``halves * num_units``."""
        return self.halves * self.num_units


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

    A Linear/Conv2d followed (optionally through a LayerNorm) by a ReLU, CReLU or DFF is hidden;
    the last Linear/Conv2d not followed by an activation is the output layer.  A module with a true
    ``layer_map_hidden`` attribute is left out with everything in it (plasticity injection's
    pre-allocated head copies, methods-v2.md §5): methods and diagnostics see the network without them.
    """
    hidden_under = tuple(f"{n}." for n, m in model.named_modules() if n and getattr(m, "layer_map_hidden", False))
    leaves = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (*WEIGHT_LAYERS, *NORM_LAYERS, *ACTIVATION_MODULES, nn.Flatten))
              and not n.startswith(hidden_under)]
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
        elif isinstance(module, ACTIVATION_MODULES) and current:
            current[3] = module
    if not current or current[3] is not None:
        raise ValueError("layer_map: the model must end with a Linear/Conv2d output layer without activation")
    pending.append(tuple(current))
    for (name, layer, norm, act), (_, next_layer, _, _) in zip(pending[:-1], pending[1:]):
        if act is None:
            raise ValueError(f"layer_map: hidden layer {name} has no ReLU (or CReLU/DFF) after it (pitfall 9)")
        spatial = 1
        if isinstance(layer, CONV_LAYERS) and not isinstance(next_layer, CONV_LAYERS):
            spatial = next_layer.in_features // (layer.out_channels * activation_halves(act))
        hidden.append(HiddenLayer(name, layer, norm, act, next_layer, spatial))
    out_name, out_layer = pending[-1][0], pending[-1][1]
    return LayerMap(hidden=hidden, output=out_layer, output_name=out_name, ordered=ordered)


def hidden_layers(model: nn.Module) -> list[HiddenLayer]:
    """Shortcut for ``layer_map(model).hidden``."""
    return layer_map(model).hidden


class ActivationRecorder:
    """Keeps the latest activations of every hidden block of a model, via forward hooks.

    ``post[name]`` is the activation's output, ``pre[name]`` (when ``preactivations``) its
    input (after LayerNorm when present), always member-first
    ``[M, batch, units...]`` (an ordinary model: M = 1).  With CReLU/DFF ``post`` is 2n wide
    (``HiddenLayer.num_outputs``; conv: 2C channels) and ``pre`` n wide.  Tensors are detached
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


#: Attribute (a float) of a layer whose initialiser is orthogonal with that gain (set by
#: ``parseval.parseval_init_``): ``fresh_weights``/``reinit_`` then redraw it orthogonally, bias 0.
ORTHOGONAL_GAIN = "orthogonal_gain"


def orthogonal_gain(layer: nn.Module) -> float | None:
    """The gain of ``layer``'s orthogonal initialiser, or None (PyTorch's default uniform initialiser)."""
    return getattr(layer, ORTHOGONAL_GAIN, None)


def orthogonal_draw(members: int, rows: int, cols: int, gain: float,
                    random: MemberRandom | Sequence[torch.Generator] | torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[M, rows, cols]``: per member a (semi-)orthogonal matrix times ``gain``, as ``nn.init.orthogonal_``.

    A standard normal draw (member k from its stream of a ``MemberRandom``, or from ``random[k]``
    of a list of generators -- ``init_generators`` -- or all from one generator / the global one),
    then one batched QR: orthonormal rows when rows <= cols, orthonormal columns otherwise, the
    signs fixed by diag(R) so the draw is Haar-distributed.  On the device of the draws.
    """
    if isinstance(random, MemberRandom):
        normal = random.normal(rows, cols, dtype=dtype)
    elif isinstance(random, Sequence):
        if len(random) != members:
            raise ValueError(f"one generator per member: got {len(random)} for {members} members")
        normal = torch.stack([torch.empty(rows, cols, dtype=dtype).normal_(0.0, 1.0, generator=g) for g in random])
    else:
        normal = torch.empty(members, rows, cols, dtype=dtype).normal_(0.0, 1.0, generator=random)
    wide = rows < cols
    q, r = torch.linalg.qr(normal.mT if wide else normal)
    q = q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)
    return (q.mT if wide else q).mul_(gain)


def fresh_weights(layer: nn.Module, random: MemberRandom | torch.Generator | None = None,
                  rows: int | None = None) -> torch.Tensor:
    """A fresh draw of the whole weight from the layer's initialiser, as ``[M, out, fan_in...]``.

    PyTorch's default initialiser, or an orthogonal one when the layer is marked (``ORTHOGONAL_GAIN``).
    ``random``: a ``MemberRandom`` (member k draws from its own stream; a population) or a
    ``torch.Generator`` / None (an ordinary one-member model).  ``rows``: draw only that many
    rows ``[M, rows, fan_in...]`` (CBP's fresh units); orthogonal layers then get the rows of a
    fresh orthogonal draw -- with out <= fan_in a ``rows x fan_in`` draw (orthonormal rows: the
    same law as any ``rows`` rows of a full draw), otherwise the first ``rows`` rows of a full one.
    """
    view = weight_view(layer)
    shape = tuple(view.shape[1:]) if rows is None else (rows, *view.shape[2:])
    gain = orthogonal_gain(layer)
    if gain is not None:
        out, fan = view.shape[1], fan_in(layer)
        count = shape[0]
        drawn = orthogonal_draw(view.shape[0], count if rows is None or out <= fan else out, fan, gain, random,
                                view.dtype)
        return drawn[:, :count].reshape(view.shape[0], *shape).to(view.device)
    # PyTorch's default for Linear/Conv2d: kaiming_uniform_(a=sqrt(5)) on the weight, whose
    # bound works out to 1/sqrt(fan_in) -- the same bound as the default bias init.
    fan = fan_in(layer)
    bound = 1.0 / math.sqrt(fan) if fan > 0 else 0.0
    if isinstance(random, MemberRandom):
        return random.symmetric(bound, *shape, dtype=view.dtype).to(view.device)
    return torch.empty((view.shape[0], *shape), dtype=view.dtype, device=view.device).uniform_(-bound, bound,
                                                                                               generator=random)


def reinit_(layer: nn.Module, units: torch.Tensor | None = None,
            random: MemberRandom | torch.Generator | None = None) -> None:
    """Draw fresh weights from the layer's own initialiser (PyTorch default, or orthogonal), in place.

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
            if bias is not None and orthogonal_gain(layer) is not None:
                bias.zero_()  # the orthogonal initialiser's bias (parseval_init_)
            elif bias is not None:
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
