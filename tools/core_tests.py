"""List the test files that need nothing but ``secvec_core`` and its own dependencies.

CI runs these in a second virtual environment holding only torch, the declared *minimum* versions of
transformers and peft, and pytest, to prove that ``pip install secvec`` (no extras) is enough for
``secvec_core``. A file qualifies when every module it imports, anywhere in the file and through the
``tests.*`` helpers it imports, is in the standard library or in ``CORE_MODULES``; so a test that starts
using mlflow (say) drops out of that run by itself instead of breaking it.

    python tools/core_tests.py              # prints tests/<file>.py, one per line
    python tools/core_tests.py --minimums   # transformers==<min> peft==<min>, from pyproject.toml
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# secvec_core's declared dependencies and what they pull in themselves, plus the test runner.
CORE_MODULES = frozenset(
    {
        "secvec_core",
        "torch",
        "transformers",
        "peft",
        "safetensors",
        "tokenizers",
        "tqdm",
        "numpy",
        "huggingface_hub",
        "pytest",
    }
)
# Files whose needs an import scan cannot see: they run repository scripts in a subprocess.
RUNS_SCRIPTS = {"test_benchmarks.py": "runs benchmarks/*.py, which import workflows.assets and matplotlib"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "tests":
                names.update(f"tests.{alias.name}" for alias in node.names)
    return names


def non_core_imports(path: Path, seen: set[Path] | None = None) -> set[str]:
    """Modules outside the standard library and ``CORE_MODULES`` that ``path`` needs."""
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    missing: set[str] = set()
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "tests":
            helper = ROOT / (name.replace(".", "/") + ".py")
            if helper.is_file():
                missing |= non_core_imports(helper, seen)
            continue
        if top in sys.stdlib_module_names or top in CORE_MODULES or top == "__future__":
            continue
        missing.add(top)
    return missing


def core_test_files(root: Path = ROOT) -> list[Path]:
    return [
        p for p in sorted((root / "tests").glob("test_*.py")) if p.name not in RUNS_SCRIPTS and not non_core_imports(p)
    ]


def minimum_requirements(packages: tuple[str, ...] = ("transformers", "peft"), root: Path = ROOT) -> list[str]:
    """``name==<lower bound>`` for each of ``packages``, read from ``[project] dependencies``."""
    dependencies = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = []
    for name in packages:
        bound = next((m[1] for d in dependencies if (m := re.match(rf"{name}\s*(?:\[.*\])?.*>=\s*([\w.]+)", d))), None)
        if bound is None:
            raise SystemExit(f"pyproject.toml declares no lower bound (>=) for {name}")
        pins.append(f"{name}=={bound}")
    return pins


if __name__ == "__main__":
    if sys.argv[1:] == ["--minimums"]:
        print(" ".join(minimum_requirements()))
    else:
        for path in core_test_files():
            print(path.relative_to(ROOT))
