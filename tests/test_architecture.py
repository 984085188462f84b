"""The arrows between the package's modules, checked by reading the source (docs/architecture.md, "Rules").

A small AST walk over `airflow_provider_zimage/`, no imports of it: production code never leans on the
test kit, the lower layers never reach up into the Airflow surface, no two modules need each other,
`[zimage]` is read in one place, errors live in one module, and an import of the package hidden inside
a function says why. The rules are data (`LAYERS`, `FORBIDDEN`): moving a module edits the table, not
the walker. Each rule also runs against a package planted with one violation of it, so none of them
can pass by looking at nothing.
"""

from __future__ import annotations

import ast
import builtins
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import airflow_provider_zimage

PACKAGE = "airflow_provider_zimage"
PACKAGE_DIR = Path(airflow_provider_zimage.__file__).parent

# Module names below are relative to the package; a name covers the module and everything under it.
AIRFLOW_SURFACE = ("operators", "sensors", "triggers", "ui")
LOWER_LAYERS = (
    "jobs",
    "runware",
    "openai_images",
    "storage",
    "webhooks",
    "local",
    "executor",
    "redaction",
    "origins",
    "exceptions",
    "config",
    "compat",
)


@dataclass(frozen=True)
class Forbidden:
    """Modules under `importers` (minus `exempt`) must not import anything under `targets`."""

    why: str
    importers: tuple[str, ...]
    targets: tuple[str, ...]
    exempt: tuple[str, ...] = ()


FORBIDDEN = (
    Forbidden(
        "production code never imports the test kit",
        importers=("",),
        targets=("testing",),
        exempt=("testing",),
    ),
    Forbidden(
        "the lower layers never import the Airflow surface", importers=LOWER_LAYERS, targets=AIRFLOW_SURFACE
    ),
    Forbidden(
        "the Runware wire is sans-IO: no jobs, storage, webhooks or backends under it",
        importers=("runware",),
        targets=("jobs", "storage", "webhooks", "local", "executor", "hooks", "openai_images"),
    ),
    Forbidden(
        "the OpenAI images wire is sans-IO: no jobs, storage, webhooks, executor or hooks under it",
        importers=("openai_images",),
        targets=("jobs", "storage", "webhooks", "executor", "hooks"),
    ),
    Forbidden(
        "storage keeps bytes and records; it never decides what to pay for",
        importers=("storage",),
        targets=("jobs", "runware", "webhooks", "local", "executor", "hooks", "openai_images"),
    ),
    Forbidden(
        "the backends serve requests; they never reach into a task's jobs or storage",
        importers=("local", "executor"),
        targets=("jobs", "storage", "webhooks", "hooks"),
    ),
)
CONFIG_MODULE = "config"
"""The one module that reads `[zimage]`."""
ERRORS_MODULE = "exceptions"
"""The one module that defines error classes."""

_CONF_GETTERS = frozenset(
    {"get", "getint", "getfloat", "getboolean", "getlist", "getjson", "getsection", "has_option", "getenv"}
)


# -- the walker ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    importer: str  # dotted, relative to the package ("" is the package's __init__)
    target: str
    line: int
    in_function: bool
    type_checking: bool


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    source: str


def _modules(root: Path) -> dict[str, Module]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        source = path.read_text(encoding="utf-8")
        found[".".join(parts)] = Module(".".join(parts), path, ast.parse(source), source)
    return found


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    node: ast.AST, in_function: bool = False, type_checking: bool = False
) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, in_function, type_checking
        inner_function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, inner_function, True
                yield from _walk(stmt, inner_function, True)
            for stmt in child.orelse:
                yield stmt, inner_function, type_checking
                yield from _walk(stmt, inner_function, type_checking)
        else:
            yield from _walk(child, inner_function, type_checking)


def _targets(
    module: Module, node: ast.Import | ast.ImportFrom, package: str, known: dict[str, Module]
) -> list[str]:
    """Modules of `package` (relative names) that an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            is_package = module.path.name == "__init__.py"
            base = module.name.split(".") if module.name else []
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            absolute = ".".join([package, *base, *([node.module] if node.module else [])])
        else:
            absolute = node.module or ""
        submodules = [f"{absolute}.{alias.name}" for alias in node.names]
        leaves = [name.removeprefix(package).lstrip(".") for name in submodules]
        # `from pkg import name` loads pkg itself unless every name is a submodule of it.
        names = submodules if all(leaf in known for leaf in leaves) else [absolute, *submodules]
    found = []
    for name in names:
        if name != package and not name.startswith(package + "."):
            continue
        relative = name.removeprefix(package).lstrip(".")
        if relative in known and relative not in found:
            found.append(relative)
    return found


def imports(root: Path, package: str) -> list[Import]:
    known = _modules(root)
    found = []
    for module in known.values():
        for node, in_function, type_checking in _walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node, package, known):
                    if target != module.name:
                        found.append(Import(module.name, target, node.lineno, in_function, type_checking))
    return found


def forbidden_imports(root: Path, package: str, rules: tuple[Forbidden, ...] = FORBIDDEN) -> list[str]:
    """Every import (module level, inside functions, type-only) that breaks a rule."""
    broken = []
    for imp in imports(root, package):
        for rule in rules:
            if (
                any(_under(imp.importer, p) for p in rule.importers)
                and not any(_under(imp.importer, p) for p in rule.exempt)
                and any(_under(imp.target, p) for p in rule.targets)
            ):
                broken.append(f"{imp.importer}:{imp.line} imports {imp.target}: {rule.why}")
    return broken


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Groups of modules that import each other, counting imports inside functions (a cycle hidden in a
    function is still a cycle) but not `if TYPE_CHECKING:` ones, which never run."""
    graph: dict[str, set[str]] = {name: set() for name in _modules(root)}
    for imp in imports(root, package):
        if not imp.type_checking:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def unexplained_function_imports(root: Path, package: str) -> list[str]:
    """Imports of the package inside a function without a `# why:` comment on that line or just above."""
    modules = _modules(root)
    missing = []
    for imp in imports(root, package):
        if not imp.in_function:
            continue
        lines = modules[imp.importer].source.splitlines()
        nearby = lines[imp.line - 1] + (lines[imp.line - 2] if imp.line > 1 else "")
        if "# why:" not in nearby:
            missing.append(
                f"{imp.importer}:{imp.line} imports {imp.target} inside a function without '# why:'"
            )
    return missing


def _section_read(node: ast.Call) -> bool:
    args = [a.value for a in node.args[:2] if isinstance(a, ast.Constant)]
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    first = args[0] if args else None
    if not isinstance(first, str):
        return False
    if first == "zimage" and (name in _CONF_GETTERS or (len(args) == 2 and isinstance(args[1], str))):
        return True  # conf.get("zimage", ...), a helper called with ("zimage", "option")
    return first.startswith("AIRFLOW__ZIMAGE__") and name in _CONF_GETTERS  # os.environ.get / os.getenv


def zimage_readers(root: Path, config_module: str = CONFIG_MODULE) -> list[str]:
    """Places outside `config_module` that read the `[zimage]` section."""
    found = []
    for module in _modules(root).values():
        if module.name == config_module:
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and _section_read(node):
                found.append(f"{module.name}:{node.lineno} reads [zimage]")
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.slice, ast.Constant)
                and node.slice.value == "zimage"
            ):
                found.append(f"{module.name}:{node.lineno} reads [zimage]")
    return found


_BUILTIN_ERRORS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


def stray_error_classes(root: Path, errors_module: str = ERRORS_MODULE) -> list[str]:
    """Exception classes defined outside `errors_module`: one deriving from a built-in exception, from
    one of `errors_module`'s classes, or named like an error."""
    modules = _modules(root)
    ours = (
        {node.name for node in ast.walk(modules[errors_module].tree) if isinstance(node, ast.ClassDef)}
        if errors_module in modules
        else set()
    )
    stray = []
    for module in modules.values():
        if module.name == errors_module:
            continue
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
            if bases & (_BUILTIN_ERRORS | ours) or any(b.endswith(("Error", "Exception")) for b in bases):
                stray.append(f"{module.name}.{node.name}")
    return stray


# -- the package ------------------------------------------------------------------------------------


def test_production_code_never_imports_the_test_kit_and_lower_layers_never_import_the_airflow_surface() -> (
    None
):
    assert forbidden_imports(PACKAGE_DIR, PACKAGE) == []


def test_no_two_modules_import_each_other() -> None:
    assert import_cycles(PACKAGE_DIR, PACKAGE) == []


def test_an_import_of_the_package_inside_a_function_says_why() -> None:
    """Left inside functions only for optional dependencies or Airflow at runtime, each with its reason."""
    assert unexplained_function_imports(PACKAGE_DIR, PACKAGE) == []


def test_only_config_reads_the_zimage_section() -> None:
    assert zimage_readers(PACKAGE_DIR) == []


def test_every_error_class_is_defined_in_exceptions() -> None:
    assert stray_error_classes(PACKAGE_DIR) == []


def test_every_layer_the_rules_name_exists() -> None:
    """A rule naming a module that moved would hold vacuously: the table must follow the moves."""
    names = set(_modules(PACKAGE_DIR))
    for rule in FORBIDDEN:
        for prefix in (*rule.importers, *rule.targets, *rule.exempt):
            assert prefix == "" or any(_under(n, prefix) for n in names), f"{prefix!r} ({rule.why})"


# -- negative controls: each check finds a planted violation ---------------------------------------------


PLANTED = {
    "__init__.py": "",
    "exceptions.py": "class PlantedError(Exception):\n    pass\n",
    "config.py": "",
    "testing/__init__.py": "",
    "testing/kit.py": "from planted import storage\n",  # the kit may build on production
    "operators/__init__.py": "",
    "operators/generate.py": "from planted import storage\n",
    "hooks/__init__.py": "",
    "hooks/runware.py": "from planted.testing import kit\n",
    "storage.py": """
        from planted.exceptions import PlantedError


        def write():
            from planted.spend import record  # why: planted, to make a cycle through a function
            from planted.operators.generate import Operator  # why: planted, reaching up
            return record, Operator


        class StorageError(PlantedError):
            pass
        """,
    "spend.py": """
        from planted import storage

        from .compat import conf


        def output():
            return conf.get("zimage", "output_path")


        def record():
            from planted import models
            return models


        class Unreadable(ValueError):
            pass
        """,
    "models.py": "",
    "compat.py": "conf = None\n",
}


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    root = tmp_path / "planted"
    for name, text in PLANTED.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


def test_the_walker_finds_planted_forbidden_imports(planted: Path) -> None:
    assert sorted(forbidden_imports(planted, "planted")) == [
        "hooks.runware:1 imports testing.kit: production code never imports the test kit",
        "storage:6 imports operators.generate: the lower layers never import the Airflow surface",
    ]


def test_the_walker_finds_a_planted_cycle_even_through_a_function(planted: Path) -> None:
    assert import_cycles(planted, "planted") == [["operators.generate", "spend", "storage"]]


def test_the_walker_finds_a_planted_function_import_without_a_reason(planted: Path) -> None:
    assert unexplained_function_imports(planted, "planted") == [
        "spend:11 imports models inside a function without '# why:'"
    ]


def test_the_walker_finds_a_planted_zimage_read(planted: Path) -> None:
    assert zimage_readers(planted) == ["spend:7 reads [zimage]"]


def test_the_walker_finds_planted_error_classes(planted: Path) -> None:
    assert sorted(stray_error_classes(planted)) == ["spend.Unreadable", "storage.StorageError"]
