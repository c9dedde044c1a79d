"""Weight clipping against methods-v2.md §12 (properties 12.1-12.4), and population independence."""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.flags import check_ranges
from plasticity.intervention import EveryUpdate, Parts, Setting
from plasticity.networks import build_torso, init_generators, layer_map
from plasticity.population import MemberLinear
from plasticity.streams import MemberRandom
from plasticity.weight_clip import WeightClipFlags, WeightClipping

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
SEEDS = [11, 12, 13]
OBS_SHAPES = {"mlp": (6,), "cnn": (1, 8, 8)}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8),
                         nn.ReLU(), nn.Linear(8, 3))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.LayerNorm([4, 6, 6]), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(72, 16),
                         nn.ReLU(), nn.Linear(16, 5))


def _population(seeds, net="mlp", layer_norm=True):
    generators = init_generators(seeds)
    torso = build_torso(net, OBS_SHAPES[net], layer_norm=layer_norm, hidden_sizes=(16, 8), members=len(seeds),
                        generators=generators)
    return nn.Sequential(torso, MemberLinear(len(seeds), torso.out_features, 3, generators=generators))


MODELS = {"mlp": _mlp, "cnn": _cnn, "population": lambda: _population(SEEDS, "cnn")}


def _bound(layer, kappa):
    weight = layer.weight
    fan = math.prod(weight.shape[2:] if weight.dim() > 2 and not isinstance(layer, (nn.Linear, nn.Conv2d))
                    else weight.shape[1:])
    return kappa / math.sqrt(fan)


def _weight_layers(model):
    return [m for m in model.modules() if hasattr(m, "weight") and not isinstance(m, (nn.LayerNorm,))
            and type(m).__name__ != "MemberLayerNorm"]


def _grow_(model, factor=4.0, seed=1):
    """Push every parameter (LN included) well past the init bound in places: scaled, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("net", list(MODELS))
def test_12_1_every_clipped_tensor_lies_within_its_bound_and_the_rest_is_kept(net):
    model = MODELS[net]()
    kappa = 1.5
    clip = WeightClipping(model, kappa)
    _grow_(model)
    before = copy.deepcopy(model)
    clip.step()
    outside = 0
    for layer, old in zip(_weight_layers(model), _weight_layers(before)):
        bound = _bound(layer, kappa)
        for p, q in ((layer.weight, old.weight), (layer.bias, old.bias)):
            assert p.abs().max().item() <= bound * (1 + 1e-7)
            outside += (q.abs() > bound).sum().item()
            torch.testing.assert_close(p, q.clamp(-bound, bound), rtol=0, atol=0)  # a clamp, nothing else
    assert outside > 100  # the test clipped something


@pytest.mark.parametrize("kappa", [1.0, 2.0])
@pytest.mark.parametrize("net", list(MODELS))
def test_12_2_nothing_is_clipped_at_init_when_kappa_is_at_least_one(net, kappa):
    model = MODELS[net]()
    before = copy.deepcopy(model)
    clip = WeightClipping(model, kappa)
    clip.step()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    assert torch.all(clip.clipped_fraction() == 0)


@pytest.mark.parametrize("net", list(MODELS))
def test_12_3_layer_norm_is_never_clipped(net):
    model = MODELS[net]()
    clip = WeightClipping(model, 1.0)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__ == "MemberLayerNorm"]
    assert norms
    with torch.no_grad():
        for norm in norms:  # γ = 1 > κ/√fan_in (0.1 for the MLP's first layer): InitBounds would clamp it
            norm.bias.fill_(3.0)
    before = [copy.deepcopy(norm.state_dict()) for norm in norms]
    _grow_(next(iter(_weight_layers(model))))
    clip.step()
    for norm, state in zip(norms, before):
        for name, value in norm.state_dict().items():
            assert torch.equal(value, state[name])
    tensors = {id(t) for t in clip.tensors}
    assert not any(id(p) in tensors for norm in norms for p in norm.parameters())


def test_12_4_step_has_no_sync_and_the_fraction_is_computed_only_when_asked():
    pop = _population(SEEDS, "cnn")
    clip = WeightClipping(pop, 1.0)
    _grow_(pop)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        clip.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert not SYNC_OPS & counts.keys(), f"host-device sync in weight clipping: {SYNC_OPS & counts.keys()}"
    assert counts["aten::_foreach_clamp_min_"] == 1 and counts["aten::_foreach_clamp_max_"] == 1
    assert "aten::abs" not in counts  # the fraction is not computed per step
    method = WeightClipFlags.build(WeightClipFlags(weight_clip=1.0), _parts(pop))
    assert isinstance(method, EveryUpdate) and method.name == "weight_clip"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        method.after_update(0, 1, None)
    assert "aten::abs" not in {e.key for e in prof.key_averages()}
    frac = method.scalars()["plasticity/weight_clip_frac"]
    assert frac.shape == (len(SEEDS),)
    # The reference count: entries at the bound over all clipped entries, per member.
    at, total = torch.zeros(len(SEEDS)), 0
    for layer in _weight_layers(pop):
        bound = _bound(layer, 1.0)
        for p in (layer.weight, layer.bias):
            at += (p.detach().abs() >= bound).reshape(len(SEEDS), -1).sum(1)
            total += p[0].numel()
    torch.testing.assert_close(frac, at / total)
    assert torch.all(frac > 0.05) and torch.all(frac < 0.95)


def test_the_last_layer_is_clipped_only_when_asked():
    for last_layer in (True, False):
        model = _mlp()
        output = layer_map(model).output
        clip = WeightClipping(model, 1.0, last_layer=last_layer)
        _grow_(model)
        before = copy.deepcopy(output.state_dict())
        clip.step()
        kept = all(torch.equal(value, before[name]) for name, value in output.state_dict().items())
        assert kept == (not last_layer)
        assert (model[0].weight.abs().max().item() <= 0.1 * (1 + 1e-7))  # a hidden layer is clipped either way


def test_a_frozen_tensor_is_never_clipped():
    model = _mlp()
    clip = WeightClipping(model, 1.0)
    _grow_(model)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    clip.step()
    assert torch.equal(model[0].weight, frozen)
    assert model[0].bias.abs().max().item() <= 0.1 * (1 + 1e-7)
    model[0].weight.requires_grad_(True)
    clip.step()
    assert model[0].weight.abs().max().item() <= 0.1 * (1 + 1e-7)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_member_k_is_the_single_run(net):
    pop, singles = _population(SEEDS, net), [_population([seed], net) for seed in SEEDS]
    pop_clip = WeightClipping(pop, 1.2)
    single_clips = [WeightClipping(single, 1.2) for single in singles]
    for k, single in enumerate(singles):
        _grow_(single, factor=2.0 + k, seed=5 + k)  # a different amount of clipping per member
    with torch.no_grad():
        for name, p in pop.named_parameters():
            for k, single in enumerate(singles):
                p[k].copy_(dict(single.named_parameters())[name][0])
    pop_clip.step()
    for clip in single_clips:
        clip.step()
    for name, p in pop.named_parameters():
        for k, single in enumerate(singles):
            assert torch.equal(p[k], dict(single.named_parameters())[name][0]), name
    fractions = torch.cat([clip.clipped_fraction() for clip in single_clips])
    torch.testing.assert_close(pop_clip.clipped_fraction(), fractions)
    assert len(set(fractions.tolist())) == len(SEEDS)


def _parts(model):
    members = model[1].members if isinstance(model[-1], MemberLinear) else 1
    return Parts(model, None, None, MemberRandom(list(range(members)), torch.device("cpu")), Setting())


@dataclass
class Args(WeightClipFlags):
    pass


def test_flags():
    assert WeightClipFlags.build(Args(), _parts(_mlp())) is None
    Args().check(Setting())
    Args(weight_clip=3.0, weight_clip_last_layer=False).check(Setting())
    with pytest.raises(ValueError, match="--no-weight-clip-last-layer needs --weight-clip"):
        Args(weight_clip_last_layer=False).check(Setting())
    check_ranges(Args(weight_clip=3.0))
    with pytest.raises(ValueError, match="--weight-clip must be a number >= 0"):
        check_ranges(Args(weight_clip=-1.0))
    with pytest.raises(ValueError, match="--weight-clip must be a number > 0"):
        WeightClipping(_mlp(), 0.0)
    method = WeightClipFlags.build(Args(weight_clip=3.0), _parts(_mlp()))
    assert method.state_dict() == {}


@pytest.mark.gpu
def test_on_cuda_matches_cpu_without_sync():
    pop = _population(SEEDS, "cnn")
    cuda_pop = _population(SEEDS, "cnn").cuda()
    clip, cuda_clip = WeightClipping(pop, 1.0), WeightClipping(cuda_pop, 1.0)
    _grow_(pop)
    cuda_pop.load_state_dict(pop.state_dict())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_clip.step()
        frac = cuda_clip.clipped_fraction()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    clip.step()
    torch.testing.assert_close(frac.cpu(), clip.clipped_fraction())
    for p, q in zip(pop.parameters(), cuda_pop.parameters()):
        assert torch.equal(q.detach().cpu(), p.detach())
