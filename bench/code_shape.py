"""The code's shape, as issue 32 asks it to be reported: run_loop's length, the longest function and the one with the
most parameters in each package, and the mean module size.

    python bench/code_shape.py          # a table; --json for the figures
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flywheel", "actors", "learner", "reward")


def functions(path: Path):
    """(qualified name, lines, parameters) of every function in a module, methods included."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
                out.append((f"{prefix}{child.name}", child.end_lineno - child.lineno + 1, len(params)))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree)
    return out


def shape() -> dict:
    result = {"packages": {}}
    sizes = []
    for package in PACKAGES:
        found = []
        for path in sorted((ROOT / package).rglob("*.py")):
            sizes.append(len(path.read_text().splitlines()))
            found += [(f"{path.relative_to(ROOT)}::{name}", lines, params) for name, lines, params in functions(path)]
        longest = max(found, key=lambda f: f[1])
        widest = max(found, key=lambda f: f[2])
        result["packages"][package] = {
            "longest": {"function": longest[0], "lines": longest[1]},
            "most_parameters": {"function": widest[0], "parameters": widest[2]},
            "over_80_lines": sorted(f"{n} ({ln})" for n, ln, _ in found if ln > 80),
            "over_10_parameters": sorted(f"{n} ({p})" for n, _, p in found if p > 10),
        }
    loop = {name: lines for name, lines, _ in functions(ROOT / "flywheel" / "loop.py")}
    result["run_loop_lines"] = loop["run_loop"]
    result["modules"] = len(sizes)
    result["mean_module_lines"] = round(sum(sizes) / len(sizes), 1)
    return result


if __name__ == "__main__":
    figures = shape()
    if "--json" in sys.argv:
        print(json.dumps(figures, indent=2))
    else:
        print(f"run_loop: {figures['run_loop_lines']} lines; {figures['modules']} modules, mean "
              f"{figures['mean_module_lines']} lines")
        for package, f in figures["packages"].items():
            print(f"{package:9s} longest {f['longest']['function']} ({f['longest']['lines']} lines); most "
                  f"parameters {f['most_parameters']['function']} ({f['most_parameters']['parameters']})")
            for over in f["over_80_lines"] + f["over_10_parameters"]:
                print(f"          over the aim: {over}")
