#!/usr/bin/env python3
"""Finds import cycles between the modules of Mailroom's crates (run by scripts/check-cycles.sh).

A module is one source file (`foo.rs` or `foo/mod.rs` is `foo`, `foo/bar.rs` is `foo::bar`). Module A
depends on module B when A's non-test code names a path into B: `use crate::b::..`, `crate::b::x(..)`,
`super::b`, or a name the crate root (or another module) re-exports from B with `pub use`. A module and its
own ancestors or descendants are one unit (a parent declares and re-exports its children), so edges between
them are not counted. Test code (`#[cfg(test)]` modules, inline or in their own file) is skipped.

Prints each strongly connected component of more than one module (a cycle), with one path around it, and
exits 1 if there is any. `--graph` also prints every edge.
"""

import re
import sys
from pathlib import Path

CRATES = ["mailroom-broker", "mailroom-amqp", "mailroom", "mailroom-http"]


def strip_comments_and_strings(src):
    """Blanks comments, string and char literals (keeping line breaks), so braces and paths in them do not count."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * src.count("\n", i, j))
            i = j
            continue
        m = re.match(r'b?r(#*)"', src[i:i + 10])
        if m and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
            continue
        if c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:i + 12])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def block_end(src, open_at):
    """Index just past the brace block opening at `open_at`."""
    depth = 0
    for j in range(open_at, len(src)):
        if src[j] == "{":
            depth += 1
        elif src[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(src)


TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*([;{])")


def strip_test_code(src):
    """Removes inline `#[cfg(test)] mod x { .. }` blocks; returns the code and the test-only child module names."""
    test_children = set()
    while True:
        m = TEST_MOD.search(src)
        if not m:
            return src, test_children
        if m.group(2) == ";":
            test_children.add(m.group(1))
            src = src[:m.start()] + src[m.end():]
        else:
            src = src[:m.start()] + src[block_end(src, m.end() - 1):]


def expand_use(tree):
    """Expands a use tree (`a::{b, c::{d, e}}`) into its paths, each a list of segments."""
    tree = re.sub(r"\s+as\s+(\w+)", r"@\1", tree)
    tree = re.sub(r"\s+", "", tree)
    depth = 0
    for k, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix = [s for s in tree[:k].split("::") if s]
                inner, parts, start, d = tree[k + 1:tree.rindex("}")], [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        d += 1
                    elif c == "}":
                        d -= 1
                    elif c == "," and d == 0:
                        parts.append(inner[start:j])
                        start = j + 1
                parts.append(inner[start:])
                paths = []
                for p in parts:
                    if not p:
                        continue
                    for sub in expand_use(p):
                        paths.append(prefix + ([] if sub == ["self"] else sub))
                return paths
            depth += 1
    return [tree.split("::")]


class Crate:
    def __init__(self, root):
        self.root = root
        self.modules = {}  # name -> code (test code stripped)
        self.test_only = set()
        for f in sorted(root.rglob("*.rs")):
            rel = f.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "mod" or parts in (["lib"], ["main"]):
                parts = parts[:-1]
            if "bin" in parts[:1]:
                continue
            name = "::".join(parts)
            code, test_children = strip_test_code(strip_comments_and_strings(f.read_text()))
            self.modules[name] = code
            for child in test_children:
                self.test_only.add(f"{name}::{child}" if name else child)
        # A test-only module's descendants are test-only too.
        for name in list(self.modules):
            if any(name == t or name.startswith(t + "::") for t in self.test_only):
                del self.modules[name]
        self.reexports = {m: self.find_reexports(m, code) for m, code in self.modules.items()}

    def children(self, module):
        prefix = module + "::" if module else ""
        return {m[len(prefix):] for m in self.modules if m.startswith(prefix) and "::" not in m[len(prefix):] and m != module}

    def absolute(self, module, segments):
        """Turns a path as written in `module` into segments from the crate root, or None if external."""
        mod = module.split("::") if module else []
        first = segments[0]
        if first == "crate":
            return segments[1:]
        if first == "self":
            return mod + segments[1:]
        if first == "super":
            k = 0
            while k < len(segments) and segments[k] == "super":
                k += 1
            return mod[:len(mod) - k] + segments[k:]
        if first in self.children(module):
            return mod + segments
        return None

    def find_reexports(self, module, code):
        found = {}
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
            for path in expand_use(m.group(1)):
                name, _, alias = path[-1].partition("@")
                alias = alias or name
                path = path[:-1] + [name]
                absolute = self.absolute(module, path)
                if absolute:
                    found[alias] = absolute
        return found

    def resolve(self, segments, seen=0):
        """The module a path from the crate root lands in (re-exports followed)."""
        current = ""
        for s in segments:
            child = f"{current}::{s}" if current else s
            if child in self.modules:
                current = child
                continue
            target = self.reexports.get(current, {}).get(s)
            if target and seen < 8:
                return self.resolve(target, seen + 1)
            break
        return current

    def edges(self):
        graph = {m: set() for m in self.modules}
        for module, code in self.modules.items():
            paths = []
            for m in re.finditer(r"\buse\s+([^;]+);", code):
                paths.extend(p[:-1] + [p[-1].partition("@")[0]] for p in expand_use(m.group(1)))
            for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", code):
                paths.append(m.group(1).split("::"))
            for path in paths:
                absolute = self.absolute(module, path)
                if absolute is None:
                    continue
                target = self.resolve(absolute)
                related = (
                    target == module
                    or not target
                    or not module
                    or target.startswith(module + "::")
                    or module.startswith(target + "::")
                )
                if not related:
                    graph[module].add(target)
        return graph


def strongly_connected(graph):
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                result.append(sorted(component))
    return result


def a_cycle(graph, component):
    """One cycle through the component's first module, by breadth-first search (to show how it closes)."""
    members, start = set(component), component[0]
    previous, queue = {start: None}, [start]
    for node in queue:
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if nxt in members and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return component


def main():
    show_graph = "--graph" in sys.argv
    repo = Path(__file__).resolve().parent.parent
    cycles = 0
    for name in CRATES:
        crate = Crate(repo / "crates" / name / "src")
        graph = crate.edges()
        if show_graph:
            for m in sorted(graph):
                for t in sorted(graph[m]):
                    print(f"{name}: {m or 'crate'} -> {t}")
        for component in strongly_connected(graph):
            if len(component) > 1:
                cycles += 1
                print(f"{name}: cycle among {', '.join(component)}")
                print(f"    e.g. {' -> '.join(a_cycle(graph, component))}")
    if cycles:
        print(f"{cycles} import cycle(s)")
        return 1
    print("no import cycles in " + ", ".join(CRATES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
