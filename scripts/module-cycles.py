#!/usr/bin/env python3
"""Import cycles between sibling modules, per crate.

    scripts/module-cycles.py [CRATE_DIR ...]     (default: every workspace crate)

For each module with children, its child modules are the nodes; child A depends on child B
when any file in A's subtree names a path into B's subtree (`crate::x::b::..`,
`super::b::..`, `self::b::..`, or a bare `b::` inside the parent's own files). Items of
the parent itself (what `mod.rs`/`lib.rs` defines) are not a sibling, so a child using
its parent's types is not a cycle. Prints every strongly connected group of two or more
siblings, with one example line per edge, and exits 1 if there is any.

Why a script and not `cargo modules`: that tool needs a nightly-matching rust-analyzer
build (minutes to install on this machine); the question asked here is only "who names
whom", which a path scan answers. It reads `use` lines and inline paths, not macros'
expansions; `#[path]` attributes are not used in this workspace.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["mqtt", "units", "ws", "sqlite", "broker", "bridge", "sensors", "gateway"]


def modules(src):
    """Map module path (tuple) -> list of files in that module's own body."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            mods.setdefault(tuple(parts), []).append(os.path.join(dirpath, f))
    return mods


PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
# `use` groups: crate::{a, b::c}
GROUP = re.compile(r"\b(crate|super|self)::\{([^}]*)\}")


def referenced(mod, text):
    """Absolute module-ish paths (tuples) named in `text`, written inside module `mod`."""
    out = []
    def resolve(head, rest):
        if head == "crate":
            base = ()
        elif head == "self":
            base = mod
        else:
            base = mod[:-1]
        return base + tuple(p for p in rest if p)
    for m in PATH.finditer(text):
        head, rest = m.group(1), m.group(2).split("::")[1:]
        # super::super::x
        base_mod = mod
        while head == "super" and rest and rest[0] == "super":
            base_mod = base_mod[:-1]
            rest = rest[1:]
        out.append((resolve(head, rest) if head != "super" else base_mod[:-1] + tuple(rest), m.group(0)))
    for m in GROUP.finditer(text):
        head = m.group(1)
        base = () if head == "crate" else (mod if head == "self" else mod[:-1])
        for item in m.group(2).split(","):
            item = item.strip().split(" as ")[0]
            if item:
                out.append((base + tuple(item.split("::")), m.group(0)))
    return out


def check(crate_dir):
    src = os.path.join(crate_dir, "src")
    if not os.path.isdir(src):
        return []
    mods = modules(src)
    names = set(mods)
    found = []
    parents = {m[:-1] for m in names if m}
    for parent in sorted(parents):
        kids = sorted(m for m in names if len(m) == len(parent) + 1 and m[:-1] == parent)
        if len(kids) < 2:
            continue
        edges = {}
        for kid in kids:
            for m, files in mods.items():
                if m[: len(kid)] != kid:
                    continue
                for f in files:
                    for lineno, line in enumerate(open(f, encoding="utf-8"), 1):
                        if line.lstrip().startswith("//"):
                            continue
                        for target, text in referenced(m, line):
                            for other in kids:
                                if other != kid and target[: len(other)] == other:
                                    edges.setdefault((kid, other), f"{os.path.relpath(f, ROOT)}:{lineno}: {text}")
        # Strongly connected groups (Tarjan).
        index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]
        def strong(v):
            index[v] = low[v] = counter[0]; counter[0] += 1
            stack.append(v); on.add(v)
            for (a, b) in edges:
                if a != v:
                    continue
                if b not in index:
                    strong(b); low[v] = min(low[v], low[b])
                elif b in on:
                    low[v] = min(low[v], index[b])
            if low[v] == index[v]:
                g = []
                while True:
                    w = stack.pop(); on.discard(w); g.append(w)
                    if w == v:
                        break
                if len(g) > 1:
                    groups.append(sorted(g))
        for k in kids:
            if k not in index:
                strong(k)
        for g in groups:
            lines = [f"  {'::'.join(a)} -> {'::'.join(b)}   ({why})" for (a, b), why in sorted(edges.items()) if a in g and b in g]
            found.append(f"{os.path.basename(crate_dir)}: cycle among {', '.join('::'.join(x) for x in g)}\n" + "\n".join(lines))
    return found


def main():
    dirs = sys.argv[1:] or [os.path.join(ROOT, c) for c in CRATES]
    found = [c for d in dirs for c in check(d)]
    for c in found:
        print(c)
    print(f"{len(found)} import cycle(s) between sibling modules in {len(dirs)} crate(s)")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
