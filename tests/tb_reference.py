"""Reading event files the independent way the tests compare against: TensorBoard's own EventAccumulator."""

from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def accumulate(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a run as (steps, values), as TensorBoard's EventAccumulator reads it."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: (np.array([e.step for e in accumulator.Scalars(tag)]),
                  np.array([e.value for e in accumulator.Scalars(tag)], dtype=np.float64))
            for tag in accumulator.Tags()["scalars"]}
