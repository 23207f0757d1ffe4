"""Typed readers for configuration values: the one set of string/integer/boolean/choice checks.

Why one module: the processor config (:mod:`streamproc.config`) and the KMS settings
(:mod:`streamproc.crypto.kms.factory`) used to carry their own copies of these checks, with
different messages and different ideas of what a boolean is.  Both now call these, so a
value is judged the same way wherever it is written, and every message has one shape:
``<where>: must be <what>, got <kind of value>`` -- the kind, never the value itself (a
misplaced secret must not be echoed into a log).

``where`` is the key path (``kms.timeout``), optionally prefixed with the file
(``streamproc.yaml: kms.timeout``).  Values read from YAML after ``${VAR}``
interpolation may be strings; ``text=True`` (the default for integers and booleans)
accepts ``"42"`` and ``"true"``/``"false"`` for that reason.  This module sits just above
:mod:`streamproc.errors` so that the crypto layer can use it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from streamproc.errors import ConfigError

_INT_TEXT = re.compile(r"\s*-?\d+\s*")


def type_name(v: Any) -> str:
    """What kind of value ``v`` is, for an error message that must not repeat it."""
    if v is None:
        return "nothing (null)"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(v), type(v).__name__)


def _error(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}" if where else what)


def string(where: str, v: Any) -> str:
    """A non-empty (not only blank) string."""
    if not isinstance(v, str) or not v.strip():
        raise _error(where, f"must be a non-empty string, got {type_name(v)}")
    return v


def integer(
    where: str, v: Any, *, minimum: int, maximum: int | None = None, text: bool = True
) -> int:
    """An integer in ``[minimum, maximum]`` (booleans are not integers)."""
    if text and isinstance(v, str) and _INT_TEXT.fullmatch(v):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _error(where, f"must be an integer, got {type_name(v)}")
    if v < minimum or (maximum is not None and v > maximum):
        rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _error(where, f"must be {rng}, got {v}")
    return v


def positive_number(where: str, v: Any) -> float:
    """A number above zero (an integer or a float; not a boolean, not text)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise _error(where, f"must be a positive number, got {type_name(v)}")
    return float(v)


def boolean(where: str, v: Any, *, text: bool = True) -> bool:
    """``true`` or ``false`` (with ``text``, also the strings ``"true"``/``"false"``)."""
    if text and isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if not isinstance(v, bool):
        raise _error(where, f"must be true or false, got {type_name(v)}")
    return v


def choice(where: str, v: Any, allowed: Sequence[str]) -> str:
    """One of ``allowed`` (the message lists them; the value is quoted: it is a keyword)."""
    if v not in allowed:
        raise _error(where, f"must be one of {', '.join(allowed)}, got {v!r}")
    return str(v)


__all__ = ["boolean", "choice", "integer", "positive_number", "string", "type_name"]
