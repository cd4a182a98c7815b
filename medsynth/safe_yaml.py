"""YAML read safely and within bounds: the one way medsynth turns YAML text into Python values.

- Safe: PyYAML's ``SafeLoader`` only, so a tag such as ``!!python/object/apply:os.system`` is an
  error, never a call.
- Bounded: aliases repeat their anchor's whole content, so a few hundred characters
  (``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]``, nine levels deep) stand for a billion values that
  anything walking the result (validation, ``repr``) would visit. :func:`load_yaml` counts the
  nodes of the document *with every alias expanded* from the composed node graph (each distinct
  node once, so counting is linear in the text) and refuses more than :data:`MAX_YAML_NODES`, a
  document nested deeper than :data:`MAX_YAML_DEPTH` or one whose aliases refer to themselves, before
  a single Python object is built. :func:`read_yaml_file` also refuses a file over
  :data:`MAX_YAML_BYTES` before reading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from medsynth.errors import ConfigError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_yaml", "read_yaml_file"]

#: the most nodes (scalars, lists, mappings, keys included) a document may hold once aliases are expanded
MAX_YAML_NODES = 100_000
#: the deepest nesting of lists and mappings a document may have
MAX_YAML_DEPTH = 64
#: the largest YAML file read (recipes and job configs are a few KiB)
MAX_YAML_BYTES = 1 << 20


class _TooBig(Exception):
    """Raised inside the loader; :func:`load_yaml` turns it into a ConfigError naming the source."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses deep nesting while composing and too many expanded nodes before
    constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooBig(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            expanded_size(node)
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_size(root: Node, limit: int = MAX_YAML_NODES) -> int:
    """The number of nodes under ``root`` (itself included) with every alias expanded, computed once
    per distinct node (iteratively, so deep graphs cannot exhaust the stack). Raises _TooBig above
    ``limit`` or for an alias that refers to a node containing it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            size = 1 + sum(sizes[id(c)] for c in _children(node))
            if size > limit:
                raise _TooBig(f"expands to more than {limit} values (aliases repeat their anchor's content)")
            sizes[key] = size
            open_nodes.discard(key)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _TooBig("has an alias that refers to a list or mapping containing it")
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise _TooBig("has an alias that refers to a list or mapping containing it")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml(text: str, source: str) -> Any:
    """The value of one YAML document, read with the safe loader within the bounds above.

    source: what the text is, for messages (``recipe.yaml``, ``--set 'a.b=...'``). Raises
    ConfigError naming it for invalid YAML, a Python tag, or a document over the bounds."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _TooBig as exc:
        raise ConfigError(f"{source}: refused: the YAML {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{source}: a YAML value cannot be read ({exc})") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """The value of the YAML file at ``path`` (:func:`load_yaml`); ConfigError for a missing,
    unreadable or oversized file (over :data:`MAX_YAML_BYTES`, refused before it is read)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a YAML config may be at most {MAX_YAML_BYTES} bytes")
        with path.open("rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: more than {MAX_YAML_BYTES} bytes; a YAML config may be at most that")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    return load_yaml(text, str(path))
