"""Independent random streams for the members of a population, drawn without a loop over members.

A population (spec populations.md) trains seeds s, s+1, ..., s+M-1 together; member k
must draw exactly the numbers its single run (``--seed s+k``) draws.  One
``torch.Generator`` per member keeps the streams apart, but calling M generators at
every env step is a Python loop over members in the hot path.  ``MemberRandom`` draws
each member's numbers in blocks instead: a request takes the next values of every
member's pool at once (one slice), and only a refill loops over the generators.  What a
member draws depends only on its seed and on the sequence of request sizes -- the same
for every member and for the single run -- so member k of a population and the single
run with seed s+k see bit-identical numbers.

    rng = MemberRandom([7, 8, 9], device)       # three members
    u = rng.uniform(32)                         # [3, 32] float64 in [0, 1)
    a = rng.integers(10, 32)                    # [3, 32] int64 in [0, 10)
    p = rng.permutations(10)                    # [3, 10]: a permutation per member
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_BLOCK = 4096


def stream_seed(seed: int, purpose: str) -> int:
    """A seed for one random stream of a run (``purpose``: "actions", "replay", ...), independent of the others.

    Generators seeded alike draw the same numbers -- e.g. exploratory actions equal to
    the env's next labels -- so each purpose hashes its name into the run's seed.
    """
    key = [int(seed), *purpose.encode()]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


class MemberRandom:
    """One random stream per member, served from per-member pools of float64 uniforms.

    ``seeds[k]`` seeds member k's ``torch.Generator`` on ``device``.  Every draw returns a
    tensor with a leading member dimension ``[M, *shape]``.  ``block``: values drawn per
    member at a refill (a request larger than a block refills with exactly what it needs);
    ``symmetric`` draws of at least a block (fresh weights) bypass the pool.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", block: int = DEFAULT_BLOCK):
        if len(seeds) < 1:
            raise ValueError("MemberRandom needs at least one seed (one per member)")
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.block = int(block)
        self.generators = [torch.Generator(device=self.device) for _ in self.seeds]
        for generator, seed in zip(self.generators, self.seeds):
            generator.manual_seed(seed)
        self._pool = torch.empty(len(self.seeds), 0, dtype=torch.float64, device=self.device)
        self._position = 0

    @property
    def members(self) -> int:
        return len(self.seeds)

    def _direct(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        # A large draw (fresh weights for a reset) comes straight from the generators, in the
        # dtype it is used in: through the float64 pool it costs ~8x more (S&P on the Nature CNN).
        out = torch.empty(self.members, count, dtype=dtype, device=self.device)
        for k, generator in enumerate(self.generators):
            torch.rand(count, generator=generator, device=self.device, dtype=dtype, out=out[k])
        return out

    def _take(self, count: int) -> torch.Tensor:
        available = self._pool.shape[1] - self._position
        if count > available:
            size = max(self.block, count - available)
            fresh = torch.stack([torch.rand(size, generator=g, device=self.device, dtype=torch.float64)
                                 for g in self.generators])
            self._pool = torch.cat([self._pool[:, self._position:], fresh], dim=1)
            self._position = 0
        values = self._pool[:, self._position:self._position + count]
        self._position += count
        return values

    def uniform(self, *shape: int) -> torch.Tensor:
        """[M, *shape] float64 uniforms in [0, 1)."""
        return self._take(math.prod(shape)).reshape(self.members, *shape)

    def integers(self, high: int | torch.Tensor, *shape: int) -> torch.Tensor:
        """[M, *shape] int64 uniform in [0, high); ``high`` an int or a tensor broadcasting to [M, *shape]."""
        values = self.uniform(*shape)
        if torch.is_tensor(high):
            high = high.to(self.device, torch.float64).reshape(*high.shape, *([1] * (len(shape) + 1 - high.dim())))
        return (values * high).long()

    def symmetric(self, bound: float | torch.Tensor, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[M, *shape] uniform in [-bound, bound) (PyTorch's default init draws), in ``dtype``."""
        count = math.prod(shape)
        if count >= self.block:
            return self._direct(count, dtype).reshape(self.members, *shape).mul_(2.0).sub_(1.0).mul_(bound)
        return ((self.uniform(*shape) * 2.0 - 1.0) * bound).to(dtype)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[M, *shape] standard normals in ``dtype`` (orthogonal init draws), straight from each member's generator.

        Not served from the uniform pool (which keeps its values for the other draws); like a large
        ``symmetric`` draw it advances member k's generator by what ``torch.randn`` takes.
        """
        count = math.prod(shape)
        out = torch.empty(self.members, count, dtype=dtype, device=self.device)
        for k, generator in enumerate(self.generators):  # init/reset events only, never a per-update path
            torch.randn(count, generator=generator, device=self.device, dtype=dtype, out=out[k])
        return out.reshape(self.members, *shape)

    def permutations(self, n: int) -> torch.Tensor:
        """[M, n] int64: an independent uniformly random permutation of 0..n-1 per member."""
        return torch.argsort(self.uniform(n), dim=1)

    def state_dict(self) -> dict:
        # Copies (here and in load_state_dict): a saved state never aliases the pool that draws are views of.
        return {"seeds": list(self.seeds), "generators": [g.get_state() for g in self.generators],
                "pool": self._pool[:, self._position:].to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["seeds"]) != self.seeds:
            raise ValueError(f"random streams of seeds {state['seeds']} cannot be loaded into members with seeds "
                             f"{self.seeds}")
        for generator, generator_state in zip(self.generators, state["generators"]):
            generator.set_state(generator_state)
        self._pool = state["pool"].to(self.device, copy=True)
        self._position = 0

    def member(self, index: int) -> MemberRandom:
        """A one-member copy of member ``index``'s stream in its current state (e.g. to split a population)."""
        single = MemberRandom([self.seeds[index]], self.device, self.block)
        single.generators[0].set_state(self.generators[index].get_state())
        single._pool = self._pool[index:index + 1, self._position:].clone()
        return single
