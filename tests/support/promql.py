"""Which metric names a PromQL expression reads, and which names the sidecar exports.

Not a PromQL parser: it removes what cannot be a metric name (string literals, label matchers in
braces, range and offset durations, grouping label lists, function calls, keywords, numbers,
Grafana variables) and returns the identifiers left over. Anything it does not know stays an
identifier, so an unexpected construct fails the check instead of slipping through.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_FUNCTION = re.compile(r"\b[a-zA-Z_]\w*(?=\s*\()")
_IDENTIFIER = re.compile(r"\b[a-zA-Z_:][\w:]*\b")
# Grafana's template query label_values(METRIC, LABEL): the last argument is a label name.
_LABEL_VALUES_LABEL = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", re.I)


def metric_names(expr: str) -> set[str]:
    text = _LABEL_VALUES_LABEL.sub(r"label_values(\1)", expr)
    text = _STRING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _FUNCTION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in KEYWORDS}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose (with or without samples yet)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count", ""), "info": ("_info",)}
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names
