"""The one YAML reader: PyYAML's safe loader with limits, for files that may be hostile.

Specs, spaces and profiles come from users, and ``spec.yaml`` files are read back from run
directories that others can write to. The size cap alone does not bound a file: aliases make a
few hundred bytes expand to billions of values (every later walk of the data, validation or an
error message, pays for the expansion), and deep nesting exhausts Python's recursion. The loader
counts while it composes, so such a file is refused before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from autoquant.errors import UserError, show

MAX_YAML_BYTES = 1 << 20
# A spec nests about six levels and holds a few hundred values; the limits leave room for task
# args while keeping the work of any accepted file small.
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_ALIASES = 100
_PROBLEM_CHARS = 200


class _Refused(yaml.MarkedYAMLError):
    """A limit of the loader, reported like a syntax error: the line and what is allowed."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class LimitedLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting depth, alias count and the number of values once aliases
    are followed, and refuses a mapping that gives a key twice."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._values = 0  # values composed so far, an alias counting as everything it stands for
        self._expanded: dict[int, int] = {}  # id(node) -> values it stands for, once complete

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 - PyYAML's name
        # The scanner keeps one possible key per open bracket and walks them all on every token:
        # 100,000 opening brackets cost seconds before the composer ever saw the depth.
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_DEPTH} levels; allowed: at most {MAX_DEPTH}",
                self.get_mark(),
            )
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(
                    f"more than {MAX_ALIASES} aliases; allowed: at most {MAX_ALIASES}",
                    event.start_mark,
                )
            node = super().compose_node(parent, index)
            size = self._expanded.get(id(node))
            if size is None:
                raise _Refused(
                    f"alias *{show(event.anchor)[1:-1]} is used inside the value it names "
                    "(a recursive structure); allowed: aliases of complete values",
                    event.start_mark,
                )
            self._count(size, event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_DEPTH} levels; allowed: at most {MAX_DEPTH}",
                self.peek_event().start_mark,
            )
        before = self._values
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1, node.start_mark)
        self._expanded[id(node)] = self._values - before
        return node

    def _count(self, values: int, mark: Any) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _Refused(
                f"more than {MAX_VALUES} values once aliases are followed; allowed: at most "
                f"{MAX_VALUES}",
                mark,
            )

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in by << may be overridden: that is what it is for
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class refuses an unhashable key
                if key in lines:
                    raise ConstructorError(
                        None,
                        None,
                        f"key {show(key)} is given twice (first at line {lines[key]}); "
                        "allowed: each key once",
                        key_node.start_mark,
                    )
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # PyYAML lets Python's own refusals through: a date such as 2001-13-45, an int of more
        # than 4300 digits
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise ConstructorError(
                None, None, f"bad {kind} {show(node.value)} ({exc})", node.start_mark
            ) from None


def load_yaml(text: str, *, file: str) -> Any:
    """Parse ``text`` with the limits; any problem is a ``UserError`` naming ``file`` and the
    line."""
    try:
        return yaml.load(text, Loader=LimitedLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if len(problem) > _PROBLEM_CHARS:
            problem = problem[:_PROBLEM_CHARS] + "..."
        what = "refused" if isinstance(exc, _Refused) else "not valid YAML"
        raise UserError(f"{what}{where}: {problem}", file=file) from None


def read_yaml(path: Path) -> Any:
    """A YAML file read with a size cap and the loader's limits; a missing or unreadable file is a
    ``UserError``."""
    try:
        if not path.exists():
            raise UserError("file not found", file=str(path))
        if not path.is_file():
            raise UserError("is not a file", file=str(path))
        with path.open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)  # what a special file says its size is may lie
    except OSError as exc:
        raise UserError(
            f"cannot be read ({exc.strerror or type(exc).__name__})", file=_name(path)
        ) from None
    except ValueError:  # a NUL in the path
        raise UserError("not a usable path", file=_name(path)) from None
    if len(data) > MAX_YAML_BYTES:
        raise UserError(
            f"file is larger than {MAX_YAML_BYTES} bytes; allowed: at most {MAX_YAML_BYTES}",
            file=str(path),
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", file=str(path)) from None
    return load_yaml(text, file=str(path))


def _name(path: Path) -> str:
    """The path as an error names it: cut and quoted when it is too long or holds odd characters."""
    text = str(path)
    return text if len(text) <= 300 and text.isprintable() else show(text)


def read_mapping(path: Path) -> dict:
    """``read_yaml`` of a file whose top level must be a mapping (an empty file is an empty one)."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"top level must be a mapping of keys to values, got {type(data).__name__}",
            file=str(path),
        )
    return data
