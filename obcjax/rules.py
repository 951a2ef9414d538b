"""Ordered regex rules over '/'-joined module paths: the first rule whose pattern matches wins.

One small matcher serves calibration (which layers to capture), the compression transforms (which
spec each layer gets) and the allocators (rules are their output format). As in google/qwix, a
pattern is matched with :func:`re.fullmatch` against paths such as ``"conv1"``,
``"block1/conv2"`` or ``"encoder/layer_0/attention/query"``, and a rule that matches no path at all
is an error: a typo must not silently leave a layer uncompressed.

Example:
    >>> match_rules(["conv1", "block1/conv2", "head"], [("conv1", None), (".*conv.*", "4bit")])
    {'conv1': None, 'block1/conv2': '4bit'}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["match_rules", "normalize_rules"]


def normalize_rules(rules, *, what: str = "layer") -> list[tuple[re.Pattern, Any]]:
    """``[(compiled pattern, value)]`` from strings, ``(pattern, value)`` pairs, or a mapping.

    A bare string ``"pat"`` means ``("pat", True)``; a single string stands for one rule.
    """
    if isinstance(rules, str | re.Pattern):
        rules = [rules]
    elif hasattr(rules, "items") and callable(rules.items):
        rules = list(rules.items())
    out = []
    for rule in rules:
        if isinstance(rule, str | re.Pattern):
            pattern, value = rule, True
        elif isinstance(rule, tuple | list) and len(rule) == 2:
            pattern, value = rule
        else:
            raise TypeError(
                f"{what} rule {rule!r} must be a regex string or a (regex, value) pair"
            )
        if isinstance(pattern, re.Pattern):
            out.append((pattern, value))
            continue
        if not isinstance(pattern, str):
            raise TypeError(f"{what} rule pattern {pattern!r} must be a string, not {type(pattern)}")
        try:
            out.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"{what} rule {pattern!r} is not a valid regular expression: {e}") from e
    return out


def match_rules(
    paths: Sequence[str],
    rules: Sequence[tuple[str, Any]] | Sequence[str],
    *,
    what: str = "layer",
) -> dict[str, Any]:
    """Map each path to the value of the first rule whose regex fully matches it.

    Args:
      paths: '/'-joined module paths, in the order the result should keep.
      rules: ordered ``(regex, value)`` pairs, or bare regex strings (value ``True``), or a mapping
        (its insertion order is the rule order). A value of None means "skip this layer"; it is
        kept in the result so callers can tell "skipped on purpose" from "not matched".
      what: the noun used in error messages (``"layer"``, ``"parameter"``...).

    Returns:
      ``{path: value}`` for every path some rule matched, in the order of ``paths``; paths that
      no rule matches are left out.

    Raises:
      ValueError: a rule's regex matches none of ``paths`` (the message names the rule and lists
        the available paths), or is not a valid regex. A rule that matches paths which earlier
        rules already claimed is fine: ``[("head", None), (".*", spec)]`` is the usual idiom.
      TypeError: a rule is neither a string nor a pair.
    """
    paths = [str(p) for p in paths]
    compiled = normalize_rules(rules, what=what)
    chosen: dict[str, Any] = {}
    for pattern, _ in compiled:
        if not any(pattern.fullmatch(p) for p in paths):
            shown = ", ".join(repr(p) for p in paths[:50])
            more = f" ... ({len(paths) - 50} more)" if len(paths) > 50 else ""
            raise ValueError(
                f"{what} rule {pattern.pattern!r} matches no {what} (the whole path must match, "
                f"re.fullmatch); available {what} paths: [{shown}{more}]"
            )
    for p in paths:
        for pattern, value in compiled:
            if pattern.fullmatch(p):
                chosen[p] = value
                break
    return chosen
