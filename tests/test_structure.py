"""The package's boundaries, read off the source: which subpackage may import what, and no import cycles.

The roles (``orchestrator/*/__init__.py`` say each one's): ``spec`` and ``plan`` are pure (no torch, Ray, MLflow,
DeepSpeed or transformers, even lazily), only ``runtime`` imports Ray, only ``tracking`` imports MLflow, and no
module imports another's private (underscore) names. The graph counts every import, also those inside functions:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"
HEAVY = ("torch", "ray", "mlflow", "deepspeed", "transformers")
PURE = ("spec", "plan")
ONLY = {"ray": "runtime", "mlflow": "tracking"}  # library -> the one subpackage that may import it
ROLES = ("spec", "plan", "train", "runtime", "tracking", "workflows", "serve", "cli")


def scan(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = scan(PACKAGE)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def edges(modules: dict[str, Path], name: str) -> set[str]:
    """The package modules ``name`` imports: ``from orchestrator.a import b`` is module a.b if there is one."""
    top = name.split(".")[0]
    out = set()
    for module, names, _ in imports(modules[name]):
        if module.split(".")[0] != top:
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        out |= set(subs) if subs and len(subs) == len(names) else {module} | set(subs)
    return (out & modules.keys()) - {name}


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every import cycle a depth-first walk of the graph meets (each as the path that closes it)."""
    graph = {name: edges(modules, name) for name in modules}
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def library_imports(modules: dict[str, Path], library: str, where) -> list[str]:
    """file:line of each import of ``library`` in the modules whose role ``where`` accepts."""
    return [f"{name.replace('.', '/')}{'/__init__' if path.stem == '__init__' else ''}.py:{line}"
            for name, path in modules.items() if where(role(name))
            for module, _, line in imports(path) if module.split(".")[0] == library]


def role(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_lives_in_one_of_the_roles():
    loose = [n for n in MODULES if role(n) not in ROLES and n not in ("orchestrator", "orchestrator.__main__")]
    assert not loose, f"modules outside the role packages {ROLES}: {loose}"


@pytest.mark.parametrize("library", HEAVY)
def test_the_pure_packages_never_import_the_heavy_libraries(library):
    found = library_imports(MODULES, library, lambda r: r in PURE)
    assert not found, f"{library} imported in a pure package: {found}"


@pytest.mark.parametrize("library", sorted(ONLY))
def test_only_one_package_imports_each_service_library(library):
    found = library_imports(MODULES, library, lambda r: r != ONLY[library])
    assert not found, f"{library} may be imported only in orchestrator/{ONLY[library]}/: {found}"


def test_no_module_imports_another_modules_private_names():
    found = [f"{MODULES[n].relative_to(PACKAGE.parent)}:{line} {module}.{name}" for n in MODULES
             for module, names, line in imports(MODULES[n]) if module.startswith("orchestrator") and module != n
             for name in names if name.startswith("_")]
    assert not found, f"make these public, or move them where they are used: {found}"


def private_ray_imports(modules: dict[str, Path]) -> list[str]:
    """Imports of Ray's internals: a module path with a private part (``ray._private``, ``ray.train.v2._internal``)
    or a private name (``from ray.train.torch.config import _setup_torch_process_group``)."""
    return [f"{name}:{line} {module}" for name, path in modules.items() for module, names, line in imports(path)
            if module.split(".")[0] == "ray"
            and (any(part.startswith("_") for part in module.split(".")) or any(n.startswith("_") for n in names))]


def test_rays_internals_are_used_in_one_guarded_module_only():
    """``runtime/shortcuts.py`` checks the installed Ray version before using them (the stock path otherwise)."""
    found = [entry for entry in private_ray_imports(MODULES) if not entry.startswith("orchestrator.runtime.shortcuts:")]
    assert not found, f"Ray internals outside orchestrator/runtime/shortcuts.py: {found}"
    assert private_ray_imports({"orchestrator.runtime.shortcuts": MODULES["orchestrator.runtime.shortcuts"]})


def test_there_are_no_import_cycles():
    found = cycles(MODULES)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_importing_the_pure_packages_loads_none_of_the_heavy_libraries():
    """What the static check above cannot see: what the pure modules pull in through what they import."""
    pure = [n for n in MODULES if role(n) in PURE]
    code = (f"import importlib, sys\nfor name in {pure!r}:\n    importlib.import_module(name)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"importing {pure} loaded {done.stdout.strip()}"


def test_the_checks_find_a_lazy_import_and_a_cycle_in_a_planted_package(tmp_path):
    """The scanners on a package built here: a function-level import of Ray in a pure package, MLflow outside
    tracking, and a cycle through a lazy import are each found; the clean parts are not reported."""
    root = tmp_path / "orchestrator"
    files = {"__init__.py": "", "plan/__init__.py": "", "tracking/__init__.py": "",
             "plan/a.py": "def f():\n    import ray\n    from orchestrator.plan import b\n",
             "plan/b.py": "from orchestrator.plan.a import f\n",
             "plan/c.py": "import math\n",
             "tracking/ok.py": "import mlflow\n",
             "plan/d.py": "from mlflow import MlflowClient\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    planted = scan(root)
    assert library_imports(planted, "ray", lambda r: r in PURE) == ["orchestrator/plan/a.py:2"]
    assert library_imports(planted, "mlflow", lambda r: r != "tracking") == ["orchestrator/plan/d.py:1"]
    assert cycles(planted) == [["orchestrator.plan.a", "orchestrator.plan.b", "orchestrator.plan.a"]]
