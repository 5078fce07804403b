"""The codebase's shape, checked: layers import only downward, the spec layer is torch-free,
other packages' private names stay behind two adapters (Optuna's; torch's and torchvision's), no
private name crosses a module, functions stay short.

The layers are written down in ``docs/architecture.md``; :data:`LAYERS` is the same table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jdsearch"

# Bottom to top, one folder per layer: a module may import jdsearch modules of its own layer or
# below. The package's root modules (``__init__``, ``__main__``, ``testing``) are the app layer,
# with ``cli/``.
LAYERS: list[tuple[str, str]] = [
    ("core", "core"),
    ("spec", "spec"),
    ("data", "data"),
    ("models", "models"),
    ("store", "store"),
    ("init", "init"),
    ("engine", "engine"),
    ("methods", "methods"),
    ("storage", "storage"),
    ("search", "search"),
    ("report", "report"),
    ("app", "cli"),
]
ROOT_MODULES = {"__init__", "__main__", "testing"}  # the app layer's, beside cli/
# Third-party packages a layer may not import (neither may any layer below it).
FORBIDDEN = {
    "core": {"torch", "torchvision", "optuna", "sqlalchemy", "plotly", "onnx", "onnxruntime"},
    "spec": {"torch", "torchvision", "optuna", "sqlalchemy", "plotly", "onnx", "onnxruntime"},
    "data": {"optuna", "sqlalchemy", "plotly"},
    "models": {"optuna", "sqlalchemy", "plotly"},
    "store": {"optuna", "sqlalchemy", "plotly"},
    "init": {"optuna", "sqlalchemy", "plotly"},
    "engine": {"optuna", "sqlalchemy", "plotly"},
    "methods": {"optuna", "sqlalchemy", "plotly"},
    "storage": {"plotly"},
    "search": {"plotly"},
}
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module name relative to ``jdsearch``: its top folder's layer
    (a root module's: the app layer)."""
    top, _, rest = module.partition(".")
    if not rest and top in ROOT_MODULES | {""}:
        return len(LAYERS) - 1
    folders = [folder for _, folder in LAYERS]
    assert top in folders, f"jdsearch.{module} is in no layer's folder of LAYERS"
    return folders.index(top)


def test_every_module_is_in_a_layers_folder() -> None:
    """The package root holds only the app layer's modules and one folder per layer."""
    folders = {folder for _, folder in LAYERS}
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ROOT_MODULES, f"modules at the package root: {sorted(root - ROOT_MODULES)}"
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == folders, sorted(subpackages ^ folders)
    for name, _, _ in _modules():
        _layer_of(name)


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out.append((_module_name(path), path, ast.parse(path.read_text())))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """Every import in the module (top level and inside functions): (module, names, line)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def _jdsearch_target(module: str, names: list[str]) -> list[str]:
    """The jdsearch modules an import reaches (``from jdsearch import x`` reaches ``x``)."""
    rel = module.removeprefix("jdsearch").lstrip(".")
    if rel:
        return [rel]
    return [n for n in names if (PACKAGE / n).exists() or (PACKAGE / f"{n}.py").exists()]


def test_every_layer_imports_only_its_own_layer_and_the_ones_below() -> None:
    problems = []
    for name, path, tree in _modules():
        own = _layer_of(name)
        for module, names, line in _imports(tree):
            if module != "jdsearch" and not module.startswith("jdsearch."):
                continue
            for target in _jdsearch_target(module, names):
                if _layer_of(target) > own:
                    problems.append(
                        f"{path.name}:{line}: jdsearch.{name} ({LAYERS[own][0]}) imports "
                        f"jdsearch.{target} ({LAYERS[_layer_of(target)][0]})"
                    )
    assert not problems, "\n".join(problems)


def _import_graph() -> dict[str, set[str]]:
    """Module → the jdsearch modules it imports (anywhere in it, inside functions too)."""
    names = {name for name, _, _ in _modules()}
    graph: dict[str, set[str]] = {}
    for name, _, tree in _modules():
        edges = set()
        for module, imported, _ in _imports(tree):
            if module != "jdsearch" and not module.startswith("jdsearch."):
                continue
            base = module.removeprefix("jdsearch").lstrip(".")
            for n in imported or [""]:
                sub = f"{base}.{n}".lstrip(".")
                edges.add(sub if sub in names else base)
        graph[name] = edges & names - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (``[]``: none), by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return []

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return []


def test_no_two_modules_import_each_other() -> None:
    """The import graph has no cycle (``search.run`` and ``search.follower`` once formed one),
    counting imports inside functions too; the check finds one where there is one."""
    cycle = _cycle(_import_graph())
    assert not cycle, " -> ".join(cycle)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_layer_imports_a_package_it_must_not() -> None:
    names = [layer for layer, _ in LAYERS]
    problems = []
    for name, path, tree in _modules():
        layer = LAYERS[_layer_of(name)][0]
        banned = set().union(
            *(FORBIDDEN.get(n, set()) for n in names[names.index(layer) :] if n in FORBIDDEN)
        ) & FORBIDDEN.get(layer, set())
        for module, _, line in _imports(tree):
            if module.split(".")[0] in banned:
                problems.append(f"{path.name}:{line}: jdsearch.{name} ({layer}) imports {module}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("jdsearch.spec.study", "torch"),
        ("jdsearch.spec.detector", "torch"),
        ("jdsearch.spec.pool", "torch"),
        ("jdsearch", "torch"),
        ("jdsearch.store.export", "optuna"),
        ("jdsearch.engine.train", "optuna"),
        ("jdsearch.engine.threads", "torch"),  # the OpenMP policy is set before torch loads
    ],
)
def test_importing_a_layer_pulls_nothing_from_above(module: str, absent: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if {absent!r} in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"importing {module} imports {absent}: {result.stderr}"


# The only modules that may touch another package's private names (attributes, modules), each use
# with the reason the public API does not suffice.
ADAPTERS = {"storage.optuna_internals", "models.torch_internals"}
# Private names known to be Optuna's or torchvision's: never allowed outside the adapters, even
# should jdsearch define a name of its own that is spelled the same.
FOREIGN = {"_storage", "_study_id", "_trial_id", "_backend", "_pre_nms_top_n", "_post_nms_top_n"}
# Outside the adapters, one (module, private name) with its reason: detectron2_backbone is copied,
# unchanged, into `jdsearch export --format detectron2` and runs there without jdsearch (it cannot
# import an adapter); detectron2's FPN takes no size divisibility and exposes it as a read-only
# property over `_size_divisibility`.
EXCEPTIONS = {("store.detectron2_backbone", "_size_divisibility")}
_ATTR_CALLS = {"getattr", "setattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    """A single-underscore name (``_x``; not a dunder, not ``_`` alone)."""
    return name.startswith("_") and not name.startswith("__") and name != "_"


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, ast.AnnAssign | ast.AugAssign):
        return [node.target]
    return []


def _names_bound(target: ast.expr, *, attributes_only: bool = False) -> list[str]:
    """The names an assignment target binds (``a``, ``a, b``, ``self._a``/``cls._a``); with
    ``attributes_only``, only the attributes of ``self``/``cls``."""
    if isinstance(target, ast.Name):
        return [] if attributes_only else [target.id]
    if isinstance(target, ast.Tuple | ast.List | ast.Starred):
        elts = target.elts if not isinstance(target, ast.Starred) else [target.value]
        return [n for t in elts for n in _names_bound(t, attributes_only=attributes_only)]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        return [target.attr] if target.value.id in ("self", "cls") else []
    return []


def _defined_privates(modules: list[tuple[str, Path, ast.Module]]) -> set[str]:
    """Every private name jdsearch itself defines outside the adapters: functions, classes and
    methods (at any depth), module- and class-level names (dataclass fields included), attributes
    set on ``self``/``cls``, module-level imports under another name."""
    names: set[str] = set()
    for name, _, tree in modules:
        if name in ADAPTERS:
            continue  # an adapter's definitions may be another package's names (overrides)
        scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]
        for scope in scopes:
            for node in scope.body:
                names.update(n for t in _targets(node) for n in _names_bound(t))
                if isinstance(node, ast.Import | ast.ImportFrom) and scope is tree:
                    names.update(a.asname for a in node.names if a.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            names.update(n for t in _targets(node) for n in _names_bound(t, attributes_only=True))
    return {n for n in names if _private(n)} - FOREIGN


def _private_uses(modules: list[tuple[str, Path, ast.Module]]) -> list[str]:
    """Where a module other than the adapters touches another package's private name: an
    attribute ``x._name`` that jdsearch does not define, ``getattr``/``setattr``/``hasattr``/
    ``delattr`` with a literal private name, an import of a private module or name."""
    ours = _defined_privates(modules)
    problems = []
    for name, path, tree in modules:
        if name in ADAPTERS:
            continue
        for node in ast.walk(tree):
            attr = node.attr if isinstance(node, ast.Attribute) else ""
            if _private(attr) and attr not in ours and (name, attr) not in EXCEPTIONS:
                problems.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _ATTR_CALLS
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                problems.append(
                    f"{path.name}:{node.lineno}: {node.func.id}(…, {node.args[1].value!r})"
                )
        for module, names, line in _imports(tree):
            if module.split(".")[0] in ("jdsearch", "__future__"):
                continue
            if any(_private(p) for p in module.split(".")) or any(_private(n) for n in names):
                problems.append(f"{path.name}:{line}: imports {module} {names or ''}".rstrip())
    return problems


def test_private_names_of_other_packages_stay_behind_the_adapters() -> None:
    """Optuna's, torch's and torchvision's private attributes and modules are touched only in
    :data:`ADAPTERS` (docs/architecture.md, "Private names behind adapters")."""
    problems = _private_uses(_modules())
    assert not problems, "\n".join(problems)


def test_the_private_name_check_reports_what_it_should() -> None:
    """The check itself: a torchvision private set outside an adapter, a literal private name
    through ``setattr``/``getattr`` and private imports are reported; the same code inside an
    adapter, and jdsearch's own private names, are not."""
    snippet = (
        "import optuna.storages._heartbeat\n"
        "from torchvision.models import _utils\n"
        "def tune(rpn, storage, model):\n"
        "    rpn._pre_nms_top_n = 5\n"
        "    setattr(storage, '_get_trials', None)\n"
        "    return getattr(model, '_skip_resize'), storage._storage\n"
        "class Mine:\n"
        "    _table = 1\n"
        "    def __init__(self):\n"
        "        self._own = self._table\n"
        "    def _helper(self):\n"
        "        return self._own, self._helper\n"
    )
    tree = ast.parse(snippet)
    outside = _private_uses([("models.fake", PACKAGE / "models" / "fake.py", tree)])
    assert outside == [
        "fake.py:4: ._pre_nms_top_n",
        "fake.py:5: setattr(…, '_get_trials')",
        "fake.py:6: getattr(…, '_skip_resize')",
        "fake.py:6: ._storage",
        "fake.py:1: imports optuna.storages._heartbeat",
        "fake.py:2: imports torchvision.models ['_utils']",
    ]
    inside = [("models.torch_internals", PACKAGE / "models" / "torch_internals.py", tree)]
    assert _private_uses(inside) == []
    # Defined in an adapter, a private name stays foreign elsewhere (e.g. an override there).
    adapter = ast.parse("class H:\n    def _get_trials(self):\n        pass\n")
    user = ast.parse("def f(s):\n    return s._get_trials()\n")
    assert _private_uses(
        [
            ("storage.optuna_internals", PACKAGE / "storage" / "optuna_internals.py", adapter),
            ("search.run", PACKAGE / "search" / "run.py", user),
        ]
    ) == ["run.py:2: ._get_trials"]


def test_no_private_name_is_imported_across_modules() -> None:
    problems = []
    for _, path, tree in _modules():
        for module, names, line in _imports(tree):
            if module.startswith("jdsearch"):
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    problems.append(f"{path.name}:{line}: from {module} import {private}")
    assert not problems, "\n".join(problems)


def test_functions_of_the_package_are_short() -> None:
    long = []
    for _, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), (
            f"{init.parent.name}/__init__.py: no layering rule in its docstring"
        )


def test_the_public_api_documents_its_contract() -> None:
    """Every function of ``jdsearch.__all__`` says what it takes, returns and raises; every class
    has a docstring; ``evolve``, ``feasible_actions`` and ``HillClimbingSampler`` are there."""
    import inspect

    import jdsearch

    assert {"evolve", "feasible_actions", "HillClimbingSampler"} <= set(jdsearch.__all__)
    missing = []
    for name in jdsearch.__all__:
        if name == "__version__":
            continue
        obj = getattr(jdsearch, name)
        doc = inspect.getdoc(obj) or ""
        if inspect.isfunction(obj):
            needed = ["Args:", "Returns:"]
            if any(m in inspect.getsource(obj) for m in ("raise ", "load_", "check")):
                needed.append("Raises:")
            missing += [f"{name}: no {n}" for n in needed if n not in doc]
        elif not doc.strip():
            missing.append(f"{name}: no docstring")
    assert not missing, "\n".join(missing)


def test_the_wheel_lists_every_package_and_carries_the_presets() -> None:
    """pyproject.toml names the packages one by one (the presets are mapped in from the top-level
    folders): a new sub-package missing from the list would be missing from the wheel."""
    import fnmatch
    import tomllib

    from jdsearch.core.config import preset_dir

    setup = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")
    }
    presets = {"jdsearch.presets.detectors": "detectors", "jdsearch.presets.studies": "studies"}
    assert set(setup["packages"]) == on_disk | set(presets)
    assert setup["package-dir"] == presets
    for name, folder in presets.items():
        patterns = setup["package-data"][name]
        assert "*.yaml" in patterns
        # Every file of a preset folder (a study's shipped base and its record too) is in a wheel.
        files = [p for p in (PACKAGE.parent / folder).iterdir() if p.is_file()]
        assert all(any(fnmatch.fnmatch(p.name, pat) for pat in patterns) for p in files), files
        assert preset_dir(folder) == PACKAGE.parent / folder  # a checkout reads its own folders
        assert any(preset_dir(folder).glob("*.yaml"))
