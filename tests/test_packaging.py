"""Packaging: `pip install secvec` is secvec_core alone, extras bring the rest, constraints.txt is the tested set.

The install itself at the declared minimum versions runs in CI (`make test-minimums`); these tests keep the
files that drive it honest.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from workflows.console import EXTRA_FOR_MODULE, missing_extra_hint

ROOT = Path(__file__).resolve().parents[1]


def _core_tests_module():
    spec = importlib.util.spec_from_file_location("core_tests", ROOT / "tools" / "core_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROJECT = _core_tests_module().tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# filelock: the folding stash locks (torch itself depends on it, so it adds nothing to the install)
CORE_REQUIREMENTS = {"torch", "transformers", "peft", "safetensors", "tokenizers", "tqdm", "filelock"}


def _requirements(extra: str | None = None) -> list[Requirement]:
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _guarded_by_import_error(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``try: ... except ImportError`` (optional features)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            lines |= {
                n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)
            }
    return lines


def test_secvec_core_imports_only_its_declared_dependencies():
    allowed = CORE_REQUIREMENTS | {"secvec_core", "__future__"}
    offenders = []
    for path in sorted((ROOT / "secvec_core").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _guarded_by_import_error(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in allowed and top not in sys.stdlib_module_names and node.lineno not in optional:
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offenders, offenders


def test_plain_install_is_torch_transformers_and_peft():
    assert {canonicalize_name(r.name) for r in _requirements()} == CORE_REQUIREMENTS
    bounds = {r.name: r.specifier for r in _requirements()}
    assert "5.1" in bounds["transformers"] and "5.0" not in bounds["transformers"]  # peft 0.19 under DDP
    assert "0.19" in bounds["peft"] and "0.18.1" not in bounds["peft"]  # inference_mode=, unload() clean-up
    assert any(s.operator == "<" for s in bounds["peft"]), "folding reads peft internals: cap peft"


def test_minimums_for_ci_are_the_declared_lower_bounds():
    assert _core_tests_module().minimum_requirements() == ["transformers==5.1", "peft==0.19"]


def test_every_module_the_console_hint_names_comes_with_that_extra():
    extras = PROJECT["optional-dependencies"]
    distribution = {"yaml": "pyyaml", "psycopg2": "psycopg2-binary"}
    for module, extra in EXTRA_FOR_MODULE.items():
        names = {canonicalize_name(Requirement(line).name) for line in extras[extra]}
        assert canonicalize_name(distribution.get(module, module)) in names, (module, extra)


def test_unused_psycopg3_is_not_declared_and_constraints_match_every_declared_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    declared = _requirements() + [
        r
        for extra in PROJECT["optional-dependencies"]
        if extra != "hf"
        for r in _requirements(extra)
        if canonicalize_name(r.name) != "secvec"
    ]
    assert "psycopg" not in {canonicalize_name(r.name) for r in declared} and "psycopg" not in pins
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])


def test_core_test_selection_follows_imports():
    core_tests = _core_tests_module()
    names = {p.name for p in core_tests.core_test_files()}
    assert {"test_core_invariants.py", "test_folded_guard.py", "test_core_data_and_eval.py"} <= names
    assert not names & {"test_bad_inputs.py", "test_pipeline_e2e.py", "test_model_loading.py", "test_benchmarks.py"}
    assert not core_tests.non_core_imports(ROOT / "tests" / "conftest.py"), "conftest.py must load without extras"


def test_console_script_without_the_pipeline_extra_prints_one_line():
    code = (
        "import sys; sys.modules['typer'] = None; sys.argv = ['secvec', '--help']; "
        "from workflows.console import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: this secvec command needs the 'typer' package, which comes with the pipeline extra: "
        "pip install 'secvec[pipeline]'"
    ]


def test_console_script_refuses_at_once_when_only_part_of_the_pipeline_extra_is_there():
    """transformers 5 brings typer and pyyaml, so ``secvec --help`` would start without ray or mlflow."""
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['secvec', '--help']; "
        "from workflows.console import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "'ray' package" in result.stderr and len(result.stderr.splitlines()) == 1


def test_missing_module_hints_name_the_extra_and_leave_real_bugs_alone():
    assert "pip install 'secvec[kube]'" in missing_extra_hint(ModuleNotFoundError(name="kubernetes.client"))
    assert missing_extra_hint(ModuleNotFoundError(name="workflows.typo")) is None


@pytest.mark.parametrize("command", ["make test", "make test-minimums"])
def test_ci_runs_the_readme_test_command_and_the_minimum_versions(command):
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_spec_excerpt_is_lines_of_the_file_in_order():
    """The README shows an excerpt of the demo spec; every line it shows must be in the file, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = "<!-- readme-excerpt: workflows/examples/demo.yaml"
    block = readme.split(marker, 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = [line for line in block.splitlines() if line.strip() and line.strip() != "# ..."]
    remaining = iter((ROOT / "workflows" / "examples" / "demo.yaml").read_text(encoding="utf-8").splitlines())
    missing = [line for line in shown if not any(line == candidate for candidate in remaining)]
    assert not missing, f"README excerpt lines not in demo.yaml (in order): {missing}"
