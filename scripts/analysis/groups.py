"""Group runs by their config.json fields, and refuse groups that mix incompatible configurations.

A group is the set of runs that share the values of the ``--group-by`` fields
(seeds are the replicates).  Every other config field that changes what is
measured must agree inside a group, or the aggregate would silently average two
experiments; fields that only say where or how a run was executed may differ.
``variant`` is the sweep's name for a run's ``exp_name`` (scripts/sweeps/benchmark.py
passes ``--exp-name <variant>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agents.harness.run_folder import CONFIG_FILE
from scripts.analysis.tbreader import RunData

#: Names accepted by --group-by for config fields.
FIELD_ALIASES = {"variant": "exp_name"}

#: Config fields that may differ inside a group: replicates, bookkeeping and where the run executed.
BOOKKEEPING_FIELDS = frozenset({
    "seed", "run_name", "exp_name", "runs_dir", "resume", "data_dir", "checkpoint_every", "checkpoint_buffer",
    "cuda", "buffer_device", "torch_deterministic",
    "population", "num_seeds",  # a population member is its single run; which process trained it is bookkeeping
})


@dataclass
class Group:
    values: dict
    """the group-by field values shared by the group's runs"""
    runs: list[RunData]
    label: str = ""

    def strata(self, field: str = "env_id") -> dict[str, list[RunData]]:
        """The group's runs per task (env id): the strata of the stratified bootstrap."""
        strata: dict[str, list[RunData]] = {}
        for run in self.runs:
            strata.setdefault(str(run.config.get(field)), []).append(run)
        return strata


def config_field(field: str) -> str:
    return FIELD_ALIASES.get(field, field)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _describe(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def group_runs(runs: list[RunData], group_by: list[str], allow_differing=()) -> list[Group]:
    """Groups in first-seen order; a ValueError names the fields that differ inside a group."""
    if not runs:
        raise ValueError("no runs to group")
    fields = [config_field(field) for field in group_by]
    for field, given in zip(fields, group_by):
        missing = [run.name for run in runs if field not in run.config]
        if missing:
            known = ", ".join(sorted({key for run in runs for key in run.config}))
            raise ValueError(f"--group-by {given}: {len(missing)} run(s) have no {field!r} in {CONFIG_FILE} "
                             f"(e.g. {missing[0]}); config fields: {known or f'none (no {CONFIG_FILE})'}")
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple(_canonical(run.config[field]) for field in fields)
        if key not in groups:
            groups[key] = Group(values={given: run.config[field] for field, given in zip(fields, group_by)}, runs=[])
        groups[key].runs.append(run)

    exempt = BOOKKEEPING_FIELDS | set(fields) | {config_field(field) for field in allow_differing}
    for group in groups.values():
        differing = {}
        all_fields = sorted({key for run in group.runs for key in run.config} - exempt)
        for field in all_fields:
            values: dict[str, RunData] = {}
            for run in group.runs:  # the first run with each value, to name in the message
                values.setdefault(_canonical(run.config.get(field, "<missing>")), run)
            if len(values) > 1:
                differing[field] = values
        if differing:
            details = "; ".join(
                f"{field}: " + ", ".join(f"{_describe(run.config.get(field, '<missing>'))} in {run.name}"
                                         for run in list(values.values())[:2])
                for field, values in differing.items())
            where = ", ".join(f"{key}={_describe(value)}" for key, value in group.values.items()) or "all runs"
            names = " ".join(differing)
            raise ValueError(f"runs grouped together ({where}) differ in {', '.join(differing)} ({details}); "
                             f"add them to --group-by, or pass --allow-differing {names} if that is intended")
    result = list(groups.values())
    _label(result)
    return result


def _label(groups: list[Group]) -> None:
    """Legend labels: only the group-by fields whose value changes between groups."""
    keys = list(groups[0].values)
    varying = [key for key in keys if len({_canonical(group.values[key]) for group in groups}) > 1]
    for group in groups:
        shown = varying or keys
        if not shown:
            group.label = "all runs"
        elif len(shown) == 1:
            group.label = _describe(group.values[shown[0]])
        else:
            group.label = ", ".join(f"{key}={_describe(group.values[key])}" for key in shown)
