"""YAML for run configs: PyYAML's safe loader minus the features that hide mistakes.

A repeated key silently keeps its last value in plain PyYAML, anchors / aliases let a few
lines expand into gigabytes (the "billion laughs" document), and YAML 1.1 reads a number with a
leading 0 as octal (``seed: 0042`` is 34) and one with colons as base 60 (``1:30`` is 90). All
are refused, with the line.
Every error is one line: ``line L, column C: what is wrong``. ``dump`` writes no anchors, so
what it writes loads again.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlSyntaxError(ValueError):
    """Text that is not YAML, or YAML this loader refuses; the message starts with the line."""


class _Refused(yaml.MarkedYAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and anchors / aliases (hence merge keys too)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(problem="anchors and aliases (&name, *name, <<: *name) are not "
                                   "supported in run configs; write the values out",
                           problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                mark = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if mark is not key_node.start_mark:
                raise _Refused(problem=f"duplicate key {key!r} (first set on line "
                                       f"{mark.line + 1}); keep only one",
                               problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = node.value.replace("_", "")
        if ":" in text or re.fullmatch(r"[-+]?0[0-7]+", text):
            value = super().construct_yaml_int(node)
            fix = ("base 60); write the number you mean" if ":" in text else
                   "octal: a leading 0); write the number you mean without the 0")
            raise _Refused(problem=f"{node.value} reads as {value} in YAML 1.1 ({fix}, or "
                                   "quote it as text", problem_mark=node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in node.value:
            value = super().construct_yaml_float(node)
            raise _Refused(problem=f"{node.value} reads as {value} in YAML 1.1 (base 60); "
                                   "write the number you mean, or quote it as text",
                           problem_mark=node.start_mark)
        return super().construct_yaml_float(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)


def load(text: str) -> Any:
    """Parse ``text`` with StrictLoader; YamlSyntaxError (one line) if it cannot be used."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # safe: StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(err, _Refused):
            raise YamlSyntaxError(f"{where}{err.problem}") from None
        context = f" ({err.context})" if err.context else ""
        raise YamlSyntaxError(f"{where}not valid YAML: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise YamlSyntaxError(f"not valid YAML: {' '.join(str(err).split())}") from None


def comment_start(text: str) -> int | None:
    """Where YAML starts dropping ``text`` as a comment: the first ``#`` outside every token (after
    a space or at the start, outside quotes); None without one. ``text`` must load."""
    spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(text, Loader=StrictLoader)]
    return next((i for i, char in enumerate(text) if char == "#" and not any(
        start <= i < end for start, end in spans)), None)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def dump(doc: Any) -> str:
    """``doc`` as YAML in insertion order, without anchors (repeated objects are written out
    again)."""
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None)
