"""The import rules of ../shared/DESIGN.md: contracts at the bottom; actors, reward and learner never import each
other; the run layer wires them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"flywheel", "actors", "reward", "learner", "configs"}
FORBIDDEN = {"actors": {"learner", "reward"}, "reward": {"learner", "actors"}, "learner": {"actors", "reward"}}
# The shared layer (contracts, plug-ins, the policy module, store, checkpoints, metrics) must not reach up into the
# parts, nor must the loop and its phases, which turn the parts they are given.
SHARED = ["flywheel/contracts.py", "flywheel/plugins.py", "flywheel/vla", "flywheel/store.py", "flywheel/checkpoint.py",
          "flywheel/metrics.py", "flywheel/loop.py", "flywheel/collect.py", "flywheel/evaluation.py",
          "flywheel/audit.py", "flywheel/update.py", "flywheel/gate.py", "flywheel/state.py",
          "flywheel/lerobot_format.py", "flywheel/lerobot_export.py", "flywheel/lerobot_import.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_parts_do_not_import_each_other():
    for part, banned in FORBIDDEN.items():
        for path in (ROOT / part).rglob("*.py"):
            assert not (_imports(path) & banned), f"{path.relative_to(ROOT)} imports {_imports(path) & banned}"


def test_contracts_and_plugins_import_nothing_of_the_project():
    assert _imports(ROOT / "flywheel" / "contracts.py") == set()
    assert _imports(ROOT / "flywheel" / "plugins.py") == set()  # names the parts by import path, imported on use


def test_shared_layer_does_not_import_the_parts():
    for entry in SHARED:
        for path in [ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"):
            assert not (_imports(path) & {"actors", "reward", "learner"}), path
