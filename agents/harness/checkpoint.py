"""Checkpoints that resume a run exactly, loaded with ``torch.load(weights_only=True)``.

A checkpoint is one dict of tensors, numbers, strings and nested dicts/lists --
never pickled objects -- so loading a file from someone else's run cannot
execute code.  Writes are atomic: an interrupted save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from agents.harness.run_folder import checkpoint_path, model_path
from plasticity.population import member_parameters


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops with a last checkpoint and a clear message."""


def rng_state() -> dict:
    """The state of every global RNG a run draws from (python, numpy, torch CPU and CUDA)."""
    np_state = np.random.get_state()
    state = {
        # python's Mersenne-Twister state: (version, tuple of 625 ints, gauss_next)
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, state: dict) -> Path:
    """Atomically write ``state`` to ``<run_dir>/checkpoint.pt``."""
    path = checkpoint_path(run_dir)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load ``<run_dir>/checkpoint.pt`` safely; a missing or corrupt file is one clear error."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the run stopped before its first checkpoint; "
                                "start it again (without --resume)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt zip files
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint of this project ({error}); "
                         "delete it and start the run again") from None


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, member: int = 0) -> Path:
    """Atomically write member ``member``'s state dict, as CPU tensors, to ``<run_dir>/model.pt`` (``--save-model``).

    A population member's file is the one-member network its single run would save.
    """
    path = model_path(run_dir)
    tmp = path.with_suffix(".pt.tmp")
    own = member_parameters(model, member)
    torch.save({name: own[name].detach().cpu().clone() for name in model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A saved state dict (``model.pt``), loaded safely; a corrupt file or anything but tensors by name is a ValueError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated/corrupt zip files raise several types
        raise ValueError(f"{path} is corrupt or not a saved model ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) and torch.is_tensor(value)
                                              for key, value in state.items()):
        raise ValueError(f"{path} is not a saved model: expected a state dict of tensors")
    return state
