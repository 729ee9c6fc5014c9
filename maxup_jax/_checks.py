"""Checks of the int and real-number arguments that the library's functions take.

A bool is an int to Python, but `length=True` or `num_copies=False` is surely a mistake, so both
checks reject it. The type is checked before the value, so that a traced array or a string gets a
message about its type rather than a failed comparison.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *,
              numpy: bool = True, reason: str | None = None, must_be: str | None = None,
              wrong_type: type[Exception] = TypeError) -> int:
  """Checks that `value` is an int (a bool is not one) in [minimum, maximum]; returns it as an int.

  Args:
    name: the argument's name, with which both messages start.
    value: the argument.
    minimum: the least value allowed.
    maximum: the greatest value allowed; None for no upper bound.
    numpy: whether numpy integers pass as well as Python ints.
    reason: why an int is needed, e.g. "it fixes array shapes"; the type message gives it.
    must_be: what the message for a value out of range asks for; by default "a positive int",
      "an int >= minimum" or "an int in [minimum, maximum]".
    wrong_type: the error for a value that is not an int. With ValueError, a value out of range
      gets the type message's requirement too, so that one error and one message cover both.

  Raises:
    wrong_type: "{name} must be a Python int >= {minimum} ({reason}), got {value!r} of type T."
      (or "in [minimum, maximum]") for a value that is not an int.
    ValueError: "{name} must be {must_be}, got {value}." for an int out of range.
  """
  bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  wanted = f"a Python int {bounds}" + (f" ({reason})" if reason else "")
  if isinstance(value, bool) or not isinstance(value, numbers.Integral if numpy else int):
    raise wrong_type(f"{name} must be {wanted}, got {value!r} of type {type(value).__name__}.")
  if value < minimum or (maximum is not None and value > maximum):
    if must_be is None:
      plain = "a positive int" if (minimum, maximum) == (1, None) else f"an int {bounds}"
      must_be = wanted if wrong_type is ValueError else plain
    raise ValueError(f"{name} must be {must_be}, got {value}.")
  return int(value)


def check_real(name: str, value: Any, minimum: float, *, exclusive: bool = False) -> None:
  """Checks that `value` is a finite real number (a bool is not one) >= `minimum`.

  Args:
    name: the argument's name, with which every message starts.
    value: the argument.
    minimum: the least value allowed.
    exclusive: whether `minimum` itself is out of range (`value` > `minimum`).

  Raises:
    TypeError: "{name} must be a Python number, ..." for a value that is not a real number.
    ValueError: "{name} must be finite, ..." or "{name} must be >= {minimum}, ..." (> if
      `exclusive`) for one that is.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name} must be a Python number, got {value!r} of type {type(value).__name__}.")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}.")
  if value < minimum or (exclusive and value == minimum):
    raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}.")
