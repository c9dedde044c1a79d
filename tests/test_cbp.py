"""Continual Backprop against methods.md §5 (properties 5.1-5.4) and pitfalls 1-3."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.cbp import ContinualBackprop
from plasticity.networks import ActivationRecorder, layer_map
from plasticity.streams import MemberRandom

SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(widths=(16, 12), layer_norm=False, seed=0):
    """An ordinary PyTorch MLP (a population of one), laid out as ``networks.mlp``: Flatten, then
    Linear -> LayerNorm/Identity -> ReLU per hidden layer (module names 1, 4, ...), then the head."""
    torch.manual_seed(seed)
    modules, width = [nn.Flatten()], 5
    for size in widths:
        modules += [nn.Linear(width, size), nn.LayerNorm(size) if layer_norm else nn.Identity(), nn.ReLU()]
        width = size
    return nn.Sequential(*modules, nn.Linear(width, 3))


def _units(cbp, name):
    """Indices of the units replaced in layer ``name`` at the last step (a one-member model)."""
    mask = cbp.last_replaced[name]
    assert mask.shape[0] == 1
    return mask[0].nonzero().squeeze(1)


def _cnn(seed=0):
    """No padding, so the conv -> conv bias correction is exact everywhere (input 2x8x8)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3))


def _cnn_layer_norm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm([4, 6, 6]), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3))


def _inputs(model, batch=16, generator=None):
    shape = (5,) if isinstance(model[0], nn.Flatten) else (2, 8, 8)
    return torch.randn(batch, *shape, generator=generator)


def _unit_activations(h):
    return h.mean(dim=(2, 3)) if h.ndim == 4 else h


def _outgoing(hidden):
    w = hidden.next_layer.weight.detach().double().abs()
    if w.ndim == 4:
        return w.sum(dim=(0, 2, 3))
    return w.view(w.shape[0], hidden.num_units, hidden.spatial).sum(dim=(0, 2))


class ReferenceStatistics:
    """§5 steps 1-4 in float64, one layer at a time, fed by an independent recorder."""

    def __init__(self, model, decay, utility):
        self.recorder = ActivationRecorder(model, only_with_grad=True)
        self.decay, self.utility = decay, utility
        self.mean = {h.name: torch.zeros(h.num_units, dtype=torch.float64) for h in self.recorder.layers}
        self.util = {h.name: torch.zeros(h.num_units, dtype=torch.float64) for h in self.recorder.layers}
        self.age = {h.name: torch.zeros(h.num_units, dtype=torch.float64) for h in self.recorder.layers}

    def update(self):
        eta = self.decay
        for hidden in self.recorder.layers:
            h = _unit_activations(self.recorder.post[hidden.name][0].double())  # member-first [1, B, ...]
            name = hidden.name
            self.age[name] += 1
            self.mean[name] = eta * self.mean[name] + (1 - eta) * h.mean(0)
            mean_hat = self.mean[name] / (1 - eta ** self.age[name])
            if self.utility == "contribution":
                y = h.abs().mean(0) * _outgoing(hidden)
            else:
                incoming = hidden.layer.weight.detach().double().flatten(1).abs().mean(1)
                y = (h - mean_hat).abs().mean(0) * _outgoing(hidden) / incoming
            self.util[name] = eta * self.util[name] + (1 - eta) * y

    def mean_hat(self, name):
        return self.mean[name] / (1 - self.decay ** self.age[name])


@pytest.mark.parametrize("build", [_mlp, _cnn])
@pytest.mark.parametrize("utility", ["contribution", "adaptable"])
def test_running_statistics_match_definition(build, utility):
    model = build()
    cbp = ContinualBackprop(model, None, replacement_rate=0.5, maturity=1000, decay=0.9, utility=utility)
    reference = ReferenceStatistics(model, 0.9, utility)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(_inputs(model, generator=generator))
        reference.update()
        cbp.step()
    for index, (hidden, stats) in enumerate(zip(cbp.layers, cbp.stats)):
        torch.testing.assert_close(cbp.ages(index), torch.full((1, hidden.num_units), 4))
        torch.testing.assert_close(stats.mean[0].double(), reference.mean[hidden.name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.utility[0].double(), reference.util[hidden.name], rtol=1e-5, atol=1e-7)
    assert cbp.total_replacements == 0  # nothing is mature yet


def _override_hook(units, values):
    """Forward hook forcing the activation of `units` to `values` (conv: at every position)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[:, units] = values.view(-1, *[1] * (output.ndim - 2)).to(output.dtype)
        return output

    return hook


@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_property_5_1_output_unchanged_when_replaced_units_read_their_mean(build):
    """5.1 / pitfall 3: with the replaced units' activations set to f̂, the old network computes exactly
    what the new one computes -- which fails if the bias correction reads f̂ after zeroing it."""
    model = build()
    maturity = 3
    cbp = ContinualBackprop(model, None, replacement_rate=0.3, maturity=maturity, decay=0.9,
                            random=torch.Generator().manual_seed(1))
    reference = ReferenceStatistics(model, 0.9, "contribution")
    generator = torch.Generator().manual_seed(0)
    for _ in range(maturity):
        model(_inputs(model, generator=generator))
        reference.update()
        cbp.step()
    model(_inputs(model, generator=generator))
    reference.update()
    before = copy.deepcopy(model)
    cbp.step()
    layers = layer_map(model).hidden
    assert set(cbp.last_replaced) == {h.name for h in layers}, "every layer should replace a unit here"
    old_layers = layer_map(before).hidden
    correction_sizes = []
    for hidden, old in zip(layers, old_layers):
        units = _units(cbp, hidden.name)
        mean_hat = reference.mean_hat(hidden.name)[units]
        weight = old.next_layer.weight.detach().double()
        if weight.ndim == 4:
            correction = weight[:, units].sum(dim=(2, 3)) @ mean_hat
        else:
            columns = (units[:, None] * old.spatial + torch.arange(old.spatial)).flatten()
            correction = weight[:, columns] @ mean_hat.repeat_interleave(old.spatial)
        correction_sizes.append(correction.abs().max())
        old.activation.register_forward_hook(_override_hook(units, mean_hat))
    assert max(correction_sizes) > 1e-2  # live units among the replaced: a skipped correction would show
    x = _inputs(model, batch=32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before(x), atol=1e-5, rtol=1e-5)


def test_bias_correction_amount_uses_bias_corrected_mean():
    """next-layer bias += W^next_{:,R}·f̂_R with f̂ = f / (1 − η^a), read before f is reset."""
    model = _mlp(widths=(8,))
    cbp = ContinualBackprop(model, None, replacement_rate=1 / 8, maturity=2, decay=0.9)
    reference = ReferenceStatistics(model, 0.9, "contribution")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(_inputs(model, generator=generator))
        reference.update()
        if cbp.steps == 2:
            head_weight, head_bias = model[-1].weight.detach().clone(), model[-1].bias.detach().clone()
        cbp.step()
    units = _units(cbp, "1")
    assert units.numel() == 1
    expected = head_bias.double() + head_weight[:, units].double() @ reference.mean_hat("1")[units]
    torch.testing.assert_close(model[-1].bias.detach().double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(model[-1].bias, head_bias)
    assert cbp.stats[0].mean[0, units].item() == 0 and cbp.stats[0].utility[0, units].item() == 0
    assert cbp.ages(0)[0, units].item() == 0 and (cbp.ages(0) == 3).sum() == 7


def _kill_units_(layer, units):
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = -1.0


def test_property_5_1_and_5_4_dead_units_are_replaced_first_and_exactly():
    """5.4: dead units (utility 0) go first; 5.1: replacing dead units changes no output, on any input."""
    model = _mlp(widths=(16,))
    dead = torch.tensor([0, 3])
    _kill_units_(model[1], dead)
    cbp = ContinualBackprop(model, None, replacement_rate=2 / 16, maturity=5, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        model(_inputs(model, generator=generator))
        cbp.step()
    model(_inputs(model, generator=generator))
    before = copy.deepcopy(model)
    cbp.step()
    assert _units(cbp, "1").tolist() == [0, 3]
    x = 10 * _inputs(model, batch=64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before(x), atol=1e-7, rtol=0)
        assert (model[1](x)[:, dead] != 0).any()  # the replacements are alive now


def test_property_5_4_dead_conv_channels_are_replaced_first():
    model = _cnn()
    _kill_units_(model[2], torch.tensor([4]))
    cbp = ContinualBackprop(model, None, replacement_rate=1 / 6, maturity=3, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(_inputs(model, generator=generator))
        cbp.step()
    assert _units(cbp, "2").tolist() == [4]


def test_ranking_uses_the_bias_corrected_utility():
    """Step 4: rank by û = u / (1 − η^a). A young unit's raw u is small only because its average
    started at 0; ranking by raw u would replace it instead of the truly least useful old unit."""
    model = _mlp(widths=(4,))
    with torch.no_grad():
        model[-1].weight.zero_()  # y = 0 for every unit this step: u' = η·u, so û' is known in advance
    cbp = ContinualBackprop(model, None, replacement_rate=0.25, maturity=2, decay=0.9)
    cbp.steps = 10
    cbp.stats[0].birth[0, 0] = 8  # unit 0: age 3 after this step's increment (eligible), the others 11
    cbp.stats[0].utility.copy_(torch.tensor([[0.3, 0.4, 1.0, 1.0]]))
    # û after the step: unit 0: 0.9·0.3/(1 − 0.9³) ≈ 1.00, unit 1: 0.9·0.4/(1 − 0.9¹¹) ≈ 0.52.
    model(_inputs(model))
    cbp.step()
    assert _units(cbp, "1").tolist() == [1]


def test_property_5_2_replacement_count_accumulates_fractions():
    """ρ = 1e-5 on 512 always-eligible units (m = 0): ⌊step·0.00512⌋ replacements after `step` steps."""
    model = _mlp(widths=(512, 512))
    cbp = ContinualBackprop(model, None, replacement_rate=1e-5, maturity=0)
    x = _inputs(model, batch=4)
    per_layer = [0, 0]
    for step in range(1, 1001):
        model(x)
        cbp.step()
        for i, hidden in enumerate(cbp.layers):
            per_layer[i] += int(cbp.last_replaced[hidden.name].sum()) if hidden.name in cbp.last_replaced else 0
        assert per_layer == [math.floor(step * 0.00512)] * 2, f"step {step}"
    assert per_layer == [5, 5] and cbp.total_replacements == 10 and cbp.replacements.tolist() == [10]


def test_property_5_2_no_unit_is_replaced_again_within_maturity():
    maturity, rate = 10, 0.05
    model = _mlp(widths=(32,))
    cbp = ContinualBackprop(model, None, replacement_rate=rate, maturity=maturity)
    generator = torch.Generator().manual_seed(0)
    last_replaced = torch.zeros(32, dtype=torch.long)  # step of the last replacement, 0 = initial units
    accumulator, expected_total = 0.0, 0
    for step in range(1, 301):
        model(_inputs(model, generator=generator))
        eligible = int((cbp.ages(0) + 1 > maturity).sum())  # ages after this step's increment
        cbp.step()
        if eligible:
            accumulator += rate * eligible
            expected_total += math.floor(accumulator)
            accumulator -= math.floor(accumulator)
        replaced = _units(cbp, "1") if "1" in cbp.last_replaced else torch.zeros(0, dtype=torch.long)
        assert (step - last_replaced[replaced] > maturity).all(), f"unit replaced twice within m at step {step}"
        last_replaced[replaced] = step
        assert eligible - len(replaced) == int((cbp.ages(0) > maturity).sum())
    assert cbp.total_replacements == expected_total > 100


@pytest.mark.parametrize("build", [lambda: _mlp(layer_norm=True), _cnn, _cnn_layer_norm])
def test_property_5_3_adam_moments_of_replaced_entries_are_zero_and_parameters_stay_trained(build):
    """5.3 and pitfalls 1-2: same Parameter objects in the optimiser, zero moments on every touched
    row/column (LN γ/β included), untouched entries' moments kept, and the new units keep learning."""
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cbp = ContinualBackprop(model, optimizer, replacement_rate=0.2, maturity=3, decay=0.9,
                            random=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    params_before = list(model.parameters())

    def update():
        loss = model(_inputs(model, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        update()
        cbp.step()
    update()
    moments_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    cbp.step()
    assert cbp.last_replaced, "a replacement should happen at this step"

    touched = {p: torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    hidden_layers = layer_map(model).hidden
    for i, hidden in enumerate(hidden_layers):
        if hidden.name not in cbp.last_replaced:
            continue
        units = _units(cbp, hidden.name)
        # Rows of the next layer that are replaced units themselves were redrawn after the columns were zeroed.
        redrawn_rows = torch.zeros(hidden.next_layer.weight.shape[0], dtype=torch.bool)
        if i + 1 < len(hidden_layers) and hidden_layers[i + 1].name in cbp.last_replaced:
            redrawn_rows[_units(cbp, hidden_layers[i + 1].name)] = True
        touched[hidden.layer.weight][units] = True
        touched[hidden.layer.bias][units] = True
        if hidden.norm is not None:
            touched[hidden.norm.weight][units] = True
            touched[hidden.norm.bias][units] = True
            assert (hidden.norm.weight[units] == 1).all() and (hidden.norm.bias[units] == 0).all()
        columns = (units[:, None] * hidden.spatial + torch.arange(hidden.spatial)).flatten()
        touched[hidden.next_layer.weight][:, columns] = True
        assert (hidden.next_layer.weight[~redrawn_rows][:, columns] == 0).all()
        assert (hidden.layer.bias[units] == 0).all()
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            moment = optimizer.state[p][key]
            assert (moment[touched[p]] == 0).all(), f"{key} of reset entries must be zero"
            assert torch.equal(moment[~touched[p]], moments_before[p][key][~touched[p]])
    # Pitfall 1: no new Parameter objects, all still optimised.
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters()}
    # The fresh units learn: outgoing weights move after one update, incoming weights after the next.
    replaced = next(h for h in layer_map(model).hidden if h.name in cbp.last_replaced)
    units = _units(cbp, replaced.name)
    columns = (units[:, None] * replaced.spatial + torch.arange(replaced.spatial)).flatten()
    incoming = replaced.layer.weight[units].detach().clone()
    update()
    assert (replaced.next_layer.weight[:, columns] != 0).any()
    update()
    assert not torch.equal(replaced.layer.weight[units], incoming)


def test_conv_to_linear_outgoing_magnitude_and_columns():
    model = _cnn()
    cbp = ContinualBackprop(model, None, maturity=1000)
    conv = cbp.layers[1]
    assert conv.spatial == 16
    expected = model[5].weight.detach().abs().view(5, 6, 16).sum(dim=(0, 2))
    expected_conv = model[2].weight.detach().abs().sum(dim=(0, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(cbp._outgoing_magnitude(1), expected.unsqueeze(0))
        torch.testing.assert_close(cbp._outgoing_magnitude(0), expected_conv.unsqueeze(0))


def test_step_needs_a_training_forward():
    model = _mlp()
    cbp = ContinualBackprop(model, None)
    with pytest.raises(ValueError, match="training forward"):
        cbp.step()
    with torch.no_grad():
        model(_inputs(model))  # acting / targets: not recorded
    with pytest.raises(ValueError, match="training forward"):
        cbp.step()
    model(_inputs(model))
    cbp.step()
    with pytest.raises(ValueError, match="once"):  # a second step on the same activations
        cbp.step()


def test_no_host_sync_even_when_replacing():
    model = _cnn()
    cbp = ContinualBackprop(model, torch.optim.Adam(model.parameters()), replacement_rate=0.3, maturity=0)
    model(_inputs(model)).sum().backward()
    cbp.optimizer.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cbp.step()
    assert cbp.last_replaced
    ops = {e.key for e in prof.key_averages()}
    assert not SYNC_OPS & ops, f"host-device sync in CBP: {SYNC_OPS & ops}"


def test_state_dict_roundtrip(tmp_path):
    model = _mlp()
    cbp = ContinualBackprop(model, None, replacement_rate=0.1, maturity=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        model(_inputs(model, generator=generator))
        cbp.step()
    torch.save(cbp.state_dict(), tmp_path / "cbp.pt")
    restored = ContinualBackprop(copy.deepcopy(model), None, replacement_rate=0.1, maturity=2)
    restored.load_state_dict(torch.load(tmp_path / "cbp.pt", weights_only=True))
    assert restored.steps == 6 and restored.total_replacements == cbp.total_replacements > 0
    assert restored.replacements.tolist() == [cbp.total_replacements]
    for a, b in zip(restored.stats, cbp.stats):
        assert torch.equal(a.utility, b.utility) and torch.equal(a.mean, b.mean) and torch.equal(a.birth, b.birth)
        assert a.accumulator == b.accumulator and list(a.recent) == list(b.recent)
    with pytest.raises(ValueError, match="does not match"):
        ContinualBackprop(_mlp(widths=(8, 8)), None).load_state_dict(cbp.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(replacement_rate=-1e-4), "replacement-rate"), (dict(replacement_rate=2.0), "replacement-rate"),
    (dict(maturity=-1), "maturity"), (dict(maturity=1.5), "maturity"), (dict(decay=1.0), "decay"),
    (dict(utility="weight"), "utility")])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinualBackprop(_mlp(), None, **kwargs)


@pytest.mark.gpu
def test_cbp_on_cuda_without_sync():
    model = _cnn().cuda()
    optimizer = torch.optim.Adam(model.parameters())
    cbp = ContinualBackprop(model, optimizer, replacement_rate=0.3, maturity=2,
                            random=MemberRandom([0], "cuda"))
    x = _inputs(model).cuda()
    for _ in range(4):
        model(x).sum().backward()
        optimizer.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cbp.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cbp.total_replacements > 0 and cbp.replacements.device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in model.parameters())
