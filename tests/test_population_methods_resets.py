"""CBP, ReDo, S&P and head reset on populations (spec populations.md §1.2, §2.3, §5).

A 3-member population (member layers, parameter index k = member k) fed member k's
inputs and drawing from member k's stream must do what the 1-member model built with
member k's seed does: the same parameters, Adam moments and counters after several
updates and interventions.  Changing member 0 (its seeds, its inputs) changes nothing in
the other members, and the methods' state survives a state_dict round trip.  An ordinary
PyTorch model is the population of one: it matches the 1-member member-layer model.
"""

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.cbp import CBPFlags
from plasticity.intervention import Parts, Setting
from plasticity.networks import build_torso, init_generators, layer_map
from plasticity.population import MemberLinear, as_weight_view, bias_view, weight_param, weight_view
from plasticity.resets import HeadResetFlags, ReDoFlags, SnPFlags, member_view, reinitialize_units_
from plasticity.streams import MemberRandom

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS, RANDOM_SEEDS, DATA_SEEDS = [11, 12, 13], [101, 102, 103], [201, 202, 203]
MLP_OBS, CNN_OBS = (5,), (2, 8, 8)
STEPS = 8

#: name -> flags that switch one method on, firing several times in STEPS updates.
METHODS = {
    "cbp": CBPFlags(cbp=True, cbp_replacement_rate=0.1, cbp_maturity=2, cbp_decay=0.9),
    "cbp_adaptable": CBPFlags(cbp=True, cbp_replacement_rate=0.1, cbp_maturity=2, cbp_decay=0.9,
                              cbp_utility="adaptable"),
    "redo": ReDoFlags(redo_tau=0.5, redo_every=2, redo_batch_size=16),
    "snp": SnPFlags(snp=0.3, snp_every=3),
    "reset_head": HeadResetFlags(reset_head_every=3),
}
TAGS = {"cbp": "plasticity/cbp_replacements", "cbp_adaptable": "plasticity/cbp_replacements", "redo": "plasticity/redo_resets", "snp": "plasticity/snp_applications",
        "reset_head": "plasticity/head_resets"}
#: name -> (torso, observation shape, layer norm, dtype).  The LayerNorm networks run in float64: a batched
#: matmul or grouped convolution (3 members) rounds differently from the plain kernel (1 member), and
#: gradients that nearly cancel (LayerNorm) let Adam turn that into float32 differences of ~1e-3 after ONE
#: update of the CNN with no method on (measured; the LN MLP drifts past 1e-5 within 16 updates on some
#: seeds), so only float64 shows whether the methods themselves keep the members apart.  The plain MLP
#: stays float32, the dtype of the runs.
NETWORKS = {"mlp": ("mlp", MLP_OBS, False, torch.float32), "mlp_ln": ("mlp", MLP_OBS, True, torch.float64),
            "cnn_ln": ("cnn", CNN_OBS, True, torch.float64)}


def _population(seeds, network="mlp"):
    """Torso + MemberLinear head; member k's weights drawn from ``init_generators(seeds)[k]``."""
    name, obs_shape, layer_norm, dtype = NETWORKS[network]
    generators = init_generators(seeds)
    torso = build_torso(name, obs_shape, layer_norm=layer_norm, hidden_sizes=(16, 12), members=len(seeds),
                        generators=generators)
    return nn.Sequential(torso, MemberLinear(len(seeds), torso.out_features, 3, generators=generators)).to(dtype)


def _plain_copy(member_model):
    """The same one-member MLP as ordinary nn.Linear/nn.LayerNorm layers (forward takes [B, ...])."""
    dtype = next(member_model.parameters()).dtype
    modules = []
    for module in member_model.modules():
        if isinstance(module, nn.Flatten):
            modules.append(nn.Flatten())
        elif isinstance(module, MemberLinear):
            linear = nn.Linear(module.in_features, module.out_features, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight_view(module)[0])
                linear.bias.copy_(bias_view(module)[0])
            modules.append(linear)
        elif type(module).__name__ == "MemberLayerNorm":
            norm = nn.LayerNorm(module.normalized_shape, dtype=dtype)
            with torch.no_grad():
                norm.weight.copy_(module.weight[0])
                norm.bias.copy_(module.bias[0])
            modules.append(norm)
        elif isinstance(module, (nn.ReLU, nn.Identity)):
            modules.append(type(module)())
    return nn.Sequential(*modules)


class Run:
    """A model, its target copy, Adam, the methods' streams and one method, trained on per-member inputs."""

    def __init__(self, model, method, random_seeds, data_seeds, obs_shape, members_first=True, device="cpu"):
        model = model.to(device)
        self.model, self.target = model, copy.deepcopy(model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        self.random = MemberRandom(random_seeds, device)
        self.obs_shape, self.members_first = obs_shape, members_first
        self.data = [torch.Generator().manual_seed(s) for s in data_seeds]
        self.probes = [torch.Generator().manual_seed(s + 1000) for s in data_seeds]
        self.method = METHODS[method].build(Parts(model, self.optimizer, self.target, self.random, Setting()))
        self.update = 0
        self.replaced_masks = []  # CBP: last_replaced after every step

    def batch(self, generators, n):
        """Member k's rows from its own data stream: [M, n, *obs] (an ordinary model: [n, *obs])."""
        x = torch.stack([torch.randn(n, *self.obs_shape, generator=g) for g in generators])
        x = x.to(next(self.model.parameters()).dtype)
        return x if self.members_first else x[0]

    def train(self, updates, inputs=None):
        for _ in range(updates):
            self.update += 1
            x = self.batch(self.data, 8) if inputs is None else inputs(self)
            out = self.model(x)
            out = out if self.members_first else out.unsqueeze(0)
            loss = (out - 1.0).pow(2).mean(dim=(1, 2)).sum()  # each member's own loss: its own gradient
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.method.after_update(self.update - 1, self.update, lambda n: self.batch(self.probes, n))
            cbp = getattr(self.method, "method", None)
            if cbp is not None:
                self.replaced_masks.append({k: v.clone() for k, v in cbp.last_replaced.items()})
        return self

    def member(self, k):
        """Everything of member k that a method touches, layout-free (through the member views)."""
        state = {}
        models = (("online", self.model), ("target", self.target))
        for prefix, model in models:
            for i, (_, layer) in enumerate(layer_map(model).ordered):
                for tag, param in (("w", weight_param(layer)), ("b", layer.bias)):
                    state[f"{prefix}.{i}.{tag}"] = member_view(layer, param, param.detach())[k]
                    if prefix == "online" and param in self.optimizer.state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            state[f"{i}.{tag}.{key}"] = member_view(layer, param, self.optimizer.state[param][key])[k]
        for tag, value in self.method.scalars().items():
            state[tag] = value[k]
        cbp = getattr(self.method, "method", None)
        if cbp is not None:
            for i, stats in enumerate(cbp.stats):
                state[f"cbp.{i}.utility"], state[f"cbp.{i}.mean"] = stats.utility[k], stats.mean[k]
                state[f"cbp.{i}.ages"] = cbp.ages(i)[k]
        return state


def _assert_members_equal(actual, expected, rtol=1e-5, atol=1e-6):
    assert actual.keys() == expected.keys()
    for key in actual:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def _population_run(method, network="mlp", seeds=SEEDS, random_seeds=RANDOM_SEEDS, data_seeds=DATA_SEEDS):
    return Run(_population(seeds, network), method, random_seeds, data_seeds, NETWORKS[network][1])


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_member_k_of_a_population_is_its_single_run(method, network):
    population = _population_run(method, network).train(STEPS)
    counts = population.method.scalars()[TAGS[method]]
    assert counts.shape == (3,) and (counts > 0).all(), f"{method} should fire in every member: {counts}"
    for k in range(3):
        single = _population_run(method, network, [SEEDS[k]], [RANDOM_SEEDS[k]], [DATA_SEEDS[k]]).train(STEPS)
        assert single.method.scalars()[TAGS[method]].shape == (1,)
        _assert_members_equal(population.member(k), single.member(0))
    if method.startswith("cbp"):  # the members replaced different units (each its own lowest-utility ones)
        differ = [any(not torch.equal(mask[0], mask[1]) for mask in step.values())
                  for step in population.replaced_masks]
        assert any(differ)


@pytest.mark.parametrize("method", list(METHODS))
def test_changing_member_0_changes_nothing_in_the_others(method):
    base = _population_run(method).train(STEPS)
    changed = _population_run(method, seeds=[7, *SEEDS[1:]], random_seeds=[77, *RANDOM_SEEDS[1:]],
                              data_seeds=[777, *DATA_SEEDS[1:]])

    def inputs(run):  # member 0 also sees 10x larger inputs
        x = run.batch(run.data, 8)
        x[0] *= 10.0
        return x

    changed.train(STEPS, inputs)
    assert not torch.equal(changed.member(0)["online.0.w"], base.member(0)["online.0.w"])
    for k in (1, 2):
        _assert_members_equal(changed.member(k), base.member(k), rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_ordinary_model_is_the_population_of_one(method):
    """nn.Linear/nn.LayerNorm layers (forward on [B, ...]) do what the 1-member member-layer model does."""
    member = _population_run(method, "mlp_ln", [SEEDS[0]], [RANDOM_SEEDS[0]], [DATA_SEEDS[0]])
    plain = Run(_plain_copy(member.model), method, [RANDOM_SEEDS[0]], [DATA_SEEDS[0]], MLP_OBS, members_first=False)
    _assert_members_equal(plain.member(0), member.member(0))
    member.train(STEPS)
    plain.train(STEPS)
    assert (member.method.scalars()[TAGS[method]] > 0).all()
    _assert_members_equal(plain.member(0), member.member(0))


@pytest.mark.parametrize("method", list(METHODS))
def test_state_dict_round_trip(method, tmp_path):
    run = _population_run(method).train(STEPS // 2)
    torch.save({"model": run.model.state_dict(), "target": run.target.state_dict(),
                "optimizer": run.optimizer.state_dict(), "method": run.method.state_dict(),
                "random": run.random.state_dict(), "data": [g.get_state() for g in run.data],
                "probes": [g.get_state() for g in run.probes]}, tmp_path / "ckpt.pt")
    run.train(STEPS // 2)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _population_run(method, seeds=[1, 2, 3])  # other initial weights: all of it comes from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.target.load_state_dict(saved["target"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.method.load_state_dict(saved["method"])
    resumed.random.load_state_dict(saved["random"])
    for g, state in zip(resumed.data + resumed.probes, saved["data"] + saved["probes"]):
        g.set_state(state)
    resumed.update = STEPS // 2
    resumed.train(STEPS // 2)
    for k in range(3):
        _assert_members_equal(resumed.member(k), run.member(k), rtol=0, atol=0)


def test_cbp_replaces_per_member_and_zeroes_only_that_members_moments():
    """One CBP replacement: each member's mask picks its own units; exactly the moments of the rows each member
    replaced are zeroed, every other member's entries keep the values Adam just wrote."""
    run = _population_run("cbp").train(2)  # maturity 2: the 3rd step replaces
    cbp = run.method.method
    hidden = cbp.layers[0]
    param = weight_param(hidden.layer)
    loss = (run.model(run.batch(run.data, 8)) - 1.0).pow(2).mean(dim=(1, 2)).sum()
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    before = {key: as_weight_view(hidden.layer, run.optimizer.state[param][key]).clone()
              for key in ("exp_avg", "exp_avg_sq")}
    run.method.after_update(2, 3, None)
    mask = cbp.last_replaced[hidden.name]  # [3, 16]
    assert mask.shape == (3, 16) and (mask.sum(1) == mask.sum(1)[0]).all() and mask.sum() > 0
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])
    for key in ("exp_avg", "exp_avg_sq"):
        moment = as_weight_view(hidden.layer, run.optimizer.state[param][key])  # [3, 16, 5]
        assert (moment[mask] == 0).all() and (before[key][mask] != 0).all()
        assert torch.equal(moment[~mask], before[key][~mask])


def _sync_free_run(device):
    """A 3-member population on ``device`` whose next CBP step replaces units and whose ReDo resets some."""
    run = Run(_population(SEEDS), "cbp", RANDOM_SEEDS, DATA_SEEDS, MLP_OBS, device=device)
    redo = METHODS["redo"].build(Parts(run.model, run.optimizer, run.target, run.random, Setting())).redo
    x = torch.randn(3, 8, *MLP_OBS, generator=torch.Generator().manual_seed(0)).to(device)
    probe = torch.randn(3, 16, *MLP_OBS, generator=torch.Generator().manual_seed(1)).to(device)
    cbp = run.method.method
    for _ in range(2):
        run.model(x).sum().backward()
        run.optimizer.step()
        cbp.step()
    run.model(x).sum().backward()
    run.optimizer.step()
    return cbp, redo, probe


def test_population_cbp_step_and_redo_reset_do_not_sync():
    cbp, redo, probe = _sync_free_run(torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cbp.step()
        count = redo.reset(probe)
    assert cbp.last_replaced and count.shape == (3,) and (count > 0).all()
    ops = {e.key for e in prof.key_averages()}
    sync_ops = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
    assert not sync_ops & ops, f"host-device sync: {sync_ops & ops}"


@pytest.mark.gpu
def test_population_cbp_and_redo_on_cuda_without_sync():
    cbp, redo, probe = _sync_free_run(torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cbp.step()
        count = redo.reset(probe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cbp.last_replaced and count.device.type == "cuda" and (count > 0).all()
    assert cbp.replacements.device.type == "cuda" and (cbp.replacements > 0).all()


@pytest.mark.parametrize("with_index", [False, True])
def test_reinitialize_units_touches_only_each_members_own_units(with_index):
    """Member 0 resets unit 1, member 1 units 2 and 3, member 2 nothing: exactly those rows are redrawn
    (bias 0, LN γ = 1, β = 0), exactly those columns of the next layer zeroed, and exactly those
    entries' Adam moments zeroed; everything else keeps its value and its moments."""
    run = _population_run("snp", "mlp_ln").train(2)  # Adam moments everywhere (S&P does not fire by then)
    hidden = layer_map(run.model).hidden[0]
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = mask[1, 3] = True
    index = torch.tensor([[1, 0], [2, 3], [5, 6]])  # member 0: unit 0 is listed but not masked; member 2: none
    params = [(hidden.layer, weight_param(hidden.layer)), (hidden.layer, hidden.layer.bias),
              (hidden.norm, hidden.norm.weight), (hidden.norm, hidden.norm.bias),
              (hidden.next_layer, weight_param(hidden.next_layer))]
    before = [(member_view(layer, p, p.detach()).clone(),
               {key: member_view(layer, p, run.optimizer.state[p][key]).clone() for key in ("exp_avg", "exp_avg_sq")})
              for layer, p in params]
    reinitialize_units_(hidden, mask, run.optimizer, run.random, index=index if with_index else None)
    rows = mask.view(3, 16, 1)
    for (layer, p), (old, moments) in zip(params, before):
        new = member_view(layer, p, p.detach())
        touched = torch.zeros_like(new, dtype=torch.bool)
        if layer is hidden.next_layer:
            touched |= mask.view(3, 1, 16)
            assert (new[touched] == 0).all()
        else:
            touched |= rows if new.dim() == 3 else mask
        if p is hidden.layer.bias or p is hidden.norm.bias:
            assert (new[touched] == 0).all()
        if p is hidden.norm.weight:
            assert (new[touched] == 1).all()
        if p is weight_param(hidden.layer):
            assert (new[touched] != old[touched]).all() and new[touched].abs().max() <= 1 / 5 ** 0.5
        assert torch.equal(new[~touched], old[~touched])
        for key, moment in moments.items():
            now = member_view(layer, p, run.optimizer.state[p][key])
            assert (now[touched] == 0).all() and torch.equal(now[~touched], moment[~touched])
