"""Pure decisions: what to do about one child, given the desired and the observed object.

The observed object is what the API server returned, so it carries fields that the server,
controllers and other tools filled in. A child is unchanged when every field of the desired
object is present in the observed one with the same meaning; fields it does not set are not ours
(server-side apply leaves them alone too). Removals are caught by the applied-digest annotation
that the builders put into every desired object.
"""

from __future__ import annotations

import enum
import re
from decimal import Decimal, InvalidOperation
from typing import Any


class Action(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    UNCHANGED = "unchanged"


def decide(desired: dict[str, Any] | None, observed: dict[str, Any] | None) -> Action:
    if desired is None:
        return Action.UNCHANGED if observed is None else Action.DELETE
    if observed is None:
        return Action.CREATE
    return Action.UNCHANGED if covers(observed, desired) else Action.UPDATE


def covers(observed: Any, desired: Any) -> bool:
    """Whether `observed` holds everything `desired` says, with the same meaning."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(
            key in observed and covers(observed[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return False
        if all(not isinstance(item, dict) for item in desired):
            # Lists of scalars (args, command, capabilities) are atomic: order matters.
            return len(observed) == len(desired) and all(
                covers(o, d) for o, d in zip(observed, desired, strict=True)
            )
        # Lists of objects are merged by key (containers, ports, volumes): any order.
        return all(any(covers(o, d) for o in observed) for d in desired)
    if isinstance(desired, str) and isinstance(observed, str) and desired != observed:
        # The API server stores quantities in canonical form ("1000m" -> "1", "1024Mi" -> "1Gi").
        parsed = parse_quantity(desired)
        return parsed is not None and parsed == parse_quantity(observed)
    return bool(observed == desired) and type(observed) is type(desired)


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity's value, or None when the text is not a quantity."""
    match = _QUANTITY.match(text)
    if match is None or match.group(2) not in _SUFFIXES:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation:
        return None
