"""What one plasticity method looks like to a training loop, and how its flags become it.

A method module (``swr.py``, ``cbp.py``, ``resets.py``, ``regularizers.py``) holds, in
one place, the method itself (usable on its own in any loop), a flags dataclass
with one docstring and one declared range per hyperparameter, the combination rules
of those flags (``check``) and the construction from them (``build``), which returns
an ``Intervention`` -- or None when the flags leave the method off.

``plasticity.interventions`` lists the flags classes once (their order is the order
of events in an update) and calls each hook in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.streams import MemberRandom

SampleObs = Callable[[int], torch.Tensor]


def crossed(previous: int, step: int, every: int) -> bool:
    """True when a multiple of ``every`` (> 0) lies in (previous, step]: periods survive steps of several units."""
    return every > 0 and step // every > previous // every


@dataclass(frozen=True)
class Setting:
    """Facts about the run that some methods' flag rules depend on (not flags of the method itself)."""

    learning_starts: int = 0
    """env steps before learning starts: env-step schedules (``--reset-every``, optimiser resets) fire only after it"""
    batch_size: int = 32
    """the training batch size (C-CHAIN draws its reference batch of the same size)"""
    total_updates: int = 0
    """gradient steps of the whole run (the linear learning-rate schedule's length)"""

    categorical: bool = False
    """the value head outputs logits over a support (C51, HL-Gauss, two-hot) rather than Q-values"""
    layer_norm: bool = False
    """the torso has LayerNorm on its hidden pre-activations"""
    task_switches: bool = True
    """the environment switches tasks (methods scheduled "at task switches" need some)"""


@dataclass
class Parts:
    """What a method is built on: the online network, its optimiser, the target copy and the methods' streams.

    ``random`` holds one stream per member of the model (``plasticity.streams``): a method's
    draws for member k come from member k's stream only, so a population member draws what its
    single run draws.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    target_model: nn.Module | None
    random: MemberRandom
    setting: Setting


class Intervention:
    """One enabled method as the loop sees it; every hook defaults to doing nothing.

    ``name`` keys the method's state in a checkpoint.  Scalars are ``[M]`` device tensors,
    one value per member (the logger moves them to the host once per window).

    The hooks in the order of one environment step (methods-v2.md §0):

    - per gradient step: ``penalty`` (inside the loss), then ``after_update`` (right after
      ``optimizer.step()``);
    - per env step, after the target sync: ``after_env_step`` (optimiser reset on a sync,
      layer/hare resets, injection), ``on_task_switch`` (when the task switched), then
      ``end_env_step`` (optimiser reset "every N").

    A hook that re-draws or resets parameters in a discrete event (not a per-update rescaling)
    sets ``self.rewrote = True``; ``Interventions`` then calls every method's ``on_rewrite()``
    (C-CHAIN refreshes its reference so the next churn loss does not pull the network back)
    and clears the flag.
    """

    name = ""
    rewrote = False

    def penalty(self, td_loss: torch.Tensor | None = None, sample_obs: SampleObs | None = None) -> torch.Tensor | None:
        """A loss term with gradient (L2, L2-Init, Parseval, C-CHAIN), or None.

        ``td_loss``: this update's TD loss per member ``[M]`` (detached); ``sample_obs(n)``: ``n``
        replay observations per member ``[M, n, ...]`` (C-CHAIN's reference batch).
        """
        return None

    def after_update(self, previous: int, update: int, sample_obs: SampleObs | None) -> None:
        """Right after ``optimizer.step()``; ``(previous, update]`` are the updates since the last call."""

    def after_env_step(self, previous_t: int, t: int, synced: bool, sample_obs: SampleObs | None) -> None:
        """After the env step ``(previous_t, t]`` and its updates; ``synced``: the target was just synced."""

    def on_task_switch(self) -> None:
        """The environment switched tasks."""

    def end_env_step(self, previous_t: int, t: int) -> None:
        """Last event of the env step (after the task-switch events)."""

    def on_rewrite(self) -> None:
        """Another method just rewrote parameters in a discrete event (a reset, an injection)."""

    def scalars(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EveryUpdate(Intervention):
    """A method whose ``step()`` runs after every update (CBP, SWR); checkpointed through its own state_dict."""

    def __init__(self, name: str, method, scalars: Callable[[], dict[str, torch.Tensor]]):
        self.name, self.method, self._scalars = name, method, scalars

    def after_update(self, previous: int, update: int, sample_obs: SampleObs | None) -> None:
        self.method.step()

    def scalars(self) -> dict[str, torch.Tensor]:
        return self._scalars()

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)


class MethodFlags:
    """Base of a method's flags dataclass.

    The agents' ``Args`` inherit every method's flags, so the registry reads ``TAGS`` and
    calls the two hooks through each flags class explicitly (``SWRFlags.check(args, setting)``).
    """

    TAGS: ClassVar[dict[str, str]] = {}
    """flag -> short name in run names when it differs from its default (``swr`` -> ``swr_0.001``)"""

    def check(self, setting: Setting) -> None:
        """Reject invalid combinations of this method's flags (ranges are checked from their declarations)."""

    def build(self, parts: Parts) -> Intervention | None:
        """The method on ``parts``, or None when these flags leave it off; every flags class defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define build(parts): a flags class in METHODS "
                                  "builds its method")


class Counter:
    """An on-device event counter per member (resets, applications): no host sync to count, a copy to log.

    ``add(amount)``: an int (every member) or an ``[M]`` tensor (e.g. units reset per member).
    """

    def __init__(self, device: torch.device, members: int = 1):
        self.count = torch.zeros(members, dtype=torch.long, device=device)

    def add(self, amount: torch.Tensor | int = 1) -> None:
        self.count += amount

    def value(self) -> torch.Tensor:
        # Updated in place: hand out a copy so a logger holding it sees this step's value.
        return self.count.clone()
