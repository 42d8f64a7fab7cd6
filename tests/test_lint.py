"""The lint rule that keeps algorithms behind NodeContext: every banned use is reported, the real algorithms pass.

Runs the real `ruff` on a copy of the configuration (meshfl/algorithms/ruff.toml and the
pyproject.toml it extends, at the same relative places), so a typo in a banned name or a
ruff that stops honouring one shows up here rather than as a silently allowed import.

Also: the user-facing API carries numpy-style docstrings (ruff's pydocstyle rules, issue 14).
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "meshfl" / "algorithms"

BANNED = [  # (line, the rule that must report it)
    ("import time", "TID251"),
    ("import threading", "TID251"),
    ("import socket", "TID251"),
    ("import random", "TID251"),
    ("import pickle", "TID251"),
    ("import os", "TID251"),
    ("import os.path", "TID251"),
    ("from os import environ", "TID251"),
    ("from pathlib import Path", "TID251"),
    ("import shutil", "TID251"),
    ("import io", "TID251"),
    ("import tempfile", "TID251"),
    ("import subprocess", "TID251"),
    ("from asyncio import sleep", "TID251"),
    ("asyncio.sleep(1)", "TID251"),
    ("asyncio.get_event_loop()", "TID251"),
    ("asyncio.get_running_loop()", "TID251"),
    ("builtins.open('x')", "TID251"),
    ("open('x')", "PTH123"),
    ("with open('x') as f: pass", "PTH123"),
]
ALLOWED = ["import asyncio", "import builtins", "asyncio.Event()", "asyncio.timeout(1)", "print(len('x'))"]


def ruff_executable() -> str:
    found = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("ruff is not installed")
    return found


def ruff(*args: str, cwd: Path) -> list[dict]:
    done = subprocess.run([ruff_executable(), "check", "--no-cache", "--output-format", "json", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout or "[]")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A tmp tree with the real configuration: pyproject.toml and meshfl/algorithms/ruff.toml."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "meshfl" / "algorithms").mkdir(parents=True)
    shutil.copy(ALGORITHMS / "ruff.toml", tmp_path / "meshfl" / "algorithms" / "ruff.toml")
    return tmp_path


def write_module(path: Path) -> None:
    path.write_text("\n".join(ALLOWED + [line for line, _ in BANNED]) + "\n")


def reported_by_line(diagnostics: list[dict]) -> dict[int, set[str]]:
    """Rows with a ban reported (TID251 or PTH123); the module's unused imports and such are beside the point."""
    out: dict[int, set[str]] = {}
    for d in diagnostics:
        if d["code"] in ("TID251", "PTH123"):
            out.setdefault(d["location"]["row"], set()).add(d["code"])
    return out


def test_every_banned_api_is_reported_in_algorithms(package: Path):
    write_module(package / "meshfl" / "algorithms" / "bad.py")
    found = reported_by_line(ruff("meshfl/algorithms/bad.py", cwd=package))
    first = len(ALLOWED) + 1
    missing = [(line, code) for i, (line, code) in enumerate(BANNED) if code not in found.get(first + i, set())]
    assert missing == [], f"not reported: {missing}"
    assert not any(found.get(row) for row in range(1, first)), found  # asyncio itself, builtins, timeouts: fine


def test_only_the_project_wide_bans_apply_outside_algorithms(package: Path):
    write_module(package / "meshfl" / "elsewhere.py")
    found = reported_by_line(ruff("meshfl/elsewhere.py", cwd=package))
    first = len(ALLOWED) + 1
    flagged = sorted(BANNED[row - first][0] for row in found if row >= first)
    assert flagged == ["import pickle", "import random"]


def test_real_algorithms_pass_the_rule():
    diagnostics = ruff("meshfl/algorithms", cwd=ROOT)
    assert diagnostics == [], [f"{d['filename']}:{d['location']['row']} {d['code']} {d['message']}" for d in diagnostics]


def test_no_algorithm_refers_to_builtin_open_at_all():
    """PTH123 sees calls only; `read = open` then `read(path)` would slip past it, so look for the name."""
    offenders = []
    for path in sorted(ALGORITHMS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Name) and node.id in ("open", "__import__", "exec", "eval"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.id}")
    assert offenders == []


# ---- numpy-style docstrings on the user-facing API (issue 14) ----------------------------------

DOCUMENTED = [  # the user-facing API: every public function, class and method has a numpy-style docstring
    "meshfl/__init__.py",
    "meshfl/api.py",
    "meshfl/learn/saved.py",
    "meshfl/learn/adapters.py",
    "meshfl/learn/learner.py",
    "meshfl/learn/models.py",
    "meshfl/data/sources.py",
    "meshfl/data/frame.py",
    "meshfl/data/partition.py",
    "meshfl/data/datasets.py",
    "meshfl/data/mnist.py",
    "meshfl/experiment/tracking.py",
    "meshfl/experiment/sweep.py",
    "meshfl/core/params.py",
    "meshfl/core/store.py",
    "meshfl/core/context.py",
    "meshfl/algorithms/base.py",
    "meshfl/algorithms/checkpoints.py",
    "meshfl/algorithms/recovery.py",
    "meshfl/algorithms/replica_codec.py",
    "meshfl/testing.py",
]
DOCSTRING_IGNORE = [
    "D105",  # magic methods (__len__, __contains__, __post_init__ ...): the data model says what they do;
    #          what __post_init__ refuses is in the class docstring's Raises
    "D107",  # __init__: numpydoc documents the constructor's parameters in the class docstring
    #          (the numpy convention leaves D107 out already; listed so a change of convention keeps it out)
    "D401",  # imperative mood: the house style keeps descriptive summaries ("The learner for ...",
    #          "Whether ..."), which numpydoc allows; forcing verbs would reword good docstrings
]


def docstring_problems(*paths: str, cwd: Path) -> list[str]:
    """ruff's pydocstyle rules (D) with the numpy convention; private names are exempt from D1 (ruff's own rule)."""
    found = ruff("--select", "D", "--ignore", ",".join(DOCSTRING_IGNORE),
                 "--config", "lint.pydocstyle.convention = 'numpy'", *paths, cwd=cwd)
    return [f"{Path(d['filename']).relative_to(cwd)}:{d['location']['row']} {d['code']} {d['message']}"
            for d in found if d["code"].startswith("D") or d["code"] == "E902"]


def test_user_facing_api_has_numpy_docstrings():
    missing = [path for path in DOCUMENTED if not (ROOT / path).is_file()]
    assert missing == [], f"moved or renamed? update DOCUMENTED: {missing}"
    assert docstring_problems(*DOCUMENTED, cwd=ROOT) == []


def test_docstring_rule_reports_an_undocumented_public_function(tmp_path: Path):
    """The check is not vacuous: a new public function or method without a docstring fails, a private one does not."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "api.py").write_text(
        '"""A module."""\n\n\n'
        "def documented() -> int:\n"
        '    """Give one.\n\n    Returns\n    -------\n    int\n        One.\n    """\n    return 1\n\n\n'
        "def undocumented() -> int:\n    return 1\n\n\n"
        "def _private() -> int:\n    return 1\n\n\n"
        "class Thing:\n"
        '    """A thing."""\n\n'
        "    def method(self) -> int:\n        return 1\n\n"
        "    def _helper(self) -> int:\n        return 1\n\n"
        "    def __len__(self) -> int:\n        return 1\n")
    codes = sorted(problem.split()[1] for problem in docstring_problems("api.py", cwd=tmp_path))
    assert codes == ["D102", "D103"]
