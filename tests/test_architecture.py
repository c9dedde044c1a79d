"""The layers of docs/architecture.md, enforced: a forbidden import anywhere (even inside a function) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("agents", "envs", "plasticity", "scripts")

#: Layer -> the project layers it may import (besides itself and third-party packages).
ALLOWED = {
    "plasticity": set(),  # the library: torch only
    "plasticity.streams": set(),  # the per-member random streams: torch only
    "envs": {"plasticity.streams"},  # environments and replay buffers; populations draw from plasticity.streams
    "agents.harness.run_folder": set(),  # the run-folder contract: no torch, no project imports
    "agents.harness": {"plasticity", "envs", "agents.harness.run_folder"},
    "agents": {"agents.harness", "agents.harness.run_folder", "plasticity", "envs"},  # the two agent files
    "envs.atari_scores": set(),  # the human/random reference table: no torch, no project imports
    "scripts.analysis": {"agents.harness.run_folder", "envs.atari_scores"},  # readers: the contract only
    "scripts.sweeps": {"agents.harness.run_folder", "envs.atari_scores", "scripts.analysis"},
    "scripts.benchmarks": {"agents", "agents.harness", "agents.harness.run_folder", "plasticity", "envs"},
    # Plays a saved network: the agents' networks, the shared evaluation, and the bootstrap of scripts/analysis.
    "scripts.evaluate": {"agents", "agents.harness", "agents.harness.run_folder", "plasticity", "envs",
                         "scripts.analysis"},
}
#: Layers that must not import torch at all (they read run folders, or plan sweeps).
TORCH_FREE = {"agents.harness.run_folder", "envs.atari_scores", "scripts.analysis", "scripts.sweeps"}


def layer_of(module: str) -> str | None:
    """The most specific layer a dotted module name belongs to."""
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from agents.harness import run_folder` imports the submodule, not the package's contents.
                submodule = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*submodule.split("."))).with_suffix(".py").exists()
                found.append((node.lineno, submodule if is_module else node.module))
    return found


def violations() -> list[str]:
    problems = []
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            layer = layer_of(module_name(path))
            if layer is None:
                continue
            for line, imported in imported_modules(path):
                top = imported.split(".")[0]
                if top == "torch" and layer in TORCH_FREE:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {layer} must stay torch-free, imports {imported}")
                if top not in PROJECT_PACKAGES:
                    continue
                target = layer_of(imported)
                if target is None or target == layer:
                    continue
                # A layer may import the sub-layers of what it may import (agents.harness.run_folder
                # with agents.harness, envs.atari_scores with envs) and of itself.
                if not any(target == allowed or target.startswith(allowed + ".")
                           for allowed in (*ALLOWED[layer], layer)):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {layer} may not import {imported}")
    return problems


def test_no_layer_imports_what_docs_architecture_forbids():
    assert violations() == []


def test_the_check_catches_a_forbidden_import(tmp_path, monkeypatch):
    """Guard against a scan that sees nothing: a library file importing envs is reported."""
    fake_root = tmp_path / "project"
    (fake_root / "plasticity").mkdir(parents=True)
    (fake_root / "plasticity" / "bad.py").write_text("def f():\n    from envs.factory import AgentEnv\n")
    (fake_root / "scripts" / "analysis").mkdir(parents=True)
    (fake_root / "scripts" / "analysis" / "reader.py").write_text("import torch\n")
    for package in ("agents", "envs"):
        (fake_root / package).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    found = violations()
    assert any("plasticity/bad.py:2: plasticity may not import envs.factory" in p for p in found)
    assert any("scripts/analysis/reader.py:1" in p and "torch-free" in p for p in found)


def test_docs_architecture_names_every_layer():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for layer in ALLOWED:
        assert f"`{layer.replace('.', '/')}" in text, layer
