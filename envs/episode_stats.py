"""Per-env episode returns and lengths, accumulated on the device (pitfall 13), for a population.

Gymnasium >= 1.0 vector envs no longer hand back ``final_info`` dicts with
finished-episode statistics, and AtariVectorEnv never did: the agent keeps its
own running sums.  ``EpisodeStats`` does that as a few tensor ops per step and
reports each finished episode exactly once, at the step that ended it.

Everything is dense, ``[M, E]`` (members of a population x envs of a member), with
no data-dependent shapes: ``update`` returns the returns and lengths of every env
together with a mask of the envs whose episode ended at this step, so a step never
waits on the device (the logger selects the ended entries when it flushes).

Under NEXT_STEP autoreset (AtariEnv) the step after an episode's end is a reset
step: it belongs to no episode, so pass ``valid=~info["reset_step"]`` and it
adds neither reward nor length.  Pass ``ends=info["game_over"]`` to log whole
games when a lost life is terminal for learning (``episodic_life``).
"""

from __future__ import annotations

import torch


class EpisodeStats:
    """Running return and length of the episode in flight in each of ``members`` x ``num_envs`` envs.

    Returns are accumulated in float64, exact for integer game scores up to 2**53.
    """

    def __init__(self, num_envs: int, device: torch.device | str = "cpu", members: int = 1):
        for name, value in (("num_envs", num_envs), ("members", members)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_envs, self.members = num_envs, members
        self.shape = (members, num_envs)
        self.device = torch.device(device)
        self.returns = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.lengths = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        # What a step that ends no episode returns on the CPU (shared: nobody writes into it).
        self._nothing_ended = (torch.zeros_like(self.returns), torch.zeros_like(self.lengths),
                               torch.zeros(self.shape, dtype=torch.bool, device=self.device))

    def update(self, rewards: torch.Tensor, ends: torch.Tensor, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add one step; return ``(returns, lengths, ended)``, all ``[M, E]``.

        ``rewards`` [M, E] (the raw score for logging), ``ends`` bool [M, E] (the episode
        ended at this step), ``valid`` bool [M, E] or None (False: not an env step of any
        episode, e.g. a NEXT_STEP reset step; it changes nothing, and it ends nothing).
        ``ended[m, e]``: env (m, e)'s episode ended at this step; there ``returns`` (float64)
        and ``lengths`` (int64) are that episode's, elsewhere 0.  Fresh tensors (later
        updates do not change them; on the CPU a step that ends nothing returns shared zeros);
        the running sums restart where an episode ended.
        """
        if rewards.shape != self.shape or ends.shape != self.shape:
            raise ValueError(f"rewards and ends must have shape {self.shape} (members, num_envs), "
                             f"got {tuple(rewards.shape)} and {tuple(ends.shape)}")
        rewards = rewards.to(self.device, torch.float64)
        ended = ends.to(self.device, torch.bool)
        if valid is None:
            self.returns += rewards
            self.lengths += 1
        else:
            if valid.shape != self.shape:
                raise ValueError(f"valid must have shape {self.shape}, got {tuple(valid.shape)}")
            valid = valid.to(self.device, torch.bool)
            self.returns += torch.where(valid, rewards, 0.0)
            self.lengths += valid
            ended = ended & valid
        if self.device.type == "cpu" and not bool(ended.any()):  # a free check on the host; most steps end nothing
            return self._nothing_ended
        returns = torch.where(ended, self.returns, 0.0)
        lengths = torch.where(ended, self.lengths, 0)
        self.returns.masked_fill_(ended, 0.0)
        self.lengths.masked_fill_(ended, 0)
        return returns, lengths, ended

    def reset(self) -> None:
        """Forget the episodes in flight (after ``env.reset()``)."""
        self.returns.zero_()
        self.lengths.zero_()

    def state_dict(self) -> dict:
        return {"returns": self.returns.clone(), "lengths": self.lengths.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("returns", "lengths"):
            if name not in state or tuple(state[name].shape) != self.shape:
                raise ValueError(f"EpisodeStats state must hold {name!r} of shape {self.shape} (members, num_envs); "
                                 f"was it saved with another population or num_envs?")
        self.returns = state["returns"].to(self.device, torch.float64, copy=True)
        self.lengths = state["lengths"].to(self.device, torch.int64, copy=True)
