"""The library's shape from its source alone (ast, no imports): lines per subpackage, the
import graph between subpackages and its cycles, functions over a length limit, with
whether their docstring states a reason (a line starting with ``Long:``), and functions taking
more than a few positional parameters (``self``/``cls`` not counted; a context value or
keyword-only parameters instead).

    python tools/code_shape.py [--package autoquant] [--max-lines 80] [--max-positional 5] [--json PATH]

Exit code 1 when a function over the limit states no reason, a function takes too many positional
parameters or subpackages import each other in a cycle (so CI or a reviewer can gate on
it); 0 otherwise. Import cycles and the largest subpackage's share are printed as figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

REASON_PREFIX = "Long:"


def subpackage(module: str, package: str) -> str:
    parts = module.split(".")
    if parts[0] != package:
        return ""
    return parts[1] if len(parts) > 1 else "(root)"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module this one imports (at any depth, lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
    return out


def long_functions(tree: ast.AST, limit: int):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                doc = ast.get_docstring(node) or ""
                yield node.name, node.lineno, length, REASON_PREFIX in doc


def positional_heavy(tree: ast.AST, limit: int):
    """Functions with more than ``limit`` positional parameters (``*args`` not counted)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.posonlyargs + node.args.args]
            if names and names[0] in ("self", "cls"):
                names = names[1:]
            if len(names) > limit:
                yield node.name, node.lineno, len(names)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="autoquant")
    parser.add_argument("--max-lines", type=int, default=80)
    parser.add_argument("--max-positional", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent / args.package
    lines: dict[str, int] = defaultdict(int)
    graph: dict[str, set[str]] = defaultdict(set)
    too_long = []
    too_positional = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        module = module_name(path, root)
        sub = subpackage(module, args.package)
        lines[sub] += len(source.splitlines())
        for name in imported_modules(tree, module, path.name == "__init__.py"):
            target = subpackage(name, args.package)
            if target and target != sub and sub != "(root)" and target != "(root)":
                graph[sub].add(target)
        for fn, lineno, length, reason in long_functions(tree, args.max_lines):
            too_long.append((f"{path.relative_to(root.parent)}:{lineno}", fn, length, reason))
        for fn, lineno, count in positional_heavy(tree, args.max_positional):
            too_positional.append((f"{path.relative_to(root.parent)}:{lineno}", fn, count))
    total = sum(lines.values())
    largest = max(lines, key=lines.get)
    loops = cycles(graph)
    unexplained = [f for f in too_long if not f[3]]
    print(f"{args.package}: {total} lines in {len(lines)} subpackages")
    for sub, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"  {sub:12s} {n:6d} lines {n / total:6.1%}  imports {', '.join(sorted(graph[sub])) or '-'}")
    print(f"largest subpackage: {largest} at {lines[largest] / total:.1%} of the library's lines")
    print(f"import cycles between subpackages: {len(loops)}" + "".join(f"\n  {' <-> '.join(c)}" for c in loops))
    print(f"functions over {args.max_lines} lines: {len(too_long)}, without a stated reason "
          f"('{REASON_PREFIX}' in the docstring): {len(unexplained)}")
    for where, fn, length, reason in sorted(too_long, key=lambda f: -f[2]):
        print(f"  {length:4d}  {fn}  {where}{'  (reason stated)' if reason else ''}")
    print(f"functions with over {args.max_positional} positional parameters: {len(too_positional)}")
    for where, fn, count in sorted(too_positional, key=lambda f: (-f[2], f[0])):
        print(f"  {count:4d}  {fn}  {where}")
    if args.json:
        args.json.write_text(json.dumps({
            "lines": lines, "imports": {k: sorted(v) for k, v in graph.items()}, "cycles": loops,
            "long_functions": [dict(zip(("where", "function", "lines", "reason"), f)) for f in too_long],
            "positional_heavy": [dict(zip(("where", "function", "positional"), f)) for f in too_positional],
        }, indent=2))
    return 1 if unexplained or too_positional or loops else 0


if __name__ == "__main__":
    sys.exit(main())
