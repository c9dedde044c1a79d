"""PSGD-Kron (methods-v2.md §11.2): parity with kron-torch 0.3.3, the schedule, checkpoints, decay, populations.

Reference data: ``tests/data/trac_kron_reference.json`` key ``"kron"`` holds trajectories of
the package (PyPI ``kron-torch`` 0.3.3, ``evanatyourservice/kron_torch@884427c``) on the tiny
MLP of ``test_trac.py`` (parameters and batches from integer formulas), in float64 with
float64 factors (its triangular solves stay float32, as in the package), 130 steps: the
preconditioner is updated at every step (p = 1 before step 500) and balanced at steps 20 and
125 (``random.Random(42)``).  The package runs eagerly: compiled, its probe V comes from
inductor's generator instead of torch's.  Regenerate with

    pip install --no-deps kron-torch && TORCHDYNAMO_DISABLE=1 python tests/test_kron.py

When the package is importable the live test also compares a float32 run against it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random

import pytest
import torch
from test_trac import REFERENCE, batch, init_params, mlp, train
from torch import nn

from plasticity.intervention import Setting
from plasticity.kron import MEMORY_SAVE_MODES, Kron, KronFlags, merged_shape, update_probability
from plasticity.population import MemberConv2d
from plasticity.resets import zero_optimizer_entries_

STEPS = 130
RECORDED = (1, 2, 5, 10, 20, 21, 50, 100, 124, 125, 126, 130)
CASES = {"default": dict(weight_decay=0.1, memory_save_mode=None),
         "one_diag": dict(weight_decay=0.0, memory_save_mode="one_diag")}
SEED = 5
HAS_PACKAGE = importlib.util.find_spec("kron_torch") is not None


def groups(model: nn.Sequential, weight_decay: float) -> list[dict]:
    """The package's parameter order, biases without decay (the package skips 1-D tensors itself)."""
    return [{"params": [model[0].weight]}, {"params": [model[0].bias], "weight_decay": 0.0},
            {"params": [model[2].weight]}, {"params": [model[2].bias], "weight_decay": 0.0}]


def ours(model, dtype=torch.float64, **case) -> Kron:
    return Kron(groups(model, case["weight_decay"]), lr=1e-2, seed=SEED, precond_dtype=dtype, **case)


def package_run(case: dict, dtype) -> list[torch.Tensor]:
    import kron_torch
    model = mlp(dtype)
    optimizer = kron_torch.Kron(model.parameters(), lr=1e-2, precond_dtype=dtype, **case)
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # eager: the probe from torch's generator
    try:
        torch.manual_seed(SEED)
        return train(model, optimizer, STEPS, dtype=dtype)
    finally:
        torch._dynamo.config.disable = previous


def generate() -> None:
    """Write the ``"kron"`` entry of the reference file from the package (needs ``kron-torch``)."""
    torch.set_num_threads(1)
    entry = {"steps": STEPS, "recorded": list(RECORDED)}
    for name, case in CASES.items():
        trajectory = package_run(case, torch.float64)
        entry[name] = {"params": {str(k): trajectory[k - 1].tolist() for k in RECORDED}}
    data = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    data["kron"] = entry
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- parity -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_package_reference(name):
    reference = json.loads(REFERENCE.read_text())["kron"][name]
    model = mlp()
    trajectory = train(model, ours(model, **CASES[name]), STEPS)
    assert (trajectory[-1] - trajectory[0]).abs().max() > 0.1
    for step, params in reference["params"].items():
        assert torch.allclose(trajectory[int(step) - 1], torch.tensor(params, dtype=torch.float64), rtol=0,
                              atol=1e-6), step


def test_matches_the_package_live_or_its_reference():
    """With kron-torch installed: a float32 run equals the package's (same seed); without it, the fixture."""
    if not HAS_PACKAGE:
        test_matches_the_package_reference("default")
        return
    model = mlp(torch.float32)
    mine = train(model, ours(model, torch.float32, **CASES["default"]), STEPS, dtype=torch.float32)
    theirs = package_run(CASES["default"], torch.float32)
    assert max(float((a - b).abs().max()) for a, b in zip(mine, theirs)) <= 1e-6


def test_update_schedule_is_the_packages():
    """p(n) = clamp(exp(-0.001(n - 500)), 0.03, 1); update when the counter reaches 1/p (the package's float32
    tensors), balance when also random.Random(42).random() < 0.01, drawn every step."""
    kron = Kron([nn.Parameter(torch.zeros(2, 2))])
    counter, rng, updates, balances = 0, random.Random(42), [], []
    for n in range(6000):
        prob = torch.clamp(torch.tensor(1.0) * torch.exp(-torch.tensor(0.001) * (torch.tensor(float(n)) - 500.0)),
                           min=0.03, max=1.0)
        counter += 1
        update = bool(torch.tensor(counter, dtype=torch.int32) >= 1 / prob)
        counter = 0 if update else counter
        balance = rng.random() < 0.01 and update
        assert kron._schedule() == (update, balance), n
        updates.append(update)
        balances.append(balance)
    assert all(updates[:501]) and updates[501:503] == [False, True] and sum(updates[5000:]) == 1000 // 34 + 1
    assert update_probability(0) == 1.0 and update_probability(10_000) == 0.03
    assert balances.index(True) == 19 and kron._prob_step == 6000


# --- checkpoints --------------------------------------------------------------------------------------------------

def test_state_round_trip_includes_the_schedule_and_both_random_states():
    model = mlp(torch.float32)
    optimizer = ours(model, torch.float32, **CASES["default"])
    train(model, optimizer, 10, dtype=torch.float32)
    optimizer._prob_step, optimizer._update_counter = 700, 1  # mid-anneal: the next update is not at once
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    optimizer_rng_at_save = optimizer.rng.getstate()
    straight = train(model, optimizer, 25, start=10, dtype=torch.float32)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["kron"]["prob_step"] == 700 and saved["optimizer"]["kron"]["update_counter"] == 1
    resumed_model = mlp(torch.float32)
    resumed_model.load_state_dict(saved["model"])
    resumed = Kron(groups(resumed_model, 0.1), lr=1e-2, weight_decay=0.1, seed=123)  # a different seed: restored
    resumed.load_state_dict(saved["optimizer"])
    assert (resumed._prob_step, resumed._update_counter) == (700, 1)
    assert resumed.rng.getstate() == optimizer_rng_at_save and resumed.seed == SEED
    again = train(resumed_model, resumed, 25, start=10, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(straight, again))
    assert resumed.rng.getstate() == optimizer.rng.getstate() and resumed._prob_step == optimizer._prob_step


def test_a_plain_state_dict_restarts_the_schedule():
    """The check above can fail: the package's torch-only state (no counters) gives another run."""
    model = mlp(torch.float32)
    optimizer = ours(model, torch.float32, **CASES["default"])
    train(model, optimizer, 10, dtype=torch.float32)
    optimizer._prob_step = 700
    plain = {k: v for k, v in optimizer.state_dict().items() if k != "kron"}
    saved_params = [p.detach().clone() for p in model.parameters()]
    straight = train(model, optimizer, 3, start=10, dtype=torch.float32)
    other_model = mlp(torch.float32)
    with torch.no_grad():
        for p, q in zip(other_model.parameters(), saved_params):
            p.copy_(q)
    other = ours(other_model, torch.float32, **CASES["default"])
    other.load_state_dict(plain)
    assert other._prob_step == 0
    assert not torch.equal(train(other_model, other, 3, start=10, dtype=torch.float32)[-1], straight[-1])


def test_resets_clear_state_and_the_schedule():
    model = mlp(torch.float32)
    optimizer = ours(model, torch.float32, **CASES["default"])
    train(model, optimizer, 5, dtype=torch.float32)
    weight = model[0].weight
    state = optimizer.state[weight]
    assert state["momentum_buffer"].shape == weight.shape and state["step"] == 5
    optimizer.drop_state(weight)
    assert weight not in optimizer.state and model[2].weight in optimizer.state
    optimizer.reset_state_()
    assert len(optimizer.state) == 0 and optimizer._prob_step == 0 and optimizer._update_counter == 0
    train(model, optimizer, 1, start=5, dtype=torch.float32)
    assert optimizer.state[weight]["step"] == 1 and optimizer._prob_step == 1  # Q rebuilt at the next step


def test_momentum_is_stored_in_the_parameters_shape_for_partial_resets():
    """A member conv weight [M, out, in, kh, kw] is merged to a matrix per member, its momentum kept in its shape."""
    conv = MemberConv2d(2, 3, 4, 3)
    optimizer = Kron(conv.parameters(), lr=1e-2)
    assert optimizer.member_dim
    x = torch.randn(2, 5, 3, 6, 6)
    (conv(x) ** 2).mean().backward()
    optimizer.step()
    state = optimizer.state[conv.weight]
    assert state["momentum_buffer"].shape == conv.weight.shape
    assert merged_shape((4, 3, 3, 3)) == (36, 3)  # the package's signed np.diff rule
    assert [tuple(q.shape) for q in state["Q"]] == [(2, 36, 36), (2, 3, 3)]
    assert [tuple(q.shape) for q in optimizer.state[conv.bias]["Q"]] == [(2, 4)]
    mask = torch.zeros(2, 4, 1, 1, 1, dtype=torch.bool)
    mask[1, 2] = True  # member 1's unit 2
    before = state["momentum_buffer"].clone()
    zero_optimizer_entries_(optimizer, conv, conv.weight, mask)
    assert (state["momentum_buffer"][1, 2] == 0).all()
    keep = ~mask.expand_as(before)
    assert torch.equal(state["momentum_buffer"][keep], before[keep])


# --- weight decay -------------------------------------------------------------------------------------------------

def test_weight_decay_reaches_only_the_decayed_group():
    """With g = 0 the update is lr * wd * theta: theta' = theta - lr * (wd * theta) on weights, biases unchanged."""
    model = mlp(torch.float32)
    optimizer = ours(model, torch.float32, weight_decay=0.1, memory_save_mode=None)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for (name, p), old in zip(model.named_parameters(), before):
        if name.endswith("weight"):
            assert torch.equal(p.detach(), old - 1e-2 * (0.1 * old)), name
        else:
            assert torch.equal(p.detach(), old), name


# --- populations --------------------------------------------------------------------------------------------------

def population(inits: list[list[torch.Tensor]]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.stack([init[i] for init in inits])) for i in range(4)]


def population_loss(params, ts: list[int]) -> torch.Tensor:
    w1, b1, w2, b2 = params
    xs, ys = zip(*(batch(t) for t in ts))
    hidden = torch.tanh(torch.baddbmm(b1.unsqueeze(1), torch.stack(xs), w1.transpose(1, 2)))
    out = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
    return ((out - torch.stack(ys)) ** 2).flatten(1).mean(1).sum()


def run_population(inits, offsets, steps=40):
    params = population(inits)
    optimizer = Kron([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0},
                      {"params": [params[2]]}, {"params": [params[3]], "weight_decay": 0.0}],
                     lr=1e-2, weight_decay=0.1, seed=SEED, precond_dtype=torch.float64)
    for t in range(steps):
        optimizer.zero_grad()
        population_loss(params, [t + o for o in offsets]).backward()
        optimizer.step()
    return params, optimizer


def test_members_have_their_own_factors_and_do_not_interact():
    first = init_params()
    second = [0.5 * p + 0.1 for p in first]
    together, optimizer = run_population([first, second], [0, 1000])
    assert [tuple(q.shape) for q in optimizer.state[together[0]]["Q"]] == [(2, 8, 8), (2, 3, 3)]
    # another member 1 (other data, other start): member 0 is the same to the bit (its probes are the same slice)
    other, _ = run_population([first, [p.flip(0) for p in second]], [0, 5000])
    for p, q in zip(together, other):
        assert torch.equal(p.detach()[0], q.detach()[0])
        assert not torch.equal(p.detach()[1], q.detach()[1])


def test_a_one_member_population_is_the_ordinary_model():
    params, optimizer = run_population([init_params()], [0], steps=20)
    model = mlp()
    plain = ours(model, **CASES["default"])
    assert optimizer.member_dim and not plain.member_dim
    train(model, plain, 20)
    for p, q in zip(params, model.parameters()):
        assert torch.allclose(p.detach()[0], q.detach(), rtol=0, atol=1e-9)


# --- flags --------------------------------------------------------------------------------------------------------

def test_flags_only_with_optimizer_kron():
    flags = KronFlags()
    assert (flags.kron_b1, flags.kron_precond_lr, flags.kron_max_size_triangular, flags.kron_memory_save_mode) == \
        (0.9, 0.1, 8192, "none")
    flags.check(Setting())
    with pytest.raises(ValueError, match="--kron-precond-lr needs --optimizer kron"):
        KronFlags(kron_precond_lr=0.2).check(Setting())
    flags = KronFlags(kron_precond_lr=0.2, kron_memory_save_mode="one_diag")
    flags.optimizer = "kron"
    flags.check(Setting())
    bad = KronFlags(kron_memory_save_mode="half_diag")
    bad.optimizer = "kron"
    with pytest.raises(ValueError, match="unknown --kron-memory-save-mode"):
        bad.check(Setting())
    assert set(MEMORY_SAVE_MODES) == {"none", "smart_one_diag", "one_diag", "all_diag"}
    for mode in MEMORY_SAVE_MODES:
        Kron([nn.Parameter(torch.zeros(3, 2))], memory_save_mode=mode)
    with pytest.raises(ValueError, match="memory_save_mode"):
        Kron([nn.Parameter(torch.zeros(3, 2))], memory_save_mode="half")


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    params = [nn.Parameter(p.cuda()) for p in population([init_params(), [0.5 * p for p in init_params()]])]
    optimizer = Kron(params, lr=1e-2)
    for t in range(3):
        optimizer.zero_grad()
        w1, b1, w2, b2 = params
        x = torch.ones(2, 16, 3, device="cuda", dtype=torch.float64) * (t + 1) / 10
        out = torch.baddbmm(b2.unsqueeze(1), torch.tanh(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))),
                            w2.transpose(1, 2))
        (out ** 2).mean().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in params)


if __name__ == "__main__":
    generate()
