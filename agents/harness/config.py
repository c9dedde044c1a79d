"""Command-line arguments shared by both agents, their validation, and the run tag.

Each agent declares ``@dataclass class Args(CommonArgs)`` with its own algorithm
fields and CleanRL defaults (spec agents.md); tyro turns every field docstring
into ``--help``.  Everything here is plumbing the two agents must agree on, kept
once so a fix lands once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tyro.conf import DisallowNone

from agents.harness import video, wandb_tracking
from plasticity.flags import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_COUNT,
    UNIT_INTERVAL,
    Range,
    check_ranges,
    ranged,
)
from plasticity.intervention import Setting
from plasticity.interventions import METHODS, InterventionFlags, check_intervention_flags


class ConfigError(ValueError):
    """An invalid flag or flag combination; the agents print it and exit with status 2."""


SEED = Range(low=0, high=2**32 - 1, integer=True)
SEED_PLACEHOLDER = "{seed}"  # in --run-name: each population member's seed  # what numpy's global seeding accepts
FINITE = Range()


@dataclass
class CommonArgs(InterventionFlags):
    """Every flag both agents take; the plasticity methods' flags come from ``InterventionFlags``."""

    # --- experiment ---
    exp_name: str = ""
    """a name for the experiment (sweeps use it for the variant); defaults to the agent name"""
    seed: int = ranged(1, SEED)
    """seed of the experiment (python, numpy, torch and the environment)"""
    num_seeds: int = ranged(1, POSITIVE_COUNT)
    """train a population: seeds --seed ... --seed+N-1 together in one process, vectorised; member k is exactly the run --seed s+k would make and writes its own run folder"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` (as CleanRL; CPU runs are deterministic regardless)"""
    cuda: bool = torch.cuda.is_available()
    """train on CUDA (default: on when a CUDA device is present); --cuda without one is an error"""
    bf16: bool = False
    """bfloat16 mixed precision: each update's torso forward/backward under autocast (~28% faster updates on AVX512-BF16 CPUs; on CUDA needs bf16 support); weights, optimizer, head, losses, acting, diagnostics stay float32"""
    runs_dir: str = "runs"
    """folder that holds one sub-folder per run (TensorBoard files, config.json, checkpoint.pt)"""
    run_name: str = ""
    """exact run folder name under --runs-dir (default: <env>__<agent>__<tag>__<seed>__<unix time>); {seed} in it becomes each member's seed, else a population's members get <run-name>-seed<seed>"""
    checkpoint_every: int = ranged(100_000, COUNT)
    """save a checkpoint every this many env steps (0: only at the end and on interruption)"""
    checkpoint_buffer: Literal["auto", "always", "never"] = "auto"
    """store the replay buffer in checkpoints (auto: when it is at most 2 GiB) -- needed for an exact resume"""
    resume: str = ""
    """path of a run folder to continue from its checkpoint.pt, with its saved config.json"""
    log_every: int = ranged(1000, POSITIVE_COUNT)
    """write the scalar charts (SPS, losses, accuracy) every this many env steps"""

    # --- experiment tracking (Weights & Biases, as CleanRL) ---
    track: bool = False
    """if toggled, mirror the run to Weights & Biases: its TensorBoard scalars and config (needs `pip install -e ".[wandb]"`; WANDB_MODE=offline to sync later)"""
    wandb_project_name: str = "plasticity-rl"
    """the W&B project name"""
    wandb_entity: str = ""
    """the W&B entity (team or user) of the project; empty: your W&B default entity"""

    # --- environment ---
    env_id: str = "ALE/Breakout-v5"
    """Atari id (ALE/Breakout-v5 or BreakoutNoFrameskip-v4) or ImageMDP/{mnist,fashion_mnist,cifar10}"""
    total_timesteps: int | None = ranged(None, POSITIVE_COUNT, optional=True)
    """total env steps of the run (default: 10M on Atari, 200k on the image MDP)"""
    num_envs: int = ranged(1, POSITIVE_COUNT)
    """number of parallel environments (updates stay one per --train-frequency env steps)"""
    # image MDP (spec environments.md §1)
    variant: Literal["easy", "random_label", "sparse"] = "easy"
    """image-MDP variant: easy (reward for the right label), random_label (memorisation), sparse (chain)"""
    shift: list[str] = field(default_factory=lambda: ["none"])
    """image-MDP shifts, combinable: none label_permutation random_labels label_noise pixel_permutation reward_offset"""
    shift_every: int = ranged(20_000, POSITIVE_COUNT)
    """image-MDP: env steps between task switches"""
    shift_frac: float = ranged(0.1, UNIT_INTERVAL)
    """image-MDP label_noise: fraction of images relabelled at each switch"""
    reward_offset: float = ranged(0.0, FINITE)
    """reward offset per task: r + offset*task_id (image-MDP --shift reward_offset; Atari --atari-shift reward_offset)"""
    data_dir: str = ""
    """dataset folder (default: $PLASTICITY_DATA, else ~/.cache/plasticity/<dataset>, downloaded once)"""
    num_images: int = ranged(0, COUNT)
    """image-MDP: use a class-balanced subset of this many images (0: all)"""
    episode_length: int = ranged(1000, POSITIVE_COUNT)
    """image-MDP: the continuing task is truncated every this many steps, for logging only"""
    # Atari (spec environments.md §2).  The None fields are "not given": --protocol fills them, then
    # ATARI_DEFAULTS (resolve_family_defaults), so a flag given on the command line always wins.
    protocol: Literal["none", "cleanrl", "machado", "atari100k"] = "none"
    """Atari protocol preset (README "Atari protocols"): fills each flag of this block and --total-timesteps that is not given on the command line; none: the defaults in [brackets]"""
    env_stack: DisallowNone[Literal["ale", "cleanrl"] | None] = None
    """Atari preprocessing: ale (ale-py's AtariVectorEnv in C++; FIRE once per game) or cleanrl (CleanRL's SB3 wrapper stack step for step: FIRE after every reset, also after each lost life; one thread) [ale]"""
    sticky_actions: DisallowNone[float | None] = ranged(None, UNIT_INTERVAL, optional=True)
    """Atari: probability of repeating the previous action (Machado et al. 2018: 0.25; 0 disables) [0.25]"""
    full_action_space: DisallowNone[bool | None] = None
    """Atari: use all 18 actions (always on with --atari-shift games) [off]"""
    episodic_life: DisallowNone[bool | None] = None
    """Atari: treat a lost life as terminal for learning (returns are still logged per game) [off]"""
    fire_reset: DisallowNone[bool | None] = None
    """Atari: press FIRE at reset in games that have it (cleanrl stack: FIRE then action 2, as FireResetEnv) [on]"""
    noop_max: DisallowNone[int | None] = ranged(None, COUNT, optional=True)
    """Atari: random no-ops at reset; ale stack 0..N-1 frames (the FIRE counts as one), cleanrl 1..N; 0: none [30]"""
    max_episode_frames: DisallowNone[int | None] = ranged(None, POSITIVE_COUNT, optional=True)
    """Atari: truncate an episode after this many emulator frames (108000 = 30 min at 60 Hz) [108000]"""
    atari_shift: list[str] = field(default_factory=list)
    """nonstationary Atari shifts, combinable: games modes difficulties action_permutation obs_invert obs_permutation reward_offset reward_scale"""
    switch_every: int = ranged(0, COUNT)
    """nonstationary Atari: env steps between task switches"""
    games: list[str] = field(default_factory=list)
    """nonstationary Atari: games cycled by the games shift (e.g. Pong Breakout Freeway)"""
    modes: list[int] = ranged(None, COUNT, default_factory=list)
    """nonstationary Atari: ALE game modes cycled by the modes shift"""
    difficulties: list[int] = ranged(None, COUNT, default_factory=list)
    """nonstationary Atari: ALE difficulties cycled by the difficulties shift"""
    reward_scale: float = ranged(1.0, POSITIVE)
    """nonstationary Atari reward_scale shift: in task k the learning reward is sign(r)*scale**k (+ k*offset)"""

    # --- algorithm (shared defaults; each agent overrides what differs) ---
    buffer_size: int | None = ranged(None, POSITIVE_COUNT, optional=True)
    """replay memory size in transitions (default: 1M on Atari, 100k on the image MDP)"""
    buffer_device: str = "auto"
    """where the replay buffer lives: auto (training device when it fits), cpu, cuda"""
    gamma: float = ranged(0.99, UNIT_INTERVAL)
    """the discount factor gamma"""
    batch_size: int = ranged(32, POSITIVE_COUNT)
    """the batch size of sample from the replay memory"""
    start_e: float = ranged(1.0, UNIT_INTERVAL)
    """the starting epsilon for exploration"""
    end_e: float = ranged(0.01, UNIT_INTERVAL)
    """the ending epsilon for exploration"""
    exploration_fraction: float = ranged(0.10, Range(low=0.0, high=1.0, low_open=True))
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int | None = ranged(None, COUNT, optional=True)
    """env steps before learning starts (default: 80k on Atari, 1k on the image MDP)"""
    train_frequency: int = ranged(4, POSITIVE_COUNT)
    """F: env steps between training iterations (one iteration = --gradient-steps gradient steps)"""
    gradient_steps: int = ranged(1, POSITIVE_COUNT)
    """G: gradient steps per training iteration, each on a fresh batch; updates per transition rho = G/(F*num_envs)"""
    replay_ratio: float | None = ranged(None, POSITIVE, optional=True)
    """rho, gradient steps per env transition (D'Oro et al.; BBF's replay_ratio is rho*batch-size): sets F and G (r = rho*num_envs: integer r -> F=1, G=r; 1/r integer -> G=1, F=1/r)"""
    double_q: bool = False
    """double-DQN targets: the online network picks the next action, the target network values it"""
    v_min: float = ranged(-10.0, FINITE)
    """lower end of the categorical support (C51 atoms; HL-Gauss/two-hot bins)"""
    v_max: float = ranged(10.0, FINITE)
    """upper end of the categorical support"""
    n_atoms: int = ranged(51, Range(low=2, integer=True))
    """number of atoms/bins of the categorical support"""

    # --- network ---
    network: Literal["auto", "nature_cnn", "mlp", "cnn"] = "auto"
    """torso: auto picks nature_cnn for 84x84 frame stacks, mlp otherwise"""
    hidden_sizes: list[int] = ranged(None, POSITIVE_COUNT, default_factory=lambda: [256, 256])
    """hidden widths of the mlp torso"""

    layer_norm: bool = False
    """LayerNorm on every hidden pre-activation (Linear/Conv -> LN -> activation)"""
    activation: Literal["relu", "crelu", "dff"] = "relu"
    """hidden activation: relu, crelu [relu(z), relu(-z)] (Abbas et al. 2023) or dff [sin z, cos z] (Lewandowski et al. 2025); both emit two outputs per unit"""
    activation_width: Literal["double", "halve"] = "double"
    """crelu/dff widths: double (n units emit 2n, the next layer's input doubles; Plasticine) or halve (n/2 units, the next layer unchanged; Parseval code) [U]"""

    # --- diagnostics (spec diagnostics.md) ---
    diag_every: int = ranged(10_000, COUNT)
    """compute the plasticity diagnostics every this many env steps (0 disables)"""
    diag_batch: int = ranged(1024, Range(low=2, integer=True))
    """probe batch size (replay states) for the diagnostics"""
    dormant_tau: float = ranged(0.1, NON_NEGATIVE)
    """threshold of plasticity/dormant_frac"""
    entk_every: int = ranged(0, COUNT)
    """empirical-NTK rank/condition every this many env steps (0: off)"""
    hessian_every: int = ranged(0, COUNT)
    """top Hessian eigenvalue every this many env steps (0: off)"""
    probe_every: int = ranged(0, COUNT)
    """plasticity probe (fit random targets on a copy) every this many env steps (0: off)"""

    # --- evaluation, videos, saved model ---
    # None: not given; resolved from --protocol, else EVAL_DEFAULTS (so an explicit value always wins).
    eval_every: DisallowNone[int | None] = ranged(None, COUNT, optional=True)
    """greedy evaluation every this many env steps, on envs of its own (default 0: off; --protocol atari100k: once, at the end): charts/eval_return, charts/eval_hns (Atari), charts/eval_accuracy (image MDP)"""
    eval_episodes: DisallowNone[int | None] = ranged(None, POSITIVE_COUNT, optional=True)
    """episodes per evaluation (default 10; --protocol atari100k: 100; Atari: whole games; image MDP: --episode-length steps each)"""
    eval_epsilon: float = ranged(0.001, UNIT_INTERVAL)
    """epsilon of the evaluation policy (Machado et al. 2018: 0.001; the greedy answers give charts/eval_accuracy)"""
    capture_video: bool = False
    """record an evaluation episode as <run>/videos/eval_<step>.mp4 (needs --eval-every and `pip install -e ".[video]"`)"""
    video_every: int = ranged(1, POSITIVE_COUNT)
    """with --capture-video: record every this many evaluations"""
    save_model: bool = False
    """write the final online network to <run>/model.pt (a state dict; scripts/evaluate.py plays it)"""


#: Defaults that depend on the environment family: (Atari, image MDP).
FAMILY_DEFAULTS = {
    "total_timesteps": (10_000_000, 200_000),
    "buffer_size": (1_000_000, 100_000),
    "learning_starts": (80_000, 1_000),
}

#: Toggles shown in the run tag when they differ from the defaults, with their short names
#: (each plasticity method declares its own in its flags class).
TAG_FIELDS = {
    "layer_norm": "ln", "loss": "loss", **{flag: short for method in METHODS for flag, short in method.TAGS.items()},
    "double_q": "ddqn", "network": "net", "shift": "shift", "atari_shift": "ashift", "bf16": "bf16",
    "protocol": "proto", "train_frequency": "tf", "gradient_steps": "gs", "replay_ratio": "rr",
    "activation": "act",
}


#: Evaluation defaults for the fields left None (no --protocol value for them).
EVAL_DEFAULTS = {"eval_every": 0, "eval_episodes": 10}

#: Atari env defaults of --protocol none (today's behaviour), for the fields left None.
ATARI_DEFAULTS = {
    "env_stack": "ale", "sticky_actions": 0.25, "full_action_space": False, "episodic_life": False,
    "fire_reset": True, "noop_max": 30, "max_episode_frames": 108_000,
}


@dataclass(frozen=True)
class SameAs:
    """A preset value that copies another field's resolved value (``SameAs("total_timesteps")``: at the end)."""

    field: str


#: --protocol presets, the published bundles (sources per value in README "Atari protocols").  A preset
#: fills the fields still None (not given on the command line); fields with a non-None default (the
#: evaluation flags) it fills only while they hold that default, and only if Args has them.
PROTOCOLS: dict[str, dict[str, object]] = {
    "none": {},
    # CleanRL dqn_atari.py: BreakoutNoFrameskip-v4 + SB3 NoopReset(30)/MaxAndSkip(4)/EpisodicLife/FireReset.
    "cleanrl": {"env_stack": "cleanrl", "sticky_actions": 0.0, "full_action_space": False, "episodic_life": True,
                "fire_reset": True, "noop_max": 30, "max_episode_frames": 108_000,
                "total_timesteps": 10_000_000},
    # Machado et al. 2018: sticky actions, game over only, no no-op starts; results up to 200M frames.
    "machado": {"env_stack": "ale", "sticky_actions": 0.25, "full_action_space": True, "episodic_life": False,
                "fire_reset": False, "noop_max": 0, "max_episode_frames": 108_000,
                "total_timesteps": 50_000_000},
    # Atari 100k (Kaiser et al. 2019) as DER/SPR/DrQ/BBF run it: 100k agent steps, 100 eval episodes at the end.
    "atari100k": {"env_stack": "ale", "sticky_actions": 0.0, "full_action_space": False, "episodic_life": True,
                  "fire_reset": False, "noop_max": 30, "max_episode_frames": 108_000,
                  "total_timesteps": 100_000, "eval_episodes": 100, "eval_every": SameAs("total_timesteps")},
}

#: The 26 games of the Atari 100k benchmark (Kaiser et al. 2019), as ALE ids.
ATARI_100K_GAMES = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout", "ChopperCommand",
    "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero", "Jamesbond", "Kangaroo", "Krull",
    "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert", "RoadRunner", "Seaquest", "UpNDown",
)


def protocol_values(args: CommonArgs) -> dict[str, object]:
    """The values ``args.protocol`` gives to ``args``'s fields (only the fields ``args`` has)."""
    names = {f.name for f in dataclasses.fields(args)}
    return {name: value for name, value in PROTOCOLS[args.protocol].items() if name in names}


def resolve_family_defaults(args: CommonArgs, is_atari: bool) -> None:
    """Fill the fields not given on the command line: the --protocol preset, then the family's defaults.

    A field counts as not given when it is None (every field a preset sets has a None default,
    including the evaluation flags).  So an explicit flag wins over the preset, even one equal to a
    default.
    """
    if args.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {args.protocol!r}")
    if args.protocol != "none" and not is_atari:
        raise ConfigError(f"--protocol {args.protocol} is an Atari protocol; {args.env_id} is an image-MDP id "
                          "(drop --protocol, or use an Atari id such as ALE/Breakout-v5)")
    preset = protocol_values(args)
    for name, value in preset.items():
        if not isinstance(value, SameAs) and getattr(args, name) is None:
            setattr(args, name, value)
    for name, (atari_value, mdp_value) in FAMILY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, atari_value if is_atari else mdp_value)
    for name, value in preset.items():  # copies of resolved values (atari100k: evaluate at the end)
        if isinstance(value, SameAs) and getattr(args, name) is None:
            setattr(args, name, getattr(args, value.field))
    for name, value in {**ATARI_DEFAULTS, **EVAL_DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def replay_settings(replay_ratio: float, num_envs: int) -> tuple[int, int]:
    """(F, G) of ``--replay-ratio rho`` (methods-v2.md §3): r = rho·num_envs; integer r -> (1, r); integer 1/r -> (1/r, 1)."""
    r = replay_ratio * num_envs
    if r >= 1 and abs(r - round(r)) < 1e-9:
        return 1, int(round(r))
    if r < 1 and abs(1 / r - round(1 / r)) < 1e-6:
        return int(round(1 / r)), 1
    raise ConfigError(f"--replay-ratio {replay_ratio:g} with --num-envs {num_envs}: rho*num_envs = {r:g} must be an "
                      "integer (G gradient steps every env step) or 1/integer (one gradient step every F env steps); "
                      "or set --train-frequency and --gradient-steps directly")


def resolve_replay_ratio(args: CommonArgs) -> None:
    """``--replay-ratio`` sets ``--train-frequency`` and ``--gradient-steps`` (a fresh run; a resumed one has them)."""
    if args.replay_ratio is None or not POSITIVE.contains(args.replay_ratio):
        return  # out of range: validate() says so
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    given = [flag for flag, name in (("--train-frequency", "train_frequency"), ("--gradient-steps", "gradient_steps"))
             if getattr(args, name) != defaults[name]]
    if given:
        raise ConfigError(f"--replay-ratio and {' '.join(given)} set the same quantity (updates per transition "
                          f"rho = G/(F*num_envs)); give one of them")
    args.train_frequency, args.gradient_steps = replay_settings(args.replay_ratio, args.num_envs)


def run_tag(args: CommonArgs) -> str:
    """Short digest of the non-default toggles, e.g. ``ln-l2_1e-05-swr_0.001`` (``base`` when none)."""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(type(args))}
    parts = []
    for name, short in TAG_FIELDS.items():
        if not hasattr(args, name) or getattr(args, name) == defaults.get(name):
            continue
        value = getattr(args, name)
        if value is True:
            parts.append(short)
        elif isinstance(value, list):
            parts.append(f"{short}_{'+'.join(map(str, value))}")
        elif isinstance(value, float):
            parts.append(f"{short}_{value:g}")
        else:  # a folder name: no ':' (Windows, W&B), lists joined by '+'
            parts.append(f"{short}_{str(value).replace(':', '').replace(',', '+')}")
    return "-".join(parts) or "base"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def total_updates(args: CommonArgs) -> int:
    """Gradient steps of the whole run: G per multiple of F after learning starts (``experiment.updates_done``)."""
    total, starts = args.total_timesteps or 0, args.learning_starts or 0
    if total <= starts:
        return 0
    return args.gradient_steps * (total // args.train_frequency - starts // args.train_frequency)


def setting_of(args: CommonArgs, *, is_atari: bool, categorical: bool) -> Setting:
    """The facts about this run that the methods' flag rules depend on."""
    return Setting(categorical=categorical, layer_norm=args.layer_norm,
                   task_switches=not is_atari or bool(args.atari_shift),
                   learning_starts=args.learning_starts or 0, batch_size=args.batch_size,
                   total_updates=total_updates(args))


def check_writable_place(flag: str, path: str) -> None:
    """``path`` is a folder, or can be made as one: its nearest existing ancestor is a writable folder."""
    target = Path(path).expanduser()
    check(not target.exists() or target.is_dir(), f"{flag} {path} is a file; give a folder")
    existing = next(parent for parent in (target, *target.absolute().parents) if parent.exists())
    check(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
          f"{flag} {path}: cannot create folders in {existing}; give a writable folder")


def check_paths(args: CommonArgs) -> None:
    """Every path flag has its kind: folders to write into, folders that must exist, plain folder names."""
    check_writable_place("--runs-dir", args.runs_dir)
    if args.data_dir:  # downloads go there when the files are missing
        check_writable_place("--data-dir", args.data_dir)
    if args.run_name:
        plain = args.run_name.replace(SEED_PLACEHOLDER, "0")
        check(re.fullmatch(r"[A-Za-z0-9._+=,-]+", plain) is not None and plain not in (".", ".."),
              f"--run-name {args.run_name!r} must be one plain folder name (letters, digits, . _ + = , -, "
              f"and {SEED_PLACEHOLDER} for the seed)")
    if args.resume:
        check(Path(args.resume).is_dir(), f"--resume {args.resume}: no such run folder")
    check(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", args.buffer_device) is not None,
          f"--buffer-device must be auto, cpu, cuda or cuda:N, got {args.buffer_device!r}")


def check_evaluation(args: CommonArgs) -> None:
    """The evaluation flags act only through --eval-every (videos through --capture-video): never silently ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(CommonArgs)}
    if not args.eval_every:
        unused = [flag for flag, used in (("--eval-episodes", args.eval_episodes != EVAL_DEFAULTS["eval_episodes"]),
                                          ("--eval-epsilon", args.eval_epsilon != defaults["eval_epsilon"]),
                                          ("--capture-video", args.capture_video)) if used]
        check(not unused, f"{' '.join(unused)} only act through --eval-every N (greedy evaluations during "
                          "training); add it, or evaluate a finished run with scripts/evaluate.py")
    check(args.capture_video or args.video_every == defaults["video_every"],
          "--video-every only acts with --capture-video; add it or drop the flag")
    check(not args.capture_video or video.available(), video.MISSING)


def validate(args: CommonArgs, *, is_atari: bool, categorical: bool) -> None:
    """Reject invalid values and combinations before any work starts (one clear message each).

    Every numeric flag is checked against the range declared on its field (``plasticity.flags``),
    every path flag against its kind, each method's combination rules in its own module.
    """
    try:
        check_ranges(args)
        check_intervention_flags(args, setting_of(args, is_atari=is_atari, categorical=categorical))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_paths(args)
    check(args.seed + args.num_seeds - 1 <= SEED.high,
          f"--seed {args.seed} --num-seeds {args.num_seeds}: the last member's seed {args.seed + args.num_seeds - 1} "
          f"exceeds {SEED.high}; give a smaller --seed")
    check(not args.track or wandb_tracking.available(), wandb_tracking.MISSING)
    check(not (args.track and args.num_seeds > 1),
          "--track mirrors one run per process (W&B's TensorBoard sync is process-wide), and a population writes "
          "--num-seeds run folders: drop --track and upload the members' folders afterwards with "
          "`wandb sync --sync-tensorboard runs/<member folder>`, or track single-seed runs")
    check_evaluation(args)
    check(not args.cuda or torch.cuda.is_available(),
          "--cuda was given but no CUDA device is available; run with --no-cuda or on a machine with a GPU")
    check(not (args.bf16 and args.cuda) or torch.cuda.is_bf16_supported(including_emulation=False),
          "--bf16 needs a GPU with bfloat16 support (compute capability 8.0+, e.g. A100/H100); "
          "run without --bf16 on this GPU")
    check(args.buffer_device in ("cpu", "auto") or torch.cuda.is_available(),
          "--buffer-device cuda needs a CUDA device")
    check(args.activation != "relu" or args.activation_width == "double",
          "--activation-width only acts with --activation crelu or dff; add one or drop the flag")
    if args.hare_tortoise and args.hare_tortoise_target == "tortoise":
        default_period = next(f.default for f in dataclasses.fields(type(args)) if f.name == "target_network_frequency")
        check(args.target_network_frequency == default_period,
              f"--target-network-frequency {args.target_network_frequency} with --hare-tortoise-target tortoise: the "
              "tortoise (an EMA of the online network, every gradient step) is the target, there are no hard syncs; "
              "drop one of them")
    if args.replay_ratio is not None:
        check(replay_settings(args.replay_ratio, args.num_envs) == (args.train_frequency, args.gradient_steps),
              f"--replay-ratio {args.replay_ratio:g} and --train-frequency {args.train_frequency} --gradient-steps "
              f"{args.gradient_steps} set the same quantity (rho = G/(F*num_envs)); give one of them")
    check(args.buffer_size >= args.batch_size,
          f"--buffer-size ({args.buffer_size}) must be at least --batch-size ({args.batch_size})")
    if categorical:
        check(args.v_min < args.v_max, f"--v-min ({args.v_min}) must be smaller than --v-max ({args.v_max})")
    if is_atari:
        check(args.shift in ([], ["none"]),
              f"--shift {' '.join(args.shift)} applies to the image MDP only; on Atari use --atari-shift")
        if not args.atari_shift:
            unused = [flag for flag, used in (("--reward-offset", args.reward_offset != 0.0),
                                              ("--reward-scale", args.reward_scale != 1.0), ("--games", args.games),
                                              ("--modes", args.modes), ("--difficulties", args.difficulties),
                                              ("--switch-every", args.switch_every)) if used]
            check(not unused, f"{' '.join(unused)} only act through --atari-shift; add the shift "
                              "(e.g. --atari-shift reward_offset) or drop the flag")
        else:
            check(args.switch_every >= 1, "--atari-shift needs --switch-every N (env steps between task switches)")
            check(args.switch_every % args.num_envs == 0,
                  f"--switch-every ({args.switch_every}) must be a multiple of --num-envs ({args.num_envs}): "
                  "switches happen between vector steps")
    else:
        check(not args.atari_shift, "--atari-shift applies to Atari ids only; on the image MDP use --shift")
        check(args.shift_every % args.num_envs == 0,
              f"--shift-every ({args.shift_every}) must be a multiple of --num-envs ({args.num_envs}): "
              "switches happen between vector steps")
