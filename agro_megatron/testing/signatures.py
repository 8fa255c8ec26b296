"""Signature checks for the calls into megatron-core and vLLM that CPU CI never runs.

The GPU path calls megatron-core (and TransformerEngine through megatron-core's spec functions)
and vLLM in branches that CPU tests do not take (`if use_te:`, `if gpu:`, sleep mode, ...). A wrong
keyword there only crashes on a cluster. This module reads the package's source (AST, no
execution), finds every call whose callee resolves to an object of `megatron.core.*` or `vllm.*`,
and binds the call's positional count and keyword names with `inspect.signature(...).bind` against
the installed version.

What it resolves: module-level and function-local imports (aliases included),
`x = importlib.import_module("...")`, helpers that return an imported module
(`vllm = _import_vllm()`), calls of a factory's result (`get_forward_backward_func()(...)`: the
callables the factory's own source can return), and `**name` spreads of a dict built in the same
function from `dict(...)` / `{...}` and extended with `.update(...)` / `name["k"] = ...`. Keys it
cannot see (`kwargs.update(overrides)`, `**overrides`) are reported as unchecked, not guessed.
Callees that pass `**kwargs` on (vllm.LLM -> EngineArgs) are listed in FORWARDS and checked there.
Method calls on a vLLM `LLM` object are found through RECEIVERS (the AST cannot see the type);
each method listed in RECEIVER_METHODS must occur, so the table cannot drift silently.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field

PREFIXES = ("megatron.core.", "vllm.")
# receiver expressions (per file) whose type is known although the AST cannot see it
RECEIVERS = {"agro_megatron/rollout/vllm_engine.py": {"llm": "vllm.LLM", "self.llm": "vllm.LLM"}}
RECEIVER_METHODS = {"vllm.LLM": ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache", "generate")}
# `llm.collective_rpc("name", args=..., kwargs=...)` runs `worker.name(*args, **kwargs)` on these
RPC_WORKERS = ("vllm.v1.worker.gpu_worker.Worker", "vllm.v1.worker.cpu_worker.CPUWorker")
# callables whose extra *args / **kwargs go on to other callables (module.qualname -> targets);
# a forwarder whose source no longer calls its target by name is a finding
FORWARDS = {
    "vllm.entrypoints.llm.LLM": ("vllm.engine.arg_utils.EngineArgs",),
    "vllm.v1.worker.gpu_worker.Worker.reload_weights": (  # -> self.model_runner.reload_weights
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.reload_weights",
        "vllm.v1.worker.gpu.model_runner.GPUModelRunner.reload_weights",
        "vllm.v1.worker.cpu_model_runner.CPUModelRunner.reload_weights",
        "vllm.v1.worker.cpu.model_runner.CPUModelRunner.reload_weights",
    ),
}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    callee: str
    problem: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.callee}: {self.problem}"


@dataclass(frozen=True)
class CheckedCall:
    file: str
    line: int
    callee: str
    npos: int
    keywords: tuple


@dataclass
class ScanResult:
    findings: list = field(default_factory=list)    # calls that do not bind: bugs
    checked: list = field(default_factory=list)     # CheckedCall, one per bound call (and target)
    unchecked: list = field(default_factory=list)   # Finding-shaped notes: arguments not verified
    unresolved: list = field(default_factory=list)  # calls into the libraries with no signature
    skipped: list = field(default_factory=list)     # library not importable in this environment

    def extend(self, other: "ScanResult") -> None:
        for k in ("findings", "checked", "unchecked", "unresolved", "skipped"):
            getattr(self, k).extend(getattr(other, k))


class _Unresolvable(Exception):
    pass


class _NotInstalled(Exception):
    pass


def _in_scope(path: str) -> bool:
    return any(path.startswith(p) for p in PREFIXES) or path == "vllm"


def _lookup(path: str):
    """(object, owner, instance) for a dotted path, importing submodules as needed. A module global
    that is None until runtime (`_WORLD: GroupCoordinator | None = None`) stands for an instance of
    its annotated class: `instance` then says that the object is reached through an instance."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError as e:
        raise _NotInstalled(f"{parts[0]} is not importable: {e}") from e
    owner, prefix, instance, stands_for_instance = None, parts[0], False, False
    for part in parts[1:]:
        prefix = f"{prefix}.{part}"
        owner, instance, stands_for_instance = obj, stands_for_instance, False
        if inspect.ismodule(obj) and not hasattr(obj, part):
            try:
                obj = importlib.import_module(prefix)
                continue
            except ImportError:
                pass
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise _Unresolvable(f"{prefix} does not exist ({type(owner).__name__} has no {part!r})") from e
        if obj is None and inspect.ismodule(owner) and part in getattr(owner, "__annotations__", {}):
            obj, stands_for_instance = _annotated_class(owner, part), True
    return obj, owner, instance


def _annotated_class(module, name):
    ann = module.__annotations__[name]
    try:
        ann = eval(ann, vars(module)) if isinstance(ann, str) else ann
    except Exception as e:
        raise _Unresolvable(f"cannot evaluate the annotation of {module.__name__}.{name}: {e}") from e
    classes = [a for a in (typing.get_args(ann) or (ann,)) if inspect.isclass(a) and a is not type(None)]
    if len(classes) != 1:
        raise _Unresolvable(f"{module.__name__}.{name} is None at import and annotated {ann!r}")
    return classes[0]


def _signature(obj, owner=None, instance: bool = False) -> inspect.Signature:
    """inspect.signature; with `instance`, an unbound method's `self` is dropped."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError) as e:
        raise _Unresolvable(f"no signature: {e}") from e
    if instance and inspect.isclass(owner):
        raw = inspect.getattr_static(owner, obj.__name__, None)
        if raw is not None and not isinstance(raw, (staticmethod, classmethod)):
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _returned_callables(fn) -> list:
    """The module-level callables a factory can return, read from its source (`return x`, with
    `x = a` / `x = b` assignments before it)."""
    fn = inspect.unwrap(fn)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError) as e:
        raise _Unresolvable(f"cannot read the source of {_qualname(fn)}: {e}") from e
    returned = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
    names = set(returned)
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name):
            if any(isinstance(t, ast.Name) and t.id in returned for t in n.targets):
                names.add(n.value.id)
    out = [fn.__globals__[n] for n in sorted(names) if callable(fn.__globals__.get(n))]
    if not out:
        raise _Unresolvable(f"cannot tell what {_qualname(fn)} returns")
    return out


# -- per-function facts ------------------------------------------------------------------------
def _own_nodes(node):
    """Nodes of a scope's own body: nested functions and classes are yielded, not entered."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(n))


def _import_aliases(nodes) -> dict:
    out = {}
    for n in nodes:
        if isinstance(n, ast.Import):
            for a in n.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            for a in n.names:
                out[a.asname or a.name] = f"{n.module}.{a.name}"
    return out


class _Scope:
    def __init__(self, node, parent: dict, helpers: dict):
        nodes = list(_own_nodes(node))
        self.aliases = dict(parent)  # name -> dotted path, or ("returns", path)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for p in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                self.aliases.pop(p.arg, None)
        self.aliases.update(_import_aliases(nodes))
        self.dicts: dict = {}  # name -> (set of keys, [descriptions of what else may be in it])
        bound, shadowed = {}, set()
        for n in nodes:
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        v = self._assigned(n.value, helpers)
                        if v:
                            bound[t.id] = v
                        else:
                            shadowed.add(t.id)
                        self._dict_assign(t.id, n.value)
                    elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                        k = t.slice
                        d = self.dicts.setdefault(t.value.id, (set(), []))
                        if isinstance(k, ast.Constant) and isinstance(k.value, str):
                            d[0].add(k.value)
                        else:
                            d[1].append(f"{t.value.id}[{ast.unparse(k)}] = ...")
            elif isinstance(n, (ast.AnnAssign, ast.AugAssign, ast.For, ast.With, ast.NamedExpr)):
                for t in ast.walk(getattr(n, "target", None) or ast.Pass()):
                    if isinstance(t, ast.Name):
                        shadowed.add(t.id)
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update"
                  and isinstance(n.func.value, ast.Name)):
                keys, open_ = _literal_keys(n)
                d = self.dicts.setdefault(n.func.value.id, (set(), []))
                d[0].update(keys)
                d[1].extend(f"{n.func.value.id}.update({o})" for o in open_)
        for name in shadowed - set(bound):
            self.aliases.pop(name, None)
        self.aliases.update(bound)

    def _assigned(self, value, helpers):
        if not isinstance(value, ast.Call):
            return None
        f = _path(value.func, self.aliases)
        if f == "importlib.import_module" and value.args and isinstance(value.args[0], ast.Constant):
            return value.args[0].value
        if isinstance(value.func, ast.Name) and value.func.id in helpers:
            return helpers[value.func.id]
        if isinstance(f, str) and _in_scope(f):
            return ("returns", f)
        return None

    def _dict_assign(self, name, value):
        if _is_dict_literal(value):
            keys, open_ = _literal_keys(value)
            d = self.dicts.setdefault(name, (set(), []))
            d[0].update(keys)
            d[1].extend(open_)
        else:
            self.dicts.setdefault(name, (set(), []))[1].append(f"{name} = {ast.unparse(value)[:60]}")

    def spread(self, expr):
        """(keys, open) of a `**expr` spread."""
        if _is_dict_literal(expr):
            return _literal_keys(expr)
        if isinstance(expr, ast.Name) and expr.id in self.dicts:
            keys, open_ = self.dicts[expr.id]
            return set(keys), list(open_)
        return set(), [f"**{ast.unparse(expr)}"]


def _is_dict_literal(e) -> bool:
    return isinstance(e, ast.Dict) or (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "dict")


def _literal_keys(node):
    """Keys of `{...}`, `dict(...)` or `x.update(...)`; what cannot be read goes to `open`."""
    keys, open_ = set(), []
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if k is None:
                open_.append(f"**{ast.unparse(v)}")
            elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                keys.add(k.value)
            else:
                open_.append(f"key {ast.unparse(k)}")
        return keys, open_
    for a in node.args:
        if _is_dict_literal(a):
            k, o = _literal_keys(a)
            keys |= k
            open_ += o
        else:
            open_.append(ast.unparse(a))
    for kw in node.keywords:
        if kw.arg:
            keys.add(kw.arg)
        else:
            open_.append(f"**{ast.unparse(kw.value)}")
    return keys, open_


def _path(expr, aliases):
    if isinstance(expr, ast.Name):
        return aliases.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _path(expr.value, aliases)
        return f"{base}.{expr.attr}" if isinstance(base, str) else None
    return None


# -- binding ----------------------------------------------------------------------------------
def _bind(sig, npos: int, keywords, partial: bool):
    """The BoundArguments, or the TypeError's message."""
    try:
        return (sig.bind_partial if partial else sig.bind)(*[None] * npos, **{k: None for k in keywords})
    except TypeError as e:
        return str(e)


def _extras(sig, ba):
    """(n positional, keyword names) that landed in the callee's *args / **kwargs."""
    npos, kws = 0, ()
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            npos = len(ba.arguments.get(p.name, ()))
        elif p.kind is p.VAR_KEYWORD:
            kws = tuple(ba.arguments.get(p.name, {}))
    return npos, kws


class _Checker:
    def __init__(self, file: str, result: ScanResult):
        self.file, self.r = file, result

    def note(self, bucket, line, callee, problem):
        getattr(self.r, bucket).append(Finding(self.file, line, callee, problem))

    def check(self, line, label, obj, owner, npos, keywords, open_, instance=False, forwarded=False):
        """Bind one call; follow FORWARDS for what lands in *args / **kwargs."""
        try:
            sig = _signature(obj, owner, instance)
        except _Unresolvable as e:
            self.note("unresolved", line, label, str(e))
            return
        ba = _bind(sig, npos, keywords, partial=bool(open_))
        if isinstance(ba, str):
            self.note("findings", line, label, ba)
            return
        self.r.checked.append(CheckedCall(self.file, line, label, npos, tuple(sorted(keywords))))
        if open_ and not forwarded:
            self.note("unchecked", line, label, "arguments not checked: " + ", ".join(open_))
        xpos, xkw = _extras(sig, ba)
        if not (xpos or xkw or open_):
            return
        key = _qualname(obj)
        if key not in FORWARDS:
            if xpos or xkw:
                self.note("unchecked", line, label, f"go to the callee's *args/**kwargs unchecked: "
                          f"{xpos} positional, keywords {sorted(xkw)}")
            return
        try:
            source = inspect.getsource(obj.__init__ if inspect.isclass(obj) else obj)
        except (OSError, TypeError):
            source = ""
        for target in FORWARDS[key]:
            tlabel = f"{label} -> {target}"
            try:
                tobj, towner, _ = _lookup(target)
            except (_Unresolvable, _NotInstalled) as e:
                self.note("findings", line, tlabel, f"forward target missing: {e}")
                continue
            if f"{tobj.__name__}(" not in source:
                self.note("findings", line, tlabel, f"{key} no longer calls {tobj.__name__}(): FORWARDS is stale")
            self.check(line, tlabel, tobj, towner, xpos, xkw, open_, instance=True, forwarded=True)


def _helpers(tree) -> dict:
    """Module-level functions that return an imported module: name -> dotted path."""
    module_aliases = _import_aliases(_own_nodes(tree))
    out = {}
    for fn in tree.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            aliases = _Scope(fn, module_aliases, {}).aliases
            rets = [n.value for n in _own_nodes(fn) if isinstance(n, ast.Return)]
            paths = {aliases.get(r.id) if isinstance(r, ast.Name) else None for r in rets}
            if len(paths) == 1 and isinstance(next(iter(paths)), str):
                out[fn.name] = paths.pop()
    return out


def scan_source(source: str, file: str, receivers: dict | None = None) -> ScanResult:
    """Check every megatron-core / vLLM call in one module's source (`file` names it in reports)."""
    tree = ast.parse(source, filename=file)
    r = ScanResult()
    ck = _Checker(file, r)
    helpers = _helpers(tree)
    receivers = RECEIVERS.get(file.replace(os.sep, "/"), {}) if receivers is None else receivers
    seen_methods: dict = {}

    def visit(node, parent_aliases):
        scope = _Scope(node, parent_aliases, helpers)
        for n in _own_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(n, scope.aliases)
            elif isinstance(n, ast.Call):
                call(n, scope)

    def call(n, scope):
        f = n.func
        if isinstance(f, ast.Attribute) and ast.unparse(f.value) in receivers:
            cls = receivers[ast.unparse(f.value)]
            seen_methods.setdefault(cls, set()).add(f.attr)
            target = ("method", f"{cls}.{f.attr}")
        elif isinstance(f, ast.Call) and isinstance(_path(f.func, scope.aliases), str):
            target = ("returns", _path(f.func, scope.aliases))
        else:
            p = _path(f, scope.aliases)
            target = p if isinstance(p, tuple) else ("path", p)
        kind, path = target
        if not isinstance(path, str) or not _in_scope(path):
            return
        npos, keywords, open_ = 0, [], []
        for a in n.args:
            if isinstance(a, ast.Starred):
                open_.append(f"*{ast.unparse(a.value)}")
            else:
                npos += 1
        explicit = [kw.arg for kw in n.keywords if kw.arg]
        keywords += explicit
        for kw in n.keywords:
            if kw.arg is None:
                keys, o = scope.spread(kw.value)
                dup = keys & set(explicit)
                if dup:
                    ck.note("findings", n.lineno, path, f"keyword(s) {sorted(dup)} given explicitly and "
                            f"in **{ast.unparse(kw.value)}: TypeError at call time")
                keywords += sorted(keys - set(explicit))
                open_ += o
        try:
            obj, owner, via_instance = _lookup(path)
            if kind == "returns":
                if inspect.isclass(obj):
                    raise _Unresolvable(f"calls an instance of {path}")
                for fn in _returned_callables(obj):
                    ck.check(n.lineno, f"{path}() -> {fn.__name__}", fn, None, npos, keywords, open_)
                return
            ck.check(n.lineno, path, obj, owner, npos, keywords, open_, instance=kind == "method" or via_instance)
        except _NotInstalled as e:
            ck.note("skipped", n.lineno, path, str(e))
            return
        except _Unresolvable as e:
            ck.note("unresolved", n.lineno, path, str(e))
            return
        if kind == "method" and f.attr == "collective_rpc":
            rpc(n, scope)

    def rpc(n, scope):
        """llm.collective_rpc("method", args=(...), kwargs={...}) -> worker.method(*args, **kwargs)."""
        method = n.args[0] if n.args else next((k.value for k in n.keywords if k.arg == "method"), None)
        if not (isinstance(method, ast.Constant) and isinstance(method.value, str)):
            ck.note("unchecked", n.lineno, "collective_rpc", f"method {ast.unparse(method) if method else '?'}")
            return
        given = {k.arg: k.value for k in n.keywords if k.arg in ("args", "kwargs")}
        npos, keywords, open_ = 0, [], []
        if len(n.args) > 2:
            given.setdefault("args", n.args[2])
        if len(n.args) > 3:
            given.setdefault("kwargs", n.args[3])
        if "args" in given:
            if isinstance(given["args"], (ast.Tuple, ast.List)):
                npos = len(given["args"].elts)
            else:
                open_.append(f"args={ast.unparse(given['args'])}")
        if "kwargs" in given:
            keys, o = scope.spread(given["kwargs"])
            keywords, open_ = sorted(keys), open_ + o
        for worker in RPC_WORKERS:
            path = f"{worker}.{method.value}"
            try:
                obj, owner, _ = _lookup(path)
            except _NotInstalled as e:
                ck.note("skipped", n.lineno, path, str(e))
                continue
            except _Unresolvable as e:
                ck.note("findings", n.lineno, path, f"collective_rpc target: {e}")
                continue
            ck.check(n.lineno, path, obj, owner, npos, keywords, open_, instance=True)

    visit(tree, {})
    for cls in set(receivers.values()):
        for m in RECEIVER_METHODS.get(cls, ()):
            if m not in seen_methods.get(cls, set()):
                ck.note("findings", 0, f"{cls}.{m}", f"RECEIVER_METHODS lists {m} but {file} never calls it "
                        f"on {sorted(k for k, v in receivers.items() if v == cls)}: the table is stale")
    for k in ("findings", "checked", "unchecked", "unresolved", "skipped"):
        getattr(r, k).sort(key=lambda x: (x.line, x.callee))
    return r


def package_files(root: str | None = None) -> list:
    """agro_megatron/**/*.py except agro_megatron/testing/, relative to the repository root."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = root or os.path.dirname(pkg)
    out = []
    for d, dirs, files in os.walk(os.path.join(root, "agro_megatron")):
        rel = os.path.relpath(d, root).replace(os.sep, "/")
        if rel == "agro_megatron/testing" or rel.startswith("agro_megatron/testing/"):
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        out += [f"{rel}/{f}" for f in sorted(files) if f.endswith(".py")]
    return out


def scan(root: str | None = None) -> ScanResult:
    """Scan the package (see package_files); `result.findings` are calls that do not bind."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = root or os.path.dirname(pkg)
    result = ScanResult()
    for rel in package_files(root):
        with open(os.path.join(root, rel)) as f:
            result.extend(scan_source(f.read(), rel))
    return result
