"""YAML text -> plain trees for the config loader: YAML 1.2 typing (`1e-6` is a float; only true/false are
booleans), a bound on alias expansion, scalar parsing of `key=value` overrides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

MAX_YAML_NODES = 100_000  # a config has ~100 keys; YAML aliases can make a 400-byte file expand to 10**6 nodes


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose floats and booleans follow YAML 1.2: `1e-6` and `5E3` are floats, not strings; only
    true/false are booleans (`on`, `off`, `yes`, `no` stay strings: actor.tree_packing takes on/off/auto)."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _expanded_size(root: yaml.Node) -> int:
    """Number of nodes of the document once every alias is expanded (a node reached k times counts k times),
    computed in time linear in the file, capped just above MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    # Post-order over the node graph (PyYAML aliases are shared node objects; anchors cannot form cycles
    # before their definition ends, except a recursive collection, which the cap turns into a refusal).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                children = [c for pair in node.value for c in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in on_path:  # a collection that contains itself expands without end
            return MAX_YAML_NODES + 1
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((c, False) for pair in node.value for c in pair if id(c) not in sizes)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value if id(c) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 float typing.

    Raises yaml.YAMLError for text whose aliases expand to more than MAX_YAML_NODES nodes (the "billion
    laughs" shape: each level of anchors multiplies the size of the document)."""
    loader = _Yaml12Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        size = _expanded_size(root)
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} nodes; a config needs "
                                 "a few hundred (write the values out instead of nesting anchors)")
        return loader.construct_document(root)
    finally:
        loader.dispose()


def parse_scalar(text: str) -> Any:
    """Type one override value as YAML would: '10' -> 10, '1e-6' -> 1e-06, 'true' -> True, '[a, b]' -> list,
    'null' -> None; anything that does not parse as YAML stays the string itself."""
    if text == "":
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text



def plain_copy(x: Any) -> Any:
    """A copy of a tree of mappings and lists (as dicts and lists); leaves are shared."""
    if isinstance(x, Mapping):
        return {k: plain_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain_copy(v) for v in x]
    return x
