"""The README's library example runs as written: the fenced block after ``<!-- library-example -->``."""

import math
import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- library-example -->"


def library_example() -> str:
    """The code of the first ```python block right after the marker line (an AssertionError without one)."""
    text = README.read_text(encoding="utf-8")
    _, marker, after = text.partition(MARKER)
    assert marker, f"README.md has no {MARKER} line (the section 'Use the methods in your own loop')"
    block = re.match(r"[ \t]*\n\s*```python\n(.*?)\n```", after, re.DOTALL)
    assert block, f"README.md: no ```python block right after {MARKER}"
    return block.group(1)


def test_readme_library_example_runs(one_thread):
    namespace: dict = {"__name__": "readme_library_example"}
    exec(compile(library_example(), f"{README}:library-example", "exec"), namespace)
    model, x, y, methods = namespace["model"], namespace["x"], namespace["y"], namespace["methods"]

    # It learned: the full-data MSE ends well below that of the untrained network (same seed, same data).
    with torch.no_grad():
        final_mse = nn.functional.mse_loss(model(x), y).item()
        baseline = nn.functional.mse_loss(torch.zeros_like(y), y).item()  # predicting 0 everywhere
    assert final_mse < 0.5 * baseline, (baseline, final_mse)

    # The facade built exactly the methods asked for, in the order of events, and they acted.
    assert methods.enabled == ("l2", "cbp", "swr", "redo")
    assert set(methods.scalars()) == {"plasticity/l2_penalty", "plasticity/cbp_replacements",
                                      "plasticity/swr_scale", "plasticity/redo_resets"}
    assert all(value.shape == (1,) for value in methods.scalars().values())  # [members]: a population of one
    swr = methods.methods["swr"].method
    assert swr.init_norms.shape == (3, 1) and (swr.init_norms > 0).all()  # [layers, members]: 3 Linear, 1 member
    assert methods.methods["cbp"].method.total_replacements >= 1  # rate 1e-4 over 128 units, 300 mature updates
    assert math.isfinite(methods.scalars()["plasticity/swr_scale"].item())
    assert methods.scalars()["plasticity/l2_penalty"].item() > 0

    # The diagnostics event: host floats under the documented tags.
    metrics = namespace["metrics"]
    assert 1.0 <= metrics["plasticity/effective_rank"] <= 64.0
    assert 0.0 <= metrics["plasticity/dead_frac"] <= 1.0
    # Per-layer tags carry the module names: hidden layers 0 and 2, the head 4.
    assert {"plasticity/dead_frac/0", "plasticity/dead_frac/2", "plasticity/weight_norm/4"} <= set(metrics)
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
