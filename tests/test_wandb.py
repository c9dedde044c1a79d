"""``--track``: a run mirrored to Weights & Biases as in CleanRL, tested offline (nothing leaves the machine).

W&B in offline mode writes ``<WANDB_DIR>/wandb/offline-run-<time>-<id>/run-<id>.wandb``, the
log ``wandb sync`` would upload: a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs
(the run with its config, then one history record per TensorBoard step).  The tests read it back.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import dqn
from agents.harness import experiment, run_folder

MIRRORED_TAGS = {"charts/episodic_return", "charts/accuracy", "losses/td_loss", "losses/q_values",
                 "plasticity/dead_frac", "plasticity/dead_frac/torso.1", "plasticity/effective_rank"}


def mdp_args(tmp_path: Path, mnist_dir: Path, **overrides) -> dqn.Args:
    fields = dict(env_id="ImageMDP/mnist", data_dir=str(mnist_dir), num_images=500, total_timesteps=400,
                  learning_starts=100, buffer_size=1000, batch_size=16, hidden_sizes=[32, 32], diag_every=100,
                  diag_batch=128, log_every=50, episode_length=50, shift=["label_permutation"], shift_every=200,
                  runs_dir=str(tmp_path / "runs"), run_name="run", cuda=False, checkpoint_every=0, seed=7,
                  track=True, wandb_project_name="plasticity-test")
    fields.update(overrides)
    return dqn.Args(**fields)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, every file of it under ``tmp_path/wandb_home``; yields the folder holding ``wandb/``."""
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DIR=home,
                            WANDB_CONFIG_DIR=home / "config", WANDB_CACHE_DIR=home / "cache",
                            WANDB_DATA_DIR=home / "data").items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    home.mkdir()
    wandb.teardown()  # a fresh W&B process reads the settings above
    yield home
    wandb.teardown()


def wandb_records(path: Path):
    """The ``Record`` protobufs of a ``run-<id>.wandb`` log (32 KiB blocks of 7-byte-header chunks)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    position, pending = header, b""  # the file starts with its own 7-byte header
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        pending += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(home: Path, run_id: str) -> list[Path]:
    """The offline W&B run folders of ``run_id`` (a resumed run adds one), oldest first."""
    return sorted((home / "wandb").glob(f"offline-run-*-{run_id}"))


def history(log: Path) -> dict[int, dict[str, float]]:
    """TensorBoard step -> the scalars W&B recorded at it."""
    rows = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[int(row["global_step"])] = row
    return rows


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_track_without_wandb_is_one_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        experiment.cli(dqn.Args, dqn.main, argv=["--env-id", "ImageMDP/mnist", "--data-dir", str(tmp_path / "data"),
                                                  "--runs-dir", str(runs), "--no-cuda", "--track"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ['error: --track needs Weights & Biases: pip install -e ".[wandb]"']
    assert not runs.exists()


def test_track_mirrors_the_tensorboard_scalars_and_the_config(tmp_path, mnist_dir, offline_wandb):
    import wandb

    args = mdp_args(tmp_path, mnist_dir)
    dqn.main(args)
    # Finished, and the TensorBoard patch of sync_tensorboard taken back.
    assert wandb.run is None and wandb.patched["tensorboard"] == []
    wandb.teardown()  # W&B's process ends, writing the rest of its log (a real run: at its exit)
    run_dir = Path(args.runs_dir) / args.run_name
    run_id = (run_dir / run_folder.WANDB_RUN_ID_FILE).read_text().strip()
    (offline,) = offline_run(offline_wandb, run_id)
    log = offline / f"run-{run_id}.wandb"
    assert log.stat().st_size > 0
    (run,) = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "plasticity-test", "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["seed"], config["agent"], config["track"], config["total_timesteps"]) == (7, "dqn", True, 400)
    rows = history(log)
    assert MIRRORED_TAGS <= set().union(*rows.values())
    td_loss = tensorboard_scalars(run_dir, "losses/td_loss")
    assert {step: row["losses/td_loss"] for step, row in rows.items() if "losses/td_loss" in row} == \
        pytest.approx(td_loss)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, mnist_dir, offline_wandb, monkeypatch):
    import wandb

    original = experiment.Run.end_iteration

    def end_iteration(self, global_step, obs, *rest, **options):
        if global_step == 250 and not self.args.resume:
            self.request_stop()  # what Ctrl-C does
        return original(self, global_step, obs, *rest, **options)

    monkeypatch.setattr(experiment.Run, "end_iteration", end_iteration)
    args = mdp_args(tmp_path, mnist_dir)
    dqn.main(args)
    run_dir = Path(args.runs_dir) / args.run_name
    assert run_folder.read_status(run_dir).interrupted
    run_id = (run_dir / run_folder.WANDB_RUN_ID_FILE).read_text().strip()
    dqn.main(dqn.Args(resume=str(run_dir)))
    wandb.teardown()  # W&B's process ends, writing the rest of its logs
    assert (run_dir / run_folder.WANDB_RUN_ID_FILE).read_text().strip() == run_id
    first, resumed = offline_run(offline_wandb, run_id)  # `wandb sync` uploads both into run `run_id`
    before, after = history(first / f"run-{run_id}.wandb"), history(resumed / f"run-{run_id}.wandb")
    assert max(before) == 250 and min(after) == 300  # the resumed part only: old event files are not re-read
    td_loss = tensorboard_scalars(run_dir, "losses/td_loss")
    mirrored = {step: row["losses/td_loss"] for step, row in (before | after).items() if "losses/td_loss" in row}
    assert mirrored == pytest.approx(td_loss)
