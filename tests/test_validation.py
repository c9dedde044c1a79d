"""Every bad flag value is one clear error before any work: a table walked over every declared range.

Each numeric flag of both agents declares its range on its field (``plasticity.flags.ranged``); this
walks them all with values just outside (and NaN), through the real command line
(``experiment.cli``): exit status 2, exactly one ``error:`` line naming the flag, nothing on disk.
Then the path flags, the torso/observation-shape rule and the methods' combination rules.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from agents import c51, dqn
from agents.harness import experiment
from agents.harness.config import CommonArgs, run_tag
from plasticity.flags import Range, declared_ranges, flag_name

AGENTS = {"dqn": dqn, "c51": c51}
# Numeric fields of the Args that are not checked against a range must say why here.
UNRANGED_NUMERIC = {"swr_head": "optional; ranged", "total_timesteps": "optional; ranged"}


def _base_argv(tmp_path, mnist_dir) -> list[str]:
    # Small enough that a value wrongly accepted ends in seconds (and the test then fails on the exit code).
    return ["--env-id", "ImageMDP/mnist", "--data-dir", str(mnist_dir), "--num-images", "200",
            "--total-timesteps", "64", "--learning-starts", "32", "--buffer-size", "64", "--diag-every", "0",
            "--no-cuda", "--runs-dir", str(tmp_path / "runs")]


def _one_clear_error(agent: str, argv: list[str], capsys) -> str:
    module = AGENTS[agent]
    with pytest.raises(SystemExit) as exit_info:
        experiment.cli(module.Args, module.main, argv)
    assert exit_info.value.code == 2, argv
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
    assert "Traceback" not in lines[0]
    return lines[0]


def _cases():
    for agent, module in AGENTS.items():
        for name, (value_range, _optional) in declared_ranges(module.Args).items():
            for value in value_range.invalid_examples():
                yield pytest.param(agent, name, value, id=f"{agent}-{name}={value}")


@pytest.mark.parametrize("agent, name, value", list(_cases()))
def test_every_out_of_range_value_is_one_error_and_leaves_nothing(agent, name, value, tmp_path, mnist_dir, capsys):
    text = f"{value:g}" if isinstance(value, float) else str(value)
    # A fixed-length tuple flag (--adam-betas B1 B2) takes that many values: give the bad one in every slot.
    hint = typing.get_type_hints(AGENTS[agent].Args)[name]
    slots = len(typing.get_args(hint)) if typing.get_origin(hint) is tuple else 1
    argv = [*_base_argv(tmp_path, mnist_dir), f"--{flag_name(name)}", *[text] * slots]
    line = _one_clear_error(agent, argv, capsys)
    assert f"--{flag_name(name)}" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module", [dqn, c51])
def test_every_numeric_flag_declares_its_range(module):
    """A new numeric flag without a range fails here: the table above would silently skip it."""
    hints = typing.get_type_hints(module.Args)
    ranged = declared_ranges(module.Args)
    for field in dataclasses.fields(module.Args):
        hint = str(hints[field.name])
        numeric = any(kind in hint for kind in ("int", "float")) and "bool" not in hint
        if numeric and field.name not in ranged:
            pytest.fail(f"--{flag_name(field.name)} ({hint}) has no declared range: use plasticity.flags.ranged")
    assert "seed" in ranged and "learning_rate" in ranged and "cbp_decay" in ranged


def test_a_range_admits_its_edges_and_special_values():
    head_reset = declared_ranges(dqn.Args)["reset_head_every"][0]
    assert head_reset.contains(0) and head_reset.contains(-1) and not head_reset.contains(-2)
    decay = Range(low=0.0, high=1.0, high_open=True)
    assert decay.contains(0.0) and decay.contains(0.999) and not decay.contains(1.0)
    assert not decay.contains(float("nan")) and not Range().contains(float("inf"))
    seed = declared_ranges(dqn.Args)["seed"][0]
    assert seed.contains(0) and seed.contains(2**32 - 1) and not seed.contains(2**32)


@pytest.mark.parametrize("agent, extra, message", [
    ("dqn", ["--run-name", "a/b"], "--run-name"),
    ("dqn", ["--run-name", ".."], "--run-name"),
    ("dqn", ["--buffer-device", "gpu"], "--buffer-device"),
    ("c51", ["--network", "nature_cnn"], "--network nature_cnn cannot process observations of shape (1, 28, 28)"),
    ("dqn", ["--swr-head", "0.1"], "--swr-head needs --swr"),
    ("c51", ["--swr", "0.01"], "--swr on a categorical head without --layer-norm"),
    ("dqn", ["--loss", "two_hot", "--swr", "0.01"], "--swr on a categorical head without --layer-norm"),
    ("dqn", ["--snp-every", "10"], "--snp-every needs --snp"),
    ("dqn", ["--v-min", "3", "--v-max", "3", "--loss", "hl_gauss"], "--v-min"),
    ("dqn", ["--batch-size", "128"], "--buffer-size"),
    ("dqn", ["--num-envs", "3"], "--shift-every"),
])
def test_bad_paths_torsos_and_combinations_are_one_error(agent, extra, message, tmp_path, mnist_dir, capsys):
    line = _one_clear_error(agent, [*_base_argv(tmp_path, mnist_dir), *extra], capsys)
    assert message in line
    assert not (tmp_path / "runs").exists()


def test_path_flags_have_their_kind(tmp_path, mnist_dir, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for flags, message in ((["--runs-dir", str(a_file)], "--runs-dir"),
                           (["--data-dir", str(a_file)], "--data-dir"),
                           (["--runs-dir", str(a_file / "below")], "--runs-dir"),
                           (["--resume", str(tmp_path / "no_such_run")], "--resume")):
        line = _one_clear_error("dqn", [*_base_argv(tmp_path, mnist_dir), *flags], capsys)
        assert message in line
    assert a_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_categorical_swr_with_layer_norm_needs_no_swr_head(tmp_path, mnist_dir):
    """§13: with LN the default --swr-head is 0 for categorical heads; the run trains and logs the logit scale."""
    args = c51.Args(env_id="ImageMDP/mnist", data_dir=str(mnist_dir), num_images=200, total_timesteps=64,
                    learning_starts=32, buffer_size=64, diag_every=0, log_every=32, cuda=False, layer_norm=True,
                    swr=0.01, runs_dir=str(tmp_path), run_name="run", hidden_sizes=[16])
    c51.main(args)
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_run_tag_digests_the_methods_flags_from_their_own_modules():
    assert run_tag(dqn.Args()) == "base"
    assert run_tag(dqn.Args(layer_norm=True, l2=1e-5, swr=1e-3, cbp=True)) == "ln-l2_1e-05-cbp-swr_0.001"
    assert run_tag(dqn.Args(redo_every=100, reset_head_every=-1)) == "redo_100-headreset_-1"
    assert issubclass(dqn.Args, CommonArgs)
