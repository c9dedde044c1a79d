"""Normalize-and-Project against methods-v2.md §6 (properties 6.1-6.4), on ordinary models and populations.

The closed-form step (all groups at once) is pinned against a plain sequential reading of the
rule, layer by layer from input to output, written out below.
"""

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.flags import check_ranges
from plasticity.intervention import Parts, Setting
from plasticity.nap import NaPEvents, NaPFlags, NormalizeAndProject
from plasticity.networks import build_torso, init_generators, layer_map
from plasticity.population import MEMBER_WEIGHT_LAYERS, MemberLinear, weight_param
from plasticity.regularizers import L2Flags
from plasticity.streams import MemberRandom
from plasticity.swr import SWRFlags
from plasticity.weight_clip import WeightClipFlags

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
SEEDS = [11, 12, 13]
OBS_SHAPES = {"mlp": (6,), "cnn": (1, 8, 8)}
CLOSE = dict(rtol=1e-5, atol=1e-6)


class NotHomogeneous(nn.ReLU):
    """Stands in for DFF: a block activation that declares itself not positively homogeneous."""

    homogeneous = False


def _mlp(seed=0, activation=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.LayerNorm(16), activation(),
                         nn.Linear(16, 12), nn.LayerNorm(12), nn.ReLU(),
                         nn.Linear(12, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 3))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.LayerNorm([4, 6, 6]), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.LayerNorm([8, 3, 3]), nn.ReLU(),
                         nn.Flatten(), nn.Linear(72, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))


def _wide(seed=0):
    """The Nature CNN's FC layer size (3136 -> 512): float32 one-pass norms miss 6.1's 1e-6 here."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3136, 512), nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 64), nn.LayerNorm(64),
                         nn.ReLU(), nn.Linear(64, 4))


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (2, 12, 12)), "wide": (_wide, (3136,))}


def _inputs(shape, n=32, seed=3):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _perturb_(model, seed=1):
    """Every parameter (LN γ, β and all biases included) away from its init: scales 0.5-3 plus noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 + 2.5 * torch.rand((), generator=generator))
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


def _norm(*tensors):
    """‖[t_1; t_2; ...]‖, accumulated in float64 (the tolerance of 6.1 is 1e-6: the measuring rounds too)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors if t is not None]).double()
    return torch.linalg.vector_norm(flat).item()


def _reference_init(model):
    """‖[W; b]‖ of every hidden layer, ‖[γ; β]‖ of every LN and ‖W_L‖, keyed by module."""
    layers = layer_map(model)
    norms = {}
    for hidden in layers.hidden:
        norms[hidden.layer] = _norm(hidden.layer.weight, hidden.layer.bias)
        norms[hidden.norm] = _norm(hidden.norm.weight, hidden.norm.bias)
    norms[layers.output] = _norm(layers.output.weight)
    return norms


@torch.no_grad()
def _reference_step_(model, init, output="free", compensate=True):
    """The §6 rule read literally, one layer after the other (float64 factors)."""
    layers = layer_map(model)
    last = len(layers.hidden) - 1
    for index, hidden in enumerate(layers.hidden):
        layer, norm = hidden.layer, hidden.norm
        scale = init[layer] / _norm(layer.weight, layer.bias)
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
        if index < last and getattr(hidden.activation, "homogeneous", True):
            c = init[norm] / _norm(norm.weight, norm.bias)
            norm.weight.mul_(c)
            norm.bias.mul_(c)
            if compensate:
                hidden.next_layer.bias.mul_(c)
    if output == "project":
        layers.output.weight.mul_(init[layers.output] / _norm(layers.output.weight))


def _groups(model, output):
    """The projected groups of the §6 rule as tuples of tensors (hidden [W; b], LN [γ; β] but the last, W_L)."""
    layers = layer_map(model)
    groups = []
    for index, hidden in enumerate(layers.hidden):
        groups.append((hidden.layer.weight, hidden.layer.bias))
        if index < len(layers.hidden) - 1:
            groups.append((hidden.norm.weight, hidden.norm.bias))
    if output == "project":
        groups.append((layers.output.weight,))
    return groups


def test_groups_and_initial_norms_are_recorded_at_construction():
    model = _mlp()
    nap = NormalizeAndProject(model, "project")
    assert nap.kinds == ["layer", "affine", "layer", "affine", "layer", "output"]
    assert nap.init_norms.shape == (6, 1)
    expected = [_norm(*group) for group in _groups(model, "project")]
    torch.testing.assert_close(nap.init_norms[:, 0], torch.tensor(expected), rtol=1e-6, atol=0)
    # A fresh LN: ‖[γ; β]‖ = ‖[1…1; 0…0]‖ = √n.
    assert nap.init_norms[1, 0].item() == pytest.approx(math.sqrt(16), rel=1e-6)
    assert nap.init_norms[3, 0].item() == pytest.approx(math.sqrt(12), rel=1e-6)
    assert NormalizeAndProject(model).kinds == ["layer", "affine", "layer", "affine", "layer"]


@pytest.mark.parametrize("output", ["free", "project"])
@pytest.mark.parametrize("net", ["mlp", "cnn", "wide"])
def test_6_1_every_projected_group_has_its_initial_norm(net, output):
    build, _ = MODELS[net]
    model = build()
    initial = [_norm(*group) for group in _groups(model, output)]
    nap = NormalizeAndProject(model, output)
    layers = layer_map(model)
    _perturb_(model)
    assert all(abs(_norm(*g) / n0 - 1) > 0.05 for g, n0 in zip(_groups(model, output), initial))  # not vacuous
    last_norm = copy.deepcopy(layers.hidden[-1].norm.state_dict())
    head = copy.deepcopy(layers.output.state_dict())
    nap.step()
    for group, n0 in zip(_groups(model, output), initial):
        assert _norm(*group) == pytest.approx(n0, rel=1e-6)
    # The last LN is always left alone; the output layer too under free (its bias even under project).
    for name, value in layers.hidden[-1].norm.state_dict().items():
        assert torch.equal(value, last_norm[name])
    assert torch.equal(layers.output.bias, head["bias"])
    assert torch.equal(layers.output.weight, head["weight"]) == (output == "free")


@pytest.mark.parametrize("output", ["free", "project"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_the_closed_form_step_is_the_sequential_rule(net, output):
    build, _ = MODELS[net]
    model = build()
    reference = copy.deepcopy(model)
    init = _reference_init(reference)
    nap = NormalizeAndProject(model, output)
    _perturb_(model)
    _perturb_(reference)
    for _ in range(2):  # a second pass starts from projected groups (c = 1 up to rounding)
        nap.step()
        _reference_step_(reference, init, output)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_6_2_a_full_pass_under_free_leaves_the_output_unchanged(net):
    build, shape = MODELS[net]
    model = build()
    nap = NormalizeAndProject(model, "free")
    _perturb_(model)
    x = _inputs(shape)
    with torch.no_grad():
        before = model(x)
        params = [p.clone() for p in model.parameters()]
        nap.step()
        after = model(x)
    # The pass did change the parameters a lot (LN gains and the compensated biases included) ...
    layers = layer_map(model)
    untouched = {id(p) for module in (layers.hidden[-1].norm, layers.output) for p in module.parameters()}
    for p, q in zip(model.parameters(), params):
        assert ((p - q).abs().max().item() > 1e-2) == (id(p) not in untouched)  # the last LN and the head: free
    # ... and the function only up to LN's ε (1e-5 on the variance).
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_6_3_without_the_bias_compensation_the_output_changes(net):
    build, shape = MODELS[net]
    x = _inputs(shape)
    results = {}
    for zero_next_bias in (False, True):
        model = build()
        nap = NormalizeAndProject(model, "free", bias_compensation=False)
        _perturb_(model)
        if zero_next_bias:  # the layers after a compensated LN (every hidden layer but the first)
            with torch.no_grad():
                for hidden in layer_map(model).hidden[1:]:
                    hidden.layer.bias.zero_()
        with torch.no_grad():
            before = model(x)
            nap.step()
            results[zero_next_bias] = (model(x) - before).abs().max().item() / before.abs().max().item()
    assert results[False] > 1e-2  # next bias ≠ 0: the uncompensated LN-affine step changes the output
    assert results[True] < 1e-4  # the bias is what the compensation is for: with b = 0 nothing changes


def test_project_keeps_the_features_and_rescales_only_the_head_weight():
    model = _mlp()
    nap = NormalizeAndProject(model, "project")
    _perturb_(model)
    torso, head = model[:-1], model[-1]
    x = _inputs((6,))
    with torch.no_grad():
        features = torso(x)
        weight, bias = head.weight.clone(), head.bias.clone()
        nap.step()
        torch.testing.assert_close(torso(x), features, rtol=1e-4, atol=1e-4)
        scale = nap.init_norms[-1, 0] / torch.linalg.vector_norm(weight)
        torch.testing.assert_close(head.weight, weight * scale)
        assert torch.equal(head.bias, bias)


def test_a_non_homogeneous_activation_skips_its_ln_affine_step_only():
    model = _mlp(activation=NotHomogeneous)
    reference = copy.deepcopy(model)
    init = _reference_init(reference)
    nap = NormalizeAndProject(model)
    assert nap.skipped_affine == ["1"]
    assert nap.kinds == ["layer", "layer", "affine", "layer"]
    _perturb_(model)
    _perturb_(reference)
    first_norm = copy.deepcopy(model[2].state_dict())
    nap.step()
    _reference_step_(reference, init)  # reads the same `homogeneous` attribute
    for name, value in model[2].state_dict().items():
        assert torch.equal(value, first_norm[name])  # the first LN's (γ, β) untouched
    assert _norm(model[1].weight, model[1].bias) == pytest.approx(init[reference[1]], rel=1e-6)  # pre-LN projected
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_a_model_without_layer_norm_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="LayerNorm after every hidden layer.*--layer-norm"):
        NormalizeAndProject(model)
    with pytest.raises(ValueError, match="--nap-output"):
        NormalizeAndProject(_mlp(), "clip")


# ---- populations ----


def _population(seeds, net="mlp"):
    generators = init_generators(seeds)
    torso = build_torso(net, OBS_SHAPES[net], layer_norm=True, hidden_sizes=(16, 8), members=len(seeds),
                        generators=generators)
    return nn.Sequential(torso, MemberLinear(len(seeds), torso.out_features, 3, generators=generators))


def _load_members_(pop, singles):
    with torch.no_grad():
        for name, p in pop.named_parameters():
            for k, single in enumerate(singles):
                p[k].copy_(dict(single.named_parameters())[name][0])


@pytest.mark.parametrize("output", ["free", "project"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_member_k_is_the_single_run(net, output):
    pop, singles = _population(SEEDS, net), [_population([seed], net) for seed in SEEDS]
    pop_nap = NormalizeAndProject(pop, output)
    single_naps = [NormalizeAndProject(single, output) for single in singles]
    assert pop_nap.init_norms.shape == (len(pop_nap.kinds), len(SEEDS))
    for k, nap in enumerate(single_naps):
        torch.testing.assert_close(pop_nap.init_norms[:, k], nap.init_norms[:, 0], **CLOSE)
    for k, single in enumerate(singles):
        _perturb_(single, seed=5 + k)
    _load_members_(pop, singles)
    pop_nap.step()
    for nap in single_naps:
        nap.step()
    for name, p in pop.named_parameters():
        for k, single in enumerate(singles):
            torch.testing.assert_close(p[k], dict(single.named_parameters())[name][0], **CLOSE, msg=name)
    ratios = pop_nap.norm_ratio()
    assert ratios.shape == (len(SEEDS),)
    torch.testing.assert_close(ratios, torch.cat([nap.norm_ratio() for nap in single_naps]), **CLOSE)


def test_a_diverged_member_leaves_the_others_alone():
    pop, singles = _population(SEEDS), [_population([seed]) for seed in SEEDS]
    pop_nap, single_naps = NormalizeAndProject(pop), [NormalizeAndProject(single) for single in singles]
    for k, single in enumerate(singles):
        _perturb_(single, seed=5 + k)
    _load_members_(pop, singles)
    first = next(m for m in pop.modules() if isinstance(m, MEMBER_WEIGHT_LAYERS))
    with torch.no_grad():
        weight_param(first)[1].view(-1)[0] = float("nan")
    pop_nap.step()
    for nap in single_naps:
        nap.step()
    for name, p in pop.named_parameters():
        for k in (0, 2):
            torch.testing.assert_close(p[k], dict(singles[k].named_parameters())[name][0], **CLOSE, msg=name)


def test_step_is_one_norm_per_tensor_one_multiply_and_no_sync():
    pop = _population(SEEDS, "cnn")
    nap = NormalizeAndProject(pop, "project")
    _perturb_(pop)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        nap.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert not SYNC_OPS & counts.keys(), f"host-device sync in NaP: {SYNC_OPS & counts.keys()}"
    weights = sum(t.dim() > 2 for t in nap.tensors)  # a weight: over each unit, then across units (precision)
    assert counts["aten::linalg_vector_norm"] == len(nap.tensors) + weights  # all members at once
    assert counts["aten::_foreach_mul_"] == 1


# ---- the flags (6.4) and the intervention ----


@dataclass
class Args(NaPFlags, SWRFlags, WeightClipFlags, L2Flags):
    """The agents' Args inherit every method's flags: NaP's check sees --swr and --weight-clip."""


LN = Setting(layer_norm=True)


@pytest.mark.parametrize("flags, setting, message", [
    (dict(nap=True), Setting(), r"--nap without --layer-norm: NaP is normalisation plus projection: add --layer-norm"),
    (dict(nap=True, swr=0.01), LN, r"--nap and --swr"),
    (dict(nap=True, weight_clip=2.0), LN, r"--nap and --weight-clip"),
    (dict(nap_every=100), LN, r"--nap-every and --nap-output need --nap"),
    (dict(nap_output="project"), LN, r"--nap-every and --nap-output need --nap"),
    (dict(nap=True, nap_output="clip"), LN, r"--nap-output"),
])
def test_6_4_configuration_errors(flags, setting, message):
    args = Args(**flags)
    with pytest.raises(ValueError, match=message):
        NaPFlags.check(args, setting)


def test_valid_flags_pass_and_the_range_of_nap_every():
    for flags in (dict(), dict(nap=True), dict(nap=True, nap_every=1000, nap_output="project")):
        NaPFlags.check(Args(**flags), LN)
        check_ranges(Args(**flags))
    with pytest.raises(ValueError, match="--nap-every must be an integer >= 0"):
        check_ranges(Args(nap=True, nap_every=-1))


def _parts(model):
    return Parts(model, None, None, MemberRandom([0], torch.device("cpu")), LN)


def test_build_warns_once_with_l2_and_is_off_by_default():
    model = _mlp()
    assert NaPFlags.build(Args(), _parts(model)) is None
    with pytest.warns(UserWarning, match="--nap with --l2"):
        NaPFlags.build(Args(nap=True, l2=1e-4), _parts(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = NaPFlags.build(Args(nap=True), _parts(model))
    assert isinstance(method, NaPEvents) and method.name == "nap"


class _Counting:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def test_cadence_every_update_or_every_n_env_steps():
    every_update = NaPEvents(_Counting(), 0)
    for update in range(1, 4):
        every_update.after_update(update - 1, update, None)
        every_update.end_env_step(update * 4 - 4, update * 4)
    assert every_update.method.steps == 3
    periodic = NaPEvents(_Counting(), 10)
    periodic.after_update(0, 1, None)
    assert periodic.method.steps == 0
    for t in range(4, 41, 4):  # 4 envs: (0, 4], (4, 8], ..., (36, 40]: crosses 10, 20, 30, 40
        periodic.end_env_step(t - 4, t)
    assert periodic.method.steps == 4


def test_scalars_and_state_dict():
    model = _mlp()
    method = NaPFlags.build(Args(nap=True), _parts(model))
    torch.testing.assert_close(method.scalars()["plasticity/nap_norm_ratio"], torch.ones(1))
    state = method.state_dict()
    with torch.no_grad():  # the pre-LN layers only: no LN-affine factor enters the next biases
        for layer in (model[1], model[4], model[7]):
            layer.weight.mul_(2.0)
            layer.bias.mul_(2.0)
    method.after_update(0, 1, None)
    ratio = method.scalars()["plasticity/nap_norm_ratio"]
    assert ratio.shape == (1,) and ratio.item() == pytest.approx(2.0, rel=1e-5)
    # The initial norms are the state: a resumed run projects to the original norms, not to the current ones.
    resumed = NaPFlags.build(Args(nap=True), _parts(_mlp(seed=9)))
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.method.init_norms, method.method.init_norms)
    with pytest.raises(ValueError, match="initial norms of shape"):
        NaPFlags.build(Args(nap=True, nap_output="project"), _parts(_mlp())).load_state_dict(state)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("activation", ["crelu", "dff"])
def test_crelu_keeps_the_function_and_dff_skips_the_ln_affine_step(net, activation):
    generators = init_generators(SEEDS)
    torso = build_torso(net, OBS_SHAPES[net], layer_norm=True, hidden_sizes=(16, 8), members=len(SEEDS),
                        generators=generators, activation=activation)
    model = nn.Sequential(torso, MemberLinear(len(SEEDS), torso.out_features, 3, generators=generators))
    nap = NormalizeAndProject(model)
    hidden = layer_map(model).hidden
    for h in hidden:  # LN's ε is the only inexact step (factors down to ~0.1 here): without it, float rounding only
        h.norm.eps = 0.0
    _perturb_(model)
    norms = [copy.deepcopy(h.norm.state_dict()) for h in hidden]
    x = torch.randn(len(SEEDS), 16, *OBS_SHAPES[net], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        nap.step()
        after = model(x)
    if activation == "crelu":  # positively homogeneous: the LN-affine step runs and the function is kept
        assert nap.kinds.count("affine") == len(hidden) - 1 and not nap.skipped_affine
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    else:  # DFF: no LN is rescaled, the pre-LN [W; b] still are (the function is kept too: LN(c·z) = LN(z))
        assert "affine" not in nap.kinds and nap.skipped_affine == [h.name for h in hidden[:-1]]
        for h, state in zip(hidden, norms):
            assert all(torch.equal(value, state[name]) for name, value in h.norm.state_dict().items())
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    for h, n0 in zip(hidden, nap.init_norms[[i for i, k in enumerate(nap.kinds) if k == "layer"]]):
        v = torch.cat([h.layer.weight.reshape(len(SEEDS), -1), h.layer.bias], 1).double()
        torch.testing.assert_close(torch.linalg.vector_norm(v, dim=1), n0.double(), rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_on_cuda_matches_cpu_without_sync():
    pop = _population(SEEDS, "cnn")
    cuda_pop = _population(SEEDS, "cnn").cuda()
    nap, cuda_nap = NormalizeAndProject(pop, "project"), NormalizeAndProject(cuda_pop, "project")
    _perturb_(pop)
    cuda_pop.load_state_dict(pop.state_dict())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_nap.step()
        ratio = cuda_nap.norm_ratio()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    nap.step()
    torch.testing.assert_close(ratio.cpu(), nap.norm_ratio(), **CLOSE)
    for p, q in zip(pop.parameters(), cuda_pop.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), **CLOSE)
