"""Security of a shared study: what a writer of the study database puts there (trial and study
attributes, artifacts, checkpoints) must never run code on a worker that reads it, nor make the
worker read a file outside its own folders. ``SECURITY.md`` states the trust model.

Two kinds of test:

* a scan of the package source (``ast``, not text search) for calls that run code or unpickle
  (:data:`PATTERNS`); every use found must be in :data:`ALLOWED`, with its reason, and every entry
  of :data:`ALLOWED` must still be found, so the list cannot rot. The scanner is itself tested on
  small snippets, one for each pattern;
* behavioural tests: a pickle whose ``__reduce__`` would create a folder, fed to every reader of
  study artifacts, and artifact ids that name a file outside the artifact store. Python's audit
  hooks record every file opened and every global an unpickler looks up while they run.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jdsearch.core.errors import JDSearchError

PACKAGE = Path(__file__).resolve().parent.parent / "jdsearch"

# ====================================================================== the source scan
# Patterns, by what the scanner reports:
PATTERNS = """
pickle.load / pickle.loads / pickle.Unpickler (also _pickle, cloudpickle, pandas.read_pickle)
torch.load without weights_only=True; torch.load(weights_only=True) (tracked: must be listed)
torch.serialization.safe_globals / add_safe_globals (widen what weights_only=True accepts)
torch.jit.load (a TorchScript archive carries code)
eval, exec, __import__, importlib.__import__, __builtins__
yaml.load / yaml.load_all without SafeLoader (or BaseLoader); yaml.unsafe_load(_all),
    yaml.full_load(_all), yaml.Loader, yaml.FullLoader, yaml.UnsafeLoader and their C variants
marshal, shelve, dill (any import of them)
joblib.load; numpy.load with allow_pickle not False
subprocess.* with shell not False; subprocess.getoutput/getstatusoutput;
    asyncio.create_subprocess_shell; os.system, os.popen, os.exec*, os.spawn*
importlib.import_module on a non-constant name; runpy.*;
    importlib.util.spec_from_file_location; importlib.machinery.SourceFileLoader
getattr(<one of these modules>, <non-constant name>)
"""

_ALWAYS = {  # flagged wherever named (a call or a reference)
    *(f"{m}.{f}" for m in ("pickle", "_pickle", "cloudpickle") for f in ("load", "loads")),
    "pickle.Unpickler",
    "_pickle.Unpickler",
    "pandas.read_pickle",
    "torch.jit.load",
    "torch.serialization.safe_globals",
    "torch.serialization.add_safe_globals",
    "builtins.eval",
    "builtins.exec",
    "builtins.__import__",
    "importlib.__import__",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    *(f"yaml.{c}{k}" for c in ("", "C") for k in ("Loader", "FullLoader", "UnsafeLoader")),
    "joblib.load",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
    "os.system",
    "os.popen",
    "runpy.run_path",
    "runpy.run_module",
    "importlib.util.spec_from_file_location",
    "importlib.machinery.SourceFileLoader",
}
_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")  # os.execv, os.spawnl, ...
_MODULES = {"marshal", "shelve", "dill"}  # importing them at all is flagged
# Modules on which getattr with a computed name could reach any of the above.
_SENSITIVE = {
    *_MODULES,
    "pickle",
    "_pickle",
    "cloudpickle",
    "yaml",
    "builtins",
    "importlib",
    "os",
    "subprocess",
    "runpy",
    "joblib",
}
_BUILTINS = {"eval", "exec", "__import__", "getattr"}
_SAFE_YAML_LOADERS = {f"yaml.{c}{k}" for c in ("", "C") for k in ("SafeLoader", "BaseLoader")}
_SUBPROCESS_CALLS = {f"subprocess.{f}" for f in ("run", "call", "check_call", "check_output")}
_SUBPROCESS_CALLS.add("subprocess.Popen")


def _is_const(node: ast.AST | None, value: Any) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _keyword(call: ast.Call, name: str, position: int | None = None) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return None


def _has_star_kwargs(call: ast.Call) -> bool:
    return any(kw.arg is None for kw in call.keywords)


@dataclass(frozen=True)
class Finding:
    """One use of a pattern: where (module, enclosing function) and which."""

    module: str
    function: str  # dotted qualified name of the enclosing def/class, "<module>" at top level
    pattern: str
    line: int = field(compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.module, self.function, self.pattern)


class _Scanner(ast.NodeVisitor):
    def __init__(self, tree: ast.Module, module: str) -> None:
        self.module = module
        self.aliases = self._aliases(tree)
        self.scope: list[str] = []
        self.handled: set[int] = set()  # callee nodes already judged with their call
        self.findings: list[Finding] = []

    @staticmethod
    def _aliases(tree: ast.Module) -> dict[str, str]:
        """Local name → dotted name it was imported as (every scope at once: imports inside
        functions are common here and never rebind a name to something else)."""
        out: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        out[a.asname] = a.name
                    else:
                        root = a.name.split(".")[0]
                        out[root] = root
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                for a in node.names:
                    if a.name != "*":
                        out[a.asname or a.name] = f"{base}.{a.name}"
        return out

    def _add(self, node: ast.AST, pattern: str) -> None:
        where = ".".join(self.scope) or "<module>"
        self.findings.append(Finding(self.module, where, pattern, getattr(node, "lineno", 0)))

    def dotted(self, node: ast.AST) -> str | None:
        """The dotted name an expression stands for (``np.load`` → ``numpy.load``;
        ``getattr(torch, "load")`` → ``torch.load``), ``None`` when it is not a known name."""
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            return f"builtins.{node.id}" if node.id in _BUILTINS else None
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        if (
            isinstance(node, ast.Call)
            and self.dotted(node.func) == "builtins.getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            base = self.dotted(node.args[0])
            return None if base is None else f"{base}.{node.args[1].value}"
        return None

    # -------------------------------------------------------------- judging one name
    def _pattern(self, name: str, call: ast.Call | None) -> str | None:
        if name in _ALWAYS or name.startswith(_PREFIXES):
            return name
        conditional = {
            "torch.load": self._torch_load,
            "yaml.load": self._yaml_load,
            "yaml.load_all": self._yaml_load,
            "numpy.load": self._numpy_load,
            "importlib.import_module": self._import_module,
            **dict.fromkeys(_SUBPROCESS_CALLS, self._subprocess),
        }
        judge = conditional.get(name)
        if judge is None:
            return None
        if call is None:
            return f"{name} (not called here: its arguments cannot be checked)"
        return judge(name, call)

    @staticmethod
    def _torch_load(name: str, call: ast.Call) -> str:
        if _is_const(_keyword(call, "weights_only"), True):
            return "torch.load(weights_only=True)"
        return "torch.load without weights_only=True"

    def _yaml_load(self, name: str, call: ast.Call) -> str | None:
        loader = _keyword(call, "Loader", 1)
        if loader is not None and self.dotted(loader) in _SAFE_YAML_LOADERS:
            return None
        self.handled.add(id(loader))  # one finding for the call, not one more for its loader
        return f"{name} without SafeLoader"

    @staticmethod
    def _numpy_load(name: str, call: ast.Call) -> str | None:
        allow = _keyword(call, "allow_pickle", 2)
        if _has_star_kwargs(call) or (allow is not None and not _is_const(allow, False)):
            return "numpy.load(allow_pickle=True)"
        return None

    @staticmethod
    def _subprocess(name: str, call: ast.Call) -> str | None:
        shell = _keyword(call, "shell", 8)  # Popen's ninth positional parameter
        if _has_star_kwargs(call) or (shell is not None and not _is_const(shell, False)):
            return f"{name}(shell=True)"
        return None

    @staticmethod
    def _import_module(name: str, call: ast.Call) -> str | None:
        target = _keyword(call, "name", 0)
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            return None
        return "importlib.import_module(non-constant name)"

    # -------------------------------------------------------------- the walk
    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in _MODULES:
                self._add(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        root = (node.module or "").split(".")[0]
        if node.level == 0 and root in _MODULES:
            self._add(node, f"import {node.module}")
        elif (
            node.level == 0
            and any(a.name == "*" for a in node.names)
            and (root in _SENSITIVE or root in ("torch", "numpy", "pandas", "asyncio"))
        ):
            self._add(node, f"from {node.module} import *")

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node)  # getattr(module, "name") stands for module.name
        if name is not None and id(node) not in self.handled:
            self._judge(node, name, None)
        if self.dotted(node.func) == "builtins.getattr" and len(node.args) >= 2:
            target = self.dotted(node.args[0])
            literal = isinstance(node.args[1], ast.Constant)
            if not literal and target is not None and target.split(".")[0] in _SENSITIVE:
                self._add(node, f"getattr({target}, non-constant name)")
        callee = self.dotted(node.func)
        if callee is not None:
            self.handled.add(id(node.func))
            self._judge(node, callee, node)
        self.generic_visit(node)

    def _judge(self, node: ast.AST, name: str, call: ast.Call | None) -> None:
        pattern = self._pattern(name, call)
        if pattern is not None:
            self._add(node, pattern)

    def _reference(self, node: ast.Name | ast.Attribute) -> None:
        if id(node) in self.handled:
            return
        name = self.dotted(node)
        if name is not None and self._pattern(name, None) is not None:
            self._judge(node, name, None)
            return  # a longer name already judged: not its prefixes as well
        self.generic_visit(node)

    visit_Attribute = _reference

    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "__builtins__":
            self._add(node, "__builtins__")
        elif id(node) not in self.handled:
            self._reference(node)


def scan_source(source: str, module: str = "<snippet>") -> list[Finding]:
    """Every use of a :data:`PATTERNS` entry in ``source``."""
    tree = ast.parse(source)
    scanner = _Scanner(tree, module)
    scanner.visit(tree)
    return scanner.findings


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def scan_package() -> list[Finding]:
    """:func:`scan_source` over every module of the package."""
    out: list[Finding] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out += scan_source(path.read_text(encoding="utf-8"), _module_name(path))
    return out


# Every use the package may make of a pattern: (module, enclosing function, pattern, reason). One
# entry allows one use. A use of the package that reads from the study may be listed only with a
# reason that starts "KNOWN: to fix" (and a line in the report of whoever found it).
ALLOWED: list[tuple[str, str, str, str]] = [
    (
        "jdsearch.core.lazy",
        "lazy_exports",
        "importlib.import_module(non-constant name)",
        "the package's own __init__ passes its own name (a constant at every call site); no "
        "value read from a study, a file or the command line reaches it",
    ),
    (
        "jdsearch.core.lazy",
        "lazy_exports.__getattr__",
        "importlib.import_module(non-constant name)",
        "imports jdsearch.<pkg>.<module> where <module> is looked up in the package's constant "
        "export table; an unknown attribute name raises AttributeError before any import",
    ),
    (
        "jdsearch.models.torchvision_body",
        "_load",
        "torch.load(weights_only=True)",
        "`jdsearch import` and base.backbone_weights: the user's own torchvision torch.save file, "
        "read with weights_only=True after get_unsafe_globals_in_checkpoint refused any global "
        "outside SAFE_MODULE_CLASSES; study artifacts never reach it (they are safetensors)",
    ),
    (
        "jdsearch.models.torchvision_body",
        "_load",
        "torch.serialization.safe_globals",
        "widens weights_only=True to SAFE_MODULE_CLASSES only (torch/torchvision ResNet and "
        "Faster R-CNN v1 modules rebuilt from saved attributes, no code of the file runs), "
        "for the user's own file in `jdsearch import`",
    ),
    (
        "jdsearch.models.detectron2_files",
        "WeightsUnpickler",
        "pickle.Unpickler",
        "`jdsearch import --from detectron2`: the user's own model-zoo .pkl, through an unpickler "
        "whose find_class admits numpy arrays, dtypes and scalars and OrderedDict only; any other "
        "global raises before it is looked up (tests/test_detectron2.py: a __reduce__ payload is "
        "refused and never runs); study artifacts never reach it",
    ),
    (
        "jdsearch.store.detectron2_export",
        "load_in_detectron2",
        "torch.load(weights_only=True)",
        "`export --format detectron2` reads back the model_final.pth it has just written (a state "
        "dict of tensors) to check it in detectron2; weights_only=True admits tensors and plain "
        "containers only",
    ),
]


def compare(found: list[Finding], allowed: list[tuple[str, str, str, str]]) -> tuple[Any, Any]:
    """``(new, gone)``: uses not allowed, and allowed uses no longer found (multisets)."""
    have = Counter(f.key for f in found)
    want = Counter((m, f, p) for m, f, p, _ in allowed)
    return have - want, want - have


def test_the_package_makes_no_dangerous_call_beyond_the_allow_list() -> None:
    found = scan_package()
    new, gone = compare(found, ALLOWED)
    lines = [
        f"  NEW  jdsearch/{f.module.removeprefix('jdsearch.').replace('.', '/')}.py:{f.line} "
        f"in {f.function}: {f.pattern}"
        for f in found
        if f.key in new
    ]
    lines += [f"  GONE {m} in {fn}: {p} (remove it from ALLOWED)" for m, fn, p in gone]
    assert not new and not gone, "dangerous calls differ from ALLOWED:\n" + "\n".join(lines)


def test_every_allowed_use_gives_its_reason() -> None:
    for module, function, pattern, reason in ALLOWED:
        assert module.startswith("jdsearch") and function and pattern, (module, function)
        assert len(reason.split()) >= 8, f"{module}.{function} {pattern}: say why it is safe"
        if pattern == "torch.load without weights_only=True" or "shell=True" in pattern:
            assert reason.startswith("KNOWN: to fix"), f"{module}.{function}: never legitimate"


def test_the_comparison_fails_on_a_new_use_and_on_a_vanished_one() -> None:
    found = scan_source("import pickle\ndef f(b):\n    return pickle.loads(b)\n", "m")
    entry = ("m", "f", "pickle.loads", "a reason long enough to pass the reason check here")
    assert compare(found, [entry]) == (Counter(), Counter())
    assert compare(found, []) == (Counter({("m", "f", "pickle.loads"): 1}), Counter())
    assert compare([], [entry]) == (Counter(), Counter({("m", "f", "pickle.loads"): 1}))
    assert compare(found + found, [entry])[0] == Counter({("m", "f", "pickle.loads"): 1})


# (snippet, the one pattern it must be reported as)
CAUGHT = [
    ("import pickle\npickle.load(f)", "pickle.load"),
    ("import pickle\npickle.loads(b)", "pickle.loads"),
    ("import pickle\npickle.Unpickler(f).load()", "pickle.Unpickler"),
    ("import pickle as p\nclass U(p.Unpickler): pass", "pickle.Unpickler"),
    ("from pickle import loads as q\nq(b)", "pickle.loads"),
    ("import _pickle\n_pickle.loads(b)", "_pickle.loads"),
    ("import cloudpickle\ncloudpickle.load(f)", "cloudpickle.load"),
    ("import pandas as pd\npd.read_pickle(p)", "pandas.read_pickle"),
    ("import pickle\nf = pickle.loads", "pickle.loads"),
    ("import pickle\ngetattr(pickle, 'loads')(b)", "pickle.loads"),
    ("import pickle\ngetattr(pickle, name)(b)", "getattr(pickle, non-constant name)"),
    ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=w)", "torch.load without weights_only=True"),
    ("from torch import load\nload(p, map_location='cpu')", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=True)", "torch.load(weights_only=True)"),
    (
        "import torch\nload = torch.load",
        "torch.load (not called here: its arguments cannot be checked)",
    ),
    ("import torch\ntorch.jit.load(p)", "torch.jit.load"),
    (
        "import torch\ntorch.serialization.add_safe_globals([X])",
        "torch.serialization.add_safe_globals",
    ),
    (
        "import torch\nwith torch.serialization.safe_globals([X]): pass",
        "torch.serialization.safe_globals",
    ),
    ("eval(s)", "builtins.eval"),
    ("exec(s)", "builtins.exec"),
    ("import builtins\nbuiltins.eval(s)", "builtins.eval"),
    ("f = eval", "builtins.eval"),
    ("__import__(name)", "builtins.__import__"),
    ("import importlib\nimportlib.__import__(name)", "importlib.__import__"),
    ("__builtins__['eval'](s)", "__builtins__"),
    ("import yaml\nyaml.load(s)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load(s, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load(s, yaml.FullLoader)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load_all(s, Loader=L)", "yaml.load_all without SafeLoader"),
    ("import yaml\nyaml.unsafe_load(s)", "yaml.unsafe_load"),
    ("import yaml\nyaml.unsafe_load_all(s)", "yaml.unsafe_load_all"),
    ("import yaml\nyaml.full_load(s)", "yaml.full_load"),
    ("import yaml\nL = yaml.Loader", "yaml.Loader"),
    ("from yaml import FullLoader", None),  # importing the name is fine; using it is not
    ("from yaml import FullLoader\nL = FullLoader", "yaml.FullLoader"),
    ("import yaml\nL = yaml.UnsafeLoader", "yaml.UnsafeLoader"),
    ("import yaml\nL = yaml.CLoader", "yaml.CLoader"),
    ("import marshal\nmarshal.loads(b)", "import marshal"),
    ("from marshal import loads", "import marshal"),
    ("import shelve\nshelve.open(p)", "import shelve"),
    ("import dill", "import dill"),
    ("import joblib\njoblib.load(p)", "joblib.load"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "numpy.load(allow_pickle=True)"),
    ("import numpy\nnumpy.load(p, None, True)", "numpy.load(allow_pickle=True)"),
    ("import numpy as np\nnp.load(p, **kw)", "numpy.load(allow_pickle=True)"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)", "subprocess.run(shell=True)"),
    ("import subprocess as sp\nsp.Popen(cmd, shell=flag)", "subprocess.Popen(shell=True)"),
    (
        "import subprocess\nsubprocess.check_output(c, shell=1)",
        "subprocess.check_output(shell=True)",
    ),
    ("from subprocess import call\ncall(c, shell=True)", "subprocess.call(shell=True)"),
    ("import subprocess\nsubprocess.getoutput(c)", "subprocess.getoutput"),
    ("import asyncio\nasyncio.create_subprocess_shell(c)", "asyncio.create_subprocess_shell"),
    ("import os\nos.system(c)", "os.system"),
    ("import os\nos.popen(c)", "os.popen"),
    ("import os\nos.execv(p, a)", "os.execv"),
    ("from os import spawnl\nspawnl(m, p)", "os.spawnl"),
    ("import os\ngetattr(os, name)(c)", "getattr(os, non-constant name)"),
    (
        "import importlib\nimportlib.import_module(name)",
        "importlib.import_module(non-constant name)",
    ),
    (
        "from importlib import import_module\nimport_module(f'jdsearch.{m}')",
        "importlib.import_module(non-constant name)",
    ),
    ("import runpy\nrunpy.run_path(p)", "runpy.run_path"),
    (
        "import importlib.util\nimportlib.util.spec_from_file_location(n, p)",
        "importlib.util.spec_from_file_location",
    ),
    ("from pickle import *", "from pickle import *"),
]


@pytest.mark.parametrize(("source", "pattern"), CAUGHT, ids=[s for s, _ in CAUGHT])
def test_the_scanner_catches_each_pattern(source: str, pattern: str | None) -> None:
    got = [f.pattern for f in scan_source(source)]
    assert got == ([] if pattern is None else [pattern])


SAFE = [
    "import yaml\nyaml.safe_load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(s, yaml.CSafeLoader)",
    "import yaml\nyaml.safe_dump(d)",
    "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "import json\njson.loads(s)",
    "model.eval()\nconn.execute(q)\ncursor.exec_driver_sql(q)\nstore.load(x)",
    "def cmd_eval(args): pass",
    "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)",
    "import subprocess\nsubprocess.run(['git', 'status'], check=True, shell=False)",
    "import importlib\nimportlib.import_module('jdsearch.cli')",
    "import torch\ntorch.save(x, p)\ntorch.serialization.get_unsafe_globals_in_checkpoint(p)",
    "import os\nos.path.join(a, b)\nos.environ.get('X')",
    "from safetensors.torch import load\nload(b)",
    "getattr(obj, name)",
]


@pytest.mark.parametrize("source", SAFE)
def test_the_scanner_passes_safe_code(source: str) -> None:
    assert scan_source(source) == []


def test_a_finding_names_its_enclosing_function() -> None:
    src = "import torch\nclass C:\n    def m(self):\n        def inner():\n            torch.load(p)\n"
    (f,) = scan_source(src, "jdsearch.x")
    assert (f.module, f.function, f.line) == ("jdsearch.x", "C.m.inner", 5)
    (top,) = scan_source("eval('1')", "jdsearch.y")
    assert top.key == ("jdsearch.y", "<module>", "builtins.eval")


# ====================================================================== behaviour
_RECORDING: list[tuple[str, tuple[Any, ...]]] | None = None
_HOOKED = False
_EVENTS = {"open", "pickle.find_class", "os.mkdir", "os.system", "subprocess.Popen"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING is not None and event in _EVENTS:
        _RECORDING.append((event, args))


@contextlib.contextmanager
def watched() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record the files opened, the globals unpickled and the processes and folders made while
    the block runs (an audit hook cannot be removed: it is installed once and idles after)."""
    global _RECORDING, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _RECORDING = events = []
    try:
        yield events
    finally:
        _RECORDING = None


def opened(events: list[tuple[str, tuple[Any, ...]]]) -> list[Path]:
    out = []
    for event, args in events:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            out.append(Path(os.fsdecode(args[0])).absolute())
    return out


def unpickled(events: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    return [args for event, args in events if event == "pickle.find_class"]


class _Payload:
    """Unpickled, it makes the folder ``marker`` (a stand-in for any code the writer chose)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_the_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The payload below is live: unpickling it is what the readers must never do."""
    marker = tmp_path / "ran"
    with watched() as events:
        pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.is_dir()
    assert unpickled(events), "the audit hook sees an unpickler's global look-ups"


def _one_line_refusal(read: Callable[[], Any], marker: Path) -> JDSearchError:
    with watched() as events, pytest.raises(JDSearchError) as info:
        read()
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the payload ran"
    assert not unpickled(events), f"something unpickled: {unpickled(events)}"
    return info.value


@dataclass
class SharedStudy:
    """A SQLite study and an artifact store; its trials carry whatever ``checkpoint`` attr a
    writer of the database chose."""

    url: str
    store: Any
    study: Any

    def trial_with_checkpoint(self, artifact_id: Any) -> Any:
        import optuna

        self.study.add_trial(
            optuna.trial.create_trial(value=1.0, user_attrs={"checkpoint": artifact_id})
        )
        return self.study.get_trials()[-1]

    def handle(self) -> Any:
        from jdsearch.search.queries import StudyHandle

        return StudyHandle(self.study, None, self.store, self.url)  # type: ignore[arg-type]

    def context(self, base_artifact: str) -> Any:
        from jdsearch.search.objective import SearchContext
        from jdsearch.search.strategies import HillClimb, HScore, NoKD

        return SearchContext(
            spec=SimpleNamespace(device="cpu"),  # type: ignore[arg-type]
            store=self.store,
            train_set=None,  # type: ignore[arg-type]
            val_set=None,  # type: ignore[arg-type]
            pool=None,  # type: ignore[arg-type]
            base_artifact=base_artifact,
            base_resolution=None,  # type: ignore[arg-type]
            base_flops=0,
            strategy=HillClimb(),
            kd=NoKD(),
            score=HScore(),
        )


@pytest.fixture
def db_study(tmp_path: Path) -> Iterator[SharedStudy]:
    import optuna

    from jdsearch.storage.artifacts import SQLArtifactStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = SQLArtifactStore(url)
    study = optuna.create_study(study_name="shared", storage=url, direction="maximize")
    yield SharedStudy(url, store, study)
    store.close()


def _readers(data: bytes, db_study: SharedStudy) -> dict[str, Callable[[], Any]]:
    from jdsearch.methods.pool import pool_from_bytes
    from jdsearch.store.checkpoint import checkpoint_from_bytes, read_checkpoint_metadata

    db_study.store.write("evil", io.BytesIO(data))
    trial = db_study.trial_with_checkpoint("evil")
    return {
        "checkpoint_from_bytes": lambda: checkpoint_from_bytes(data),
        "read_checkpoint_metadata": lambda: read_checkpoint_metadata(data),
        "pool_from_bytes": lambda: pool_from_bytes(data),
        # export, report, compare: a trial's checkpoint artifact
        "StudyHandle.checkpoint": lambda: db_study.handle().checkpoint(trial),
        # a worker: the base detector or a parent's checkpoint
        "SearchContext.download": lambda: db_study.context("evil").download("evil", "parent"),
    }


READERS = [
    "checkpoint_from_bytes",
    "read_checkpoint_metadata",
    "pool_from_bytes",
    "StudyHandle.checkpoint",
    "SearchContext.download",
]


@pytest.mark.parametrize("reader", READERS)
def test_a_pickle_in_the_study_is_refused_and_never_runs(
    reader: str, tmp_path: Path, db_study: SharedStudy
) -> None:
    marker = tmp_path / "ran"
    data = pickle.dumps(_Payload(marker))
    _one_line_refusal(_readers(data, db_study)[reader], marker)


@pytest.mark.parametrize("reader", READERS)
def test_a_torch_save_pickle_in_the_study_is_refused_and_never_runs(
    reader: str, tmp_path: Path, db_study: SharedStudy
) -> None:
    import torch

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)  # the zip format torch.load reads
    _one_line_refusal(_readers(buf.getvalue(), db_study)[reader], marker)


def test_a_weights_file_with_a_payload_is_refused_by_import(tmp_path: Path) -> None:
    """``jdsearch import`` / ``base.backbone_weights``: the one place that reads a pickle (the
    user's own file) refuses a global outside its allow-list before torch.load runs."""
    import torch

    from jdsearch.models.torchvision_body import read_weights_file

    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    torch.save({"model": _Payload(marker)}, path)
    error = _one_line_refusal(lambda: read_weights_file(path), marker)
    assert "mkdir" in str(error), "refused for naming the payload's function"


# Artifact ids a writer of the study may put in a trial's `checkpoint` attr, naming a file outside
# the artifact folder (tmp/artifacts) or the machine's.
OUTSIDE_IDS = [
    "../outside/secret.safetensors",
    "{secret}",  # its absolute path
    "../../../../../../../../../../etc/passwd",
    "/etc/passwd",
]


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the study")
    return secret


def _never_opened(events: list[tuple[str, tuple[Any, ...]]], secret: Path) -> None:
    files = opened(events)
    assert secret not in files and Path("/etc/passwd") not in files, files


@pytest.mark.parametrize("artifact_id", [*OUTSIDE_IDS, 5, ["x"], ""])
def test_an_artifact_id_in_the_db_store_is_a_key_never_a_path(
    artifact_id: Any, tmp_path: Path, db_study: SharedStudy
) -> None:
    secret = _secret(tmp_path)
    if isinstance(artifact_id, str):
        artifact_id = artifact_id.format(secret=secret)
    trial = db_study.trial_with_checkpoint(artifact_id)
    with watched() as events, pytest.raises(JDSearchError) as info:
        db_study.handle().checkpoint(trial)
    assert "\n" not in str(info.value)
    _never_opened(events, secret)


@pytest.fixture
def file_store(tmp_path: Path, db_study: SharedStudy) -> SharedStudy:
    from jdsearch.storage.artifacts import make_artifact_store

    store = make_artifact_store(f"file:{tmp_path / 'artifacts'}", db_study.url)
    return SharedStudy(db_study.url, store, db_study.study)


@pytest.mark.parametrize("reader", ["StudyHandle.checkpoint", "SearchContext.download"])
@pytest.mark.parametrize("artifact_id", OUTSIDE_IDS)
def test_an_artifact_id_never_leaves_the_file_store_folder(
    artifact_id: str, reader: str, tmp_path: Path, file_store: SharedStudy
) -> None:
    """``search.artifacts: file:DIR``: optuna's FileSystemArtifactStore refuses an id that is
    absolute or escapes DIR before it opens anything; jdsearch refuses it before the store sees
    it (``check_artifact_id``)."""
    secret = _secret(tmp_path)
    artifact_id = artifact_id.format(secret=secret)
    trial = file_store.trial_with_checkpoint(artifact_id)
    with watched() as events, pytest.raises(JDSearchError):
        if reader == "StudyHandle.checkpoint":
            file_store.handle().checkpoint(trial)
        else:
            file_store.context(artifact_id).download(artifact_id, "parent")
    _never_opened(events, secret)


def test_an_escaping_artifact_id_in_the_file_store_is_one_line(
    tmp_path: Path, file_store: SharedStudy
) -> None:
    trial = file_store.trial_with_checkpoint("../outside/secret.safetensors")
    with pytest.raises(JDSearchError) as info:
        file_store.handle().checkpoint(trial)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_stored_spec_cannot_make_a_worker_upload_a_file_outside_its_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from jdsearch.data import synth
    from jdsearch.search.queries import open_study
    from jdsearch.search.record import POOL_ATTR, SPEC_SYSATTR
    from jdsearch.search.session import prepare
    from jdsearch.spec.study import load_study
    from jdsearch.storage.artifacts import SQLArtifactStore
    from jdsearch.storage.optuna_internals import set_study_system_attr

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = tmp_path / "worker"
    work.mkdir()
    monkeypatch.chdir(work)
    secret = _secret(tmp_path)
    spec = load_study(PACKAGE.parent / "studies" / "quickstart.yaml").to_dict()
    spec["data"] = {"dir": str(work / "data"), "synth": {"images": 4, "seed": 0, "size": 32}}
    spec["base"]["checkpoint"] = str(secret)  # what the writer of the database sets
    url = f"sqlite:///{work / 'study.db'}"
    study = optuna.create_study(study_name="quickstart", storage=url, direction="maximize")
    set_study_system_attr(study, SPEC_SYSATTR, spec)
    study.set_user_attr(POOL_ATTR, "no-such-artifact")  # no pool training: stop after the base
    synth.generate(work / "data", images=4, seed=0, size=32)  # the data is here: it gets that far
    handle = open_study(url)  # what `jdsearch noise` and `jdsearch finetune` do
    with watched() as events, pytest.raises(JDSearchError, match="holds no base detector yet"):
        prepare(handle.spec, url, progress=False, stored=True)
    store = SQLArtifactStore(url)
    uploaded = [store.open_reader(i).read() for i in store.list_ids()]
    store.close()
    assert secret.read_bytes() not in uploaded, "a file outside the worker was uploaded"
    assert secret not in opened(events)
