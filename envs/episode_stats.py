"""Per-env episode returns and lengths, accumulated on the device (pitfall 13).

Gymnasium >= 1.0 vector envs no longer hand back ``final_info`` dicts with
finished-episode statistics, and AtariVectorEnv never did: the agent keeps its
own running sums.  ``EpisodeStats`` does that as a few tensor ops per step and
returns each finished episode exactly once, at the step that ended it.

Under NEXT_STEP autoreset (AtariEnv) the step after an episode's end is a reset
step: it belongs to no episode, so pass ``valid=~info["reset_step"]`` and it
adds neither reward nor length.  Pass ``ends=info["game_over"]`` to log whole
games when a lost life is terminal for learning (``episodic_life``).
"""

from __future__ import annotations

import torch


class EpisodeStats:
    """Running return and length of the episode in flight in each of ``num_envs`` envs.

    Returns are accumulated in float64, exact for integer game scores up to 2**53.
    """

    def __init__(self, num_envs: int, device: torch.device | str = "cpu"):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=self.device)
        self.lengths = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._no_episodes = (self.returns[:0], self.lengths[:0])

    def update(self, rewards: torch.Tensor, ends: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one step; return ``(returns, lengths)`` of the episodes that ended at it.

        ``rewards`` [E] (the raw score for logging), ``ends`` bool [E] (the episode
        ended at this step), ``valid`` bool [E] or None (False: not an env step of
        any episode, e.g. a NEXT_STEP reset step; it changes nothing).  The outputs
        are 1-D tensors of equal length, possibly empty.  Selecting the finished
        episodes sizes a tensor from data, which on CUDA is one small sync; the
        Atari loop syncs every step anyway to send actions to the emulator.
        """
        if rewards.shape != (self.num_envs,) or ends.shape != (self.num_envs,):
            raise ValueError(f"rewards and ends must have shape ({self.num_envs},), "
                             f"got {tuple(rewards.shape)} and {tuple(ends.shape)}")
        ends = ends.to(self.device, torch.bool)
        if valid is None:
            self.returns += rewards.to(self.device, torch.float64)
            self.lengths += 1
        else:
            valid = valid.to(self.device, torch.bool)
            self.returns += torch.where(valid, rewards.to(self.device, torch.float64), 0.0)
            self.lengths += valid
            ends = ends & valid
        if self.device.type == "cpu" and not ends.any():  # a free check on the host; most steps end nothing
            return self._no_episodes
        finished = ends.nonzero().squeeze(1)
        episode_returns = self.returns[finished]
        episode_lengths = self.lengths[finished]
        self.returns[finished] = 0.0
        self.lengths[finished] = 0
        return episode_returns, episode_lengths

    def reset(self) -> None:
        """Forget the episodes in flight (after ``env.reset()``)."""
        self.returns.zero_()
        self.lengths.zero_()

    def state_dict(self) -> dict:
        return {"returns": self.returns.clone(), "lengths": self.lengths.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("returns", "lengths"):
            if name not in state or state[name].shape != (self.num_envs,):
                raise ValueError(f"EpisodeStats state must hold {name!r} of shape ({self.num_envs},); "
                                 f"was it saved with another num_envs?")
        self.returns.copy_(state["returns"])
        self.lengths.copy_(state["lengths"])
