"""scripts/benchmarks/bench_reference.py: the CleanRL-style loop the agents' speed-up is measured against."""

import math

import pytest

pytest.importorskip("stable_baselines3", reason="the reference loop needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("cv2", reason="gymnasium's ResizeObservation needs opencv: pip install -e '.[bench]'")

from scripts.benchmarks import bench_reference  # noqa: E402


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_reference_loop_trains_and_reports_a_rate(agent, one_thread):
    sps = bench_reference.reference_sps(agent, steps=240, learning_starts=100, settle=20)
    assert math.isfinite(sps) and sps > 0


def test_reference_needs_steps_after_the_settling_window():
    with pytest.raises(ValueError, match="must exceed"):
        bench_reference.reference_sps("dqn", steps=1000, learning_starts=100)


def test_missing_bench_extra_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sb3(name, *args, **kwargs):
        if name == "stable_baselines3":
            raise ImportError("No module named 'stable_baselines3'", name="stable_baselines3")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sb3)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[bench\]"'):
        bench_reference.main(["--agents", "dqn", "--pairs", "1"])
