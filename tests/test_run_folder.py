"""The run-folder contract (agents/harness/run_folder.py): its helpers, and that every reader imports it.

The readers (scripts/sweeps, scripts/analysis) must take file names and run statuses from
``run_folder``, so that a change of the contract reaches the writer and all readers at once; an AST
scan of their sources proves it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.harness import run_folder
from agents.harness.run_folder import (
    CHECKPOINT_FILE,
    COMPLETED,
    INTERRUPTED,
    NEW,
    RESUMABLE,
    RUNNING,
    STATUS_FILE,
    STATUSES,
    Status,
    event_file_second,
    event_files,
    folder_state,
    has_checkpoint,
    read_json,
    read_status,
    run_name,
    write_json,
    write_status,
)

ROOT = Path(__file__).resolve().parents[1]
READER_DIRS = (ROOT / "scripts" / "sweeps", ROOT / "scripts" / "analysis")
CONTRACT_FILE_NAMES = (run_folder.CONFIG_FILE, run_folder.STATUS_FILE, run_folder.CHECKPOINT_FILE,
                       run_folder.EVENT_FILE_PREFIX)


# ---- torch-free imports ----

@pytest.mark.parametrize("module", ["agents.harness.run_folder", "scripts.analysis.tbreader",
                                    "scripts.sweeps.sweep"])
def test_imports_without_torch(module):
    # A fresh interpreter: this test process may already hold torch.
    code = f"import sys; import {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"importing {module} failed or imported torch:\n{result.stderr}"


# ---- the readers import the contract ----

def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the module/class/function docstring constants (prose may name files)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def contract_violations(source: str, filename: str) -> list[str]:
    """``file:line: why`` for every literal file name of the contract and every comparison with a literal
    run status.

    String pieces of f-strings are ``ast.Constant`` nodes inside ``ast.JoinedStr``, so ``ast.walk`` sees them.
    """
    tree = ast.parse(source, filename)
    docstrings = _docstring_nodes(tree)
    violations = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for name in CONTRACT_FILE_NAMES:
                if name in node.value:
                    violations.append(f"{filename}:{node.lineno}: literal {name!r} in {node.value!r}; "
                                      "use the run_folder constant")
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in STATUSES:
                    violations.append(f"{filename}:{node.lineno}: compares with the run status "
                                      f"{operand.value!r}; use run_folder's constant or Status")
    return violations


def _reader_files() -> list[Path]:
    return sorted(path for folder in READER_DIRS for path in folder.rglob("*.py"))


def test_readers_take_file_names_and_statuses_from_run_folder():
    files = _reader_files()
    assert len(files) >= 6, files  # the scan looks where the readers are
    violations = [violation for path in files
                  for violation in contract_violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not violations, "readers must import the run-folder contract:\n" + "\n".join(violations)


@pytest.mark.parametrize("snippet, why", [
    ('path = run_dir / "status.json"\n', "'status.json'"),
    ('message = f"no {run}/checkpoint.pt here"\n', "'checkpoint.pt'"),
    ('ok = status.get("status") == "completed"\n', "'completed'"),
    ('ok = "failed" != state\n', "'failed'"),
    ('names = [n for n in files if "events.out.tfevents." in n]\n', "'events.out.tfevents.'"),
])
def test_the_scan_catches_violations(snippet, why):
    violations = contract_violations('"""Docstrings may say config.json."""\nx = 1\n' + snippet, "reader.py")
    assert len(violations) == 1, violations
    assert violations[0].startswith("reader.py:3: ") and why in violations[0], violations


def test_the_scan_spares_docstrings_and_constants():
    source = '''"""Reads config.json and status.json."""
from agents.harness.run_folder import COMPLETED, STATUS_FILE


def done(run_dir, status):
    """True when status.json says completed."""
    return status.status == COMPLETED and (run_dir / STATUS_FILE).exists() and f"{STATUS_FILE}" != ""
'''
    assert contract_violations(source, "reader.py") == []


# ---- run_folder itself ----

def test_status_round_trip(tmp_path):
    write_status(tmp_path, INTERRUPTED, 200, 400, message="SIGTERM")
    status = read_status(tmp_path)
    assert isinstance(status, Status)
    assert (status.status, status.global_step, status.total_timesteps) == (INTERRUPTED, 200, 400)
    assert status.message == "SIGTERM"
    assert status.interrupted and not status.completed and not status.failed and status.time > 0
    write_status(tmp_path, COMPLETED, 400, 400)
    status = read_status(tmp_path)
    assert status.completed and status.message == ""
    assert json.loads((tmp_path / STATUS_FILE).read_text()) == status.as_dict()


def test_write_status_rejects_an_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="unknown run status 'done'"):
        write_status(tmp_path, "done", 1, 1)
    assert not (tmp_path / STATUS_FILE).exists()


@pytest.mark.parametrize("content", [None, "", '{"status": "compl', "[1, 2]", '"completed"',
                                     '{"global_step": 3}', b"\xff\xfe"])
def test_read_status_is_none_for_a_missing_or_unreadable_file(tmp_path, content):
    if isinstance(content, bytes):
        (tmp_path / STATUS_FILE).write_bytes(content)
    elif content is not None:
        (tmp_path / STATUS_FILE).write_text(content)
    assert read_status(tmp_path) is None


def test_read_json_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_json(path)
    path.write_text('{"seed": ')
    with pytest.raises(ValueError, match="is corrupt") as error:
        read_json(path)
    assert str(path) in str(error.value)
    path.write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_json(path)
    assert run_folder.read_config(tmp_path / "absent", missing_ok=True) is None


def test_folder_state(tmp_path):
    assert folder_state(tmp_path / "absent") == NEW
    write_status(tmp_path, RUNNING, 0, 400)
    assert folder_state(tmp_path) == NEW and not has_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"x")
    assert folder_state(tmp_path) == RESUMABLE and has_checkpoint(tmp_path)
    write_status(tmp_path, COMPLETED, 400, 400)
    assert folder_state(tmp_path) == COMPLETED


def test_run_name():
    assert run_name("ALE/Breakout-v5", "dqn", "base", 1) == "ALE_Breakout-v5__dqn__base__1"
    assert run_name("ALE/Breakout-v5", "dqn", "base", 1, unix_time=1733040000.7) == \
        "ALE_Breakout-v5__dqn__base__1__1733040000"
    assert run_folder.env_name("ImageMDP/mnist") == "ImageMDP_mnist"


def test_event_files_and_their_second(tmp_path):
    name = "events.out.tfevents.1733040000.host.123.0"
    assert event_file_second(name) == 1733040000
    assert event_file_second(tmp_path / "events.out.tfevents.host") is None
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "events.out.tfevents.dir").mkdir()
    assert event_files(tmp_path) == [tmp_path / name]
    assert event_files(tmp_path / "absent") == []


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"b": 1, "a": Path("x")})
    write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    with pytest.raises(TypeError):  # fails before anything is written: the old file stays whole
        write_json(path, {(1, 2): "a key JSON cannot hold"})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # no temporary file left behind
