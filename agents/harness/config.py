"""Command-line arguments shared by both agents, their validation, and the run tag.

Each agent declares ``@dataclass class Args(CommonArgs)`` with its own algorithm
fields and CleanRL defaults (spec agents.md); tyro turns every field docstring
into ``--help``.  Everything here is plumbing the two agents must agree on, kept
once so a fix lands once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from plasticity.losses import CATEGORICAL_LOSSES


class ConfigError(ValueError):
    """An invalid flag or flag combination; the agents print it and exit with status 2."""


@dataclass
class CommonArgs:
    # --- experiment ---
    exp_name: str = ""
    """a name for the experiment (sweeps use it for the variant); defaults to the agent name"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environment)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` (as CleanRL; CPU runs are deterministic regardless)"""
    cuda: bool = torch.cuda.is_available()
    """train on CUDA (default: on when a CUDA device is present); --cuda without one is an error"""
    bf16: bool = False
    """bfloat16 mixed precision: each update's torso forward/backward under autocast (~28% faster updates on AVX512-BF16 CPUs; on CUDA needs bf16 support); weights, optimizer, head, losses, acting, diagnostics stay float32"""
    runs_dir: str = "runs"
    """folder that holds one sub-folder per run (TensorBoard files, config.json, checkpoint.pt)"""
    run_name: str = ""
    """exact run folder name under --runs-dir (default: <env>__<agent>__<tag>__<seed>__<unix time>)"""
    checkpoint_every: int = 100_000
    """save a checkpoint every this many env steps (0: only at the end and on interruption)"""
    checkpoint_buffer: Literal["auto", "always", "never"] = "auto"
    """store the replay buffer in checkpoints (auto: when it is at most 2 GiB) -- needed for an exact resume"""
    resume: str = ""
    """path of a run folder to continue from its checkpoint.pt, with its saved config.json"""
    log_every: int = 1000
    """write the scalar charts (SPS, losses, accuracy) every this many env steps"""

    # --- environment ---
    env_id: str = "ALE/Breakout-v5"
    """Atari id (ALE/Breakout-v5 or BreakoutNoFrameskip-v4) or ImageMDP/{mnist,fashion_mnist,cifar10}"""
    total_timesteps: int | None = None
    """total env steps of the run (default: 10M on Atari, 200k on the image MDP)"""
    num_envs: int = 1
    """number of parallel environments (updates stay one per --train-frequency env steps)"""
    # image MDP (spec environments.md §1)
    variant: Literal["easy", "random_label", "sparse"] = "easy"
    """image-MDP variant: easy (reward for the right label), random_label (memorisation), sparse (chain)"""
    shift: list[str] = field(default_factory=lambda: ["none"])
    """image-MDP shifts, combinable: none label_permutation random_labels label_noise pixel_permutation reward_offset"""
    shift_every: int = 20_000
    """image-MDP: env steps between task switches"""
    shift_frac: float = 0.1
    """image-MDP label_noise: fraction of images relabelled at each switch"""
    reward_offset: float = 0.0
    """reward offset per task: r + offset*task_id (image-MDP --shift reward_offset; Atari --atari-shift reward_offset)"""
    data_dir: str = ""
    """dataset folder (default: $PLASTICITY_DATA, else ~/.cache/plasticity/<dataset>, downloaded once)"""
    num_images: int = 0
    """image-MDP: use a class-balanced subset of this many images (0: all)"""
    episode_length: int = 1000
    """image-MDP: the continuing task is truncated every this many steps, for logging only"""
    # Atari (spec environments.md §2)
    sticky_actions: float = 0.25
    """Atari: probability of repeating the previous action (Machado et al. 2018: 0.25; 0 disables)"""
    full_action_space: bool = False
    """Atari: use all 18 actions (always on with --atari-shift games)"""
    episodic_life: bool = False
    """Atari: treat a lost life as terminal for learning (returns are still logged per game)"""
    atari_shift: list[str] = field(default_factory=list)
    """nonstationary Atari shifts, combinable: games modes difficulties action_permutation obs_invert obs_permutation reward_offset reward_scale"""
    switch_every: int = 0
    """nonstationary Atari: env steps between task switches"""
    games: list[str] = field(default_factory=list)
    """nonstationary Atari: games cycled by the games shift (e.g. Pong Breakout Freeway)"""
    modes: list[int] = field(default_factory=list)
    """nonstationary Atari: ALE game modes cycled by the modes shift"""
    difficulties: list[int] = field(default_factory=list)
    """nonstationary Atari: ALE difficulties cycled by the difficulties shift"""
    reward_scale: float = 1.0
    """nonstationary Atari reward_scale shift: in task k the learning reward is sign(r)*scale**k (+ k*offset)"""

    # --- algorithm (shared defaults; each agent overrides what differs) ---
    buffer_size: int | None = None
    """replay memory size in transitions (default: 1M on Atari, 100k on the image MDP)"""
    buffer_device: str = "auto"
    """where the replay buffer lives: auto (training device when it fits), cpu, cuda"""
    gamma: float = 0.99
    """the discount factor gamma"""
    batch_size: int = 32
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.10
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int | None = None
    """env steps before learning starts (default: 80k on Atari, 1k on the image MDP)"""
    train_frequency: int = 4
    """env steps between gradient updates"""
    double_q: bool = False
    """double-DQN targets: the online network picks the next action, the target network values it"""
    v_min: float = -10.0
    """lower end of the categorical support (C51 atoms; HL-Gauss/two-hot bins)"""
    v_max: float = 10.0
    """upper end of the categorical support"""
    n_atoms: int = 51
    """number of atoms/bins of the categorical support"""

    # --- network ---
    network: Literal["auto", "nature_cnn", "mlp", "cnn"] = "auto"
    """torso: auto picks nature_cnn for 84x84 frame stacks, mlp otherwise"""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """hidden widths of the mlp torso"""

    # --- plasticity interventions (spec methods.md), all combinable ---
    layer_norm: bool = False
    """LayerNorm on every hidden pre-activation (Linear/Conv -> LN -> ReLU)"""
    l2: float = 0.0
    """L2 penalty (lambda/2)*sum ||W||^2 added to the loss (norm layers excluded); 0 disables"""
    l2_init: float = 0.0
    """L2-Init penalty (lambda/2)*sum ||theta - theta0||^2 added to the loss; 0 disables"""
    swr: float = 0.0
    """Soft Weight Rescaling coefficient lambda in (0, 1], applied after every update; 0 disables"""
    swr_head: float | None = None
    """separate SWR coefficient for the output head (default: same as --swr)"""
    cbp: bool = False
    """Continual Backprop: replace low-utility mature hidden units after every update"""
    cbp_replacement_rate: float = 1e-4
    """CBP: fraction of eligible units replaced per update (fractional counts accumulate)"""
    cbp_maturity: int = 100
    """CBP: updates a unit must age before it can be replaced"""
    cbp_decay: float = 0.99
    """CBP: decay rate of the running utility and mean activation"""
    cbp_utility: Literal["contribution", "adaptable"] = "contribution"
    """CBP utility measure"""
    snp: float = 0.0
    """Shrink & Perturb: theta <- (1-a)*theta + a*fresh_init; 0 disables"""
    snp_every: int = 0
    """S&P cadence in updates (0: at task switches)"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold tau (0 means exactly dead units)"""
    redo_every: int = 0
    """ReDo: reset dormant units every this many updates; 0 disables"""
    reset_head_every: int = 0
    """re-initialise the output head (and its target copy) every this many updates; -1: at task switches; 0: off"""

    # --- diagnostics (spec diagnostics.md) ---
    diag_every: int = 10_000
    """compute the plasticity diagnostics every this many env steps (0 disables)"""
    diag_batch: int = 1024
    """probe batch size (replay states) for the diagnostics"""
    dormant_tau: float = 0.1
    """threshold of plasticity/dormant_frac"""
    entk_every: int = 0
    """empirical-NTK rank/condition every this many env steps (0: off)"""
    hessian_every: int = 0
    """top Hessian eigenvalue every this many env steps (0: off)"""
    probe_every: int = 0
    """plasticity probe (fit random targets on a copy) every this many env steps (0: off)"""


#: Defaults that depend on the environment family: (Atari, image MDP).
FAMILY_DEFAULTS = {
    "total_timesteps": (10_000_000, 200_000),
    "buffer_size": (1_000_000, 100_000),
    "learning_starts": (80_000, 1_000),
}

#: Toggles shown in the run tag when they differ from the defaults, with their short names.
TAG_FIELDS = {
    "layer_norm": "ln", "l2": "l2", "l2_init": "l2init", "loss": "loss", "swr": "swr", "swr_head": "swrhead",
    "cbp": "cbp", "snp": "snp", "redo_every": "redo", "reset_head_every": "headreset", "double_q": "ddqn",
    "network": "net", "shift": "shift", "atari_shift": "ashift", "bf16": "bf16",
}


def resolve_family_defaults(args: CommonArgs, is_atari: bool) -> None:
    """Fill the ``None`` fields whose CleanRL default only makes sense on Atari."""
    for name, (atari_value, mdp_value) in FAMILY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, atari_value if is_atari else mdp_value)


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
        else:
            parts.append(f"{short}_{value:g}" if isinstance(value, float) else f"{short}_{value}")
    return "-".join(parts) or "base"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_common(args: CommonArgs, *, is_atari: bool, categorical: bool) -> None:
    """Reject invalid values and combinations before any work starts (one clear message each)."""
    check(not args.cuda or torch.cuda.is_available(),
          "--cuda was given but no CUDA device is available; run with --no-cuda or on a machine with a GPU")
    check(not (args.bf16 and args.cuda) or torch.cuda.is_bf16_supported(including_emulation=False),
          "--bf16 needs a GPU with bfloat16 support (compute capability 8.0+, e.g. A100/H100); "
          "run without --bf16 on this GPU")
    check(args.total_timesteps > 0, f"--total-timesteps must be positive, got {args.total_timesteps}")
    check(args.num_envs >= 1, f"--num-envs must be at least 1, got {args.num_envs}")
    check(args.learning_rate > 0 and math.isfinite(args.learning_rate),
          f"--learning-rate must be a positive number, got {args.learning_rate}")
    check(args.buffer_size >= args.batch_size > 0,
          f"--buffer-size ({args.buffer_size}) must be at least --batch-size ({args.batch_size}) > 0")
    check(0.0 <= args.gamma <= 1.0, f"--gamma must be in [0, 1], got {args.gamma}")
    check(0.0 <= args.end_e <= 1.0 and 0.0 <= args.start_e <= 1.0, "--start-e and --end-e must be in [0, 1]")
    check(0.0 < args.exploration_fraction <= 1.0, "--exploration-fraction must be in (0, 1]")
    check(args.train_frequency >= 1 and args.target_network_frequency >= 1,
          "--train-frequency and --target-network-frequency must be at least 1")
    check(args.learning_starts >= 0, "--learning-starts must be >= 0")
    if categorical:
        check(args.v_min < args.v_max, f"--v-min ({args.v_min}) must be smaller than --v-max ({args.v_max})")
        check(args.n_atoms >= 2, f"a categorical loss needs --n-atoms >= 2, got {args.n_atoms}")
    check(0.0 <= args.swr <= 1.0, f"--swr must be in [0, 1] (0 disables), got {args.swr}")
    check(args.swr_head is None or 0.0 <= args.swr_head <= 1.0, "--swr-head must be in [0, 1]")
    check(args.swr_head is None or args.swr > 0, "--swr-head needs --swr > 0")
    check(args.l2 >= 0 and args.l2_init >= 0, "--l2 and --l2-init must be >= 0")
    check(0.0 <= args.snp <= 1.0, f"--snp must be in [0, 1], got {args.snp}")
    check(args.snp_every >= 0 and args.redo_every >= 0, "--snp-every and --redo-every must be >= 0")
    check(args.reset_head_every >= -1, "--reset-head-every must be >= 0, or -1 for a reset at every task switch")
    check(args.redo_tau >= 0, "--redo-tau must be >= 0")
    check(0.0 < args.cbp_decay < 1.0, "--cbp-decay must be in (0, 1)")
    check(0.0 <= args.cbp_replacement_rate <= 1.0, "--cbp-replacement-rate must be in [0, 1]")
    check(args.cbp_maturity >= 0, "--cbp-maturity must be >= 0")
    for name in ("diag_every", "entk_every", "hessian_every", "probe_every", "checkpoint_every"):
        check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    check(args.diag_batch >= 2, "--diag-batch must be at least 2")
    check(args.log_every >= 1, "--log-every must be at least 1")
    check(args.buffer_device in ("auto", "cpu", "cuda") or args.buffer_device.startswith("cuda:"),
          f"--buffer-device must be auto, cpu or cuda, got {args.buffer_device!r}")
    check(args.buffer_device == "cpu" or args.buffer_device == "auto" or torch.cuda.is_available(),
          "--buffer-device cuda needs a CUDA device")
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
            check(not (args.snp > 0 and args.snp_every == 0) and args.reset_head_every != -1,
                  "--snp-every 0 and --reset-head-every -1 act at task switches, and this Atari run has none "
                  "(no --atari-shift): give a period in updates instead")
        else:
            check(args.switch_every >= 1, "--atari-shift needs --switch-every N (env steps between task switches)")
            check(args.switch_every % args.num_envs == 0,
                  f"--switch-every ({args.switch_every}) must be a multiple of --num-envs ({args.num_envs}): "
                  "switches happen between vector steps")
    else:
        check(not args.atari_shift, "--atari-shift applies to Atari ids only; on the image MDP use --shift")
        check(args.shift_every >= 1, "--shift-every must be at least 1")
        check(args.shift_every % args.num_envs == 0,
              f"--shift-every ({args.shift_every}) must be a multiple of --num-envs ({args.num_envs}): "
              "switches happen between vector steps")
        check(0.0 <= args.shift_frac <= 1.0, "--shift-frac must be in [0, 1]")
        check(args.episode_length >= 1, "--episode-length must be at least 1")
        check(args.num_images >= 0, "--num-images must be >= 0 (0: all images)")


def is_categorical_loss(loss: str) -> bool:
    return loss in CATEGORICAL_LOSSES
