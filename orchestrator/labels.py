"""Ray label selectors, evaluated here so the planner can tell which nodes a selector matches
without asking Ray (a selector that matches no node would otherwise wait for placement).

The syntax is Ray's (``ray._private.label_utils`` in Ray 2.60): per key one of ``value``,
``!value``, ``in(a, b)``, ``!in(a, b)``; every key must match (AND). ``!`` forms also match
nodes that lack the key.
"""

from __future__ import annotations

import re

NODE_ID_KEY = "ray.io/node-id"  # the label Ray puts on every node (ray._raylet.RAY_NODE_ID_KEY)

_NAME = r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?"
_VALUE = re.compile(rf"^!?in\(\s*{_NAME}(\s*,\s*{_NAME})*\s*\)$|^!?{_NAME}$")
_KEY = re.compile(rf"^(([a-zA-Z0-9]([a-zA-Z0-9-]{{0,61}}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{{0,61}}[a-zA-Z0-9])?)*/)?{_NAME}$")


def check(selector: dict[str, str]) -> None:
    """Raise ValueError naming the first key or value Ray would refuse."""
    for key, value in selector.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid Ray label key (e.g. 'gpu-type' or 'example.com/zone')")
        if not isinstance(value, str) or not _VALUE.match(value):
            raise ValueError(f"label selector value {value!r} for {key!r}: expected 'v', '!v', 'in(a, b)' or '!in(a, b)'")


def _parse(value: str) -> tuple[bool, set[str]]:
    """(negated, accepted values) of one selector value."""
    negated = value.startswith("!")
    body = value[1:] if negated else value
    if body.startswith("in(") and body.endswith(")"):
        return negated, {v.strip() for v in body[3:-1].split(",")}
    return negated, {body}


def matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    for key, value in (selector or {}).items():
        negated, values = _parse(value)
        present = labels.get(key) in values
        if present == negated:
            return False
    return True


def one_of(key: str, values: list[str]) -> dict[str, str]:
    """A selector for nodes whose ``key`` is any of ``values``."""
    unique = list(dict.fromkeys(values))
    return {key: unique[0] if len(unique) == 1 else f"in({','.join(unique)})"}
