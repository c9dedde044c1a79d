"""Value ranges of hyperparameters, declared once and checked from that one declaration.

A method's hyperparameter is declared as a dataclass field with its range,

    decay: float = ranged(0.99, DECAY)
    \"\"\"the decay rate of the running utility\"\"\"

and ``check_ranges(flags)`` checks every declared field of a flags object.  The
method's own constructor checks its arguments against the same ``Range`` object
(``DECAY.check("cbp-decay", decay)``), so a library user and the command line get
the same rule and the same message.  Torch-free: ``--help`` and validation need
no tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_RANGE_KEY = "range"


@dataclass(frozen=True)
class Range:
    """The admissible values of one hyperparameter: an interval, optionally integers, plus special values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    special: tuple = ()
    """values admitted outside the interval, each with its meaning (e.g. ``((-1, "at task switches"),)``)"""

    def contains(self, value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return False
        if any(value == special for special, _ in self.special):
            return True
        if self.integer and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return False
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind.split()[-1]}"
        for special, meaning in self.special:
            text += f", or {special} ({meaning})"
        return text

    def check(self, flag: str, value: Any) -> None:
        """Raise ``ValueError("--flag must be ...; got value")`` unless ``value`` (or every list item) is in range."""
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not self.contains(item):
                where = " (every value)" if isinstance(value, (list, tuple)) else ""
                raise ValueError(f"--{flag} must be {self.describe()}{where}; got {value!r}")

    def invalid_examples(self) -> list:
        """Values just outside the range (and NaN for real-valued ones): what a test feeds to the validator."""
        step = 1 if self.integer else 0.5
        examples: list = []
        if self.low is not None:
            examples.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            examples.append(self.high if self.high_open else self.high + step)
        if not self.integer:
            examples.append(float("nan"))
        specials = {special for special, _ in self.special}
        return [value for value in examples if value not in specials]


def ranged(default: Any, value_range: Range, *, optional: bool = False, default_factory=None) -> Any:
    """A dataclass field whose values must lie in ``value_range`` (None also admitted when ``optional``)."""
    metadata = {_RANGE_KEY: value_range, "optional": optional}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    """``cbp_decay`` -> ``cbp-decay`` (the command-line spelling, without the dashes in front)."""
    return field_name.replace("_", "-")


def declared_ranges(flags_type: type) -> dict[str, tuple[Range, bool]]:
    """Every field of a flags dataclass declared with ``ranged``: name -> (range, None admitted)."""
    return {f.name: (f.metadata[_RANGE_KEY], f.metadata["optional"]) for f in dataclasses.fields(flags_type)
            if _RANGE_KEY in f.metadata}


def check_ranges(flags: Any) -> None:
    """Check every ``ranged`` field of the dataclass instance ``flags``; the first bad one raises ValueError."""
    for name, (value_range, optional) in declared_ranges(type(flags)).items():
        value = getattr(flags, name)
        if optional and value is None:
            continue
        value_range.check(flag_name(name), value)


# Ranges many hyperparameters share.
NON_NEGATIVE = Range(low=0.0)
POSITIVE = Range(low=0.0, low_open=True)
UNIT_INTERVAL = Range(low=0.0, high=1.0)
COUNT = Range(low=0, integer=True)
POSITIVE_COUNT = Range(low=1, integer=True)
