"""The package is a one-way house (docs/ARCHITECTURE.md): no import circles (not even through
function-level imports), no import of a higher layer, every module placed in a layer, every
function-level import listed with its reason, no function over 60 lines (Triton kernel
bodies excepted, with a comment saying why), and no module reaching into another's private names.

The code is read, not imported (``ast``): a module's imports are those outside any function
(module level, including ``if``/``try`` blocks and class bodies) and those inside one (function
level). Importing a module also runs its parent packages' ``__init__``; that is not counted.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SOURCES = {"encore_fast": ROOT / "encore_fast", "encore_fast.kernels": ROOT / "kernels"}
MAX_LINES = 60

# The layers of docs/ARCHITECTURE.md (the test checks that the page says the same). A name
# ending in ".*" is a package and all its modules; an exact name wins over a package pattern.
# Layer 7 is ordered inside: cli_common < eval.cli < cli < __main__.
LAYERS: dict[str, float] = {
    "encore_fast.errors": 0, "encore_fast.io": 0, "encore_fast.paths": 0, "encore_fast.data": 0,
    "encore_fast.machine": 0, "encore_fast.provenance": 0, "encore_fast.models.dtypes": 0,
    "encore_fast.models.*": 1,
    "encore_fast.config": 2, "encore_fast.requests": 2, "encore_fast.distributed": 2,
    "encore_fast.kernels.*": 3, "encore_fast.methods.*": 3, "encore_fast.stats": 3,
    "encore_fast.values.*": 3,
    "encore_fast.edits_file": 4, "encore_fast.history": 4, "encore_fast.engines": 4,
    "encore_fast.sharing": 4, "encore_fast.matrices": 4, "encore_fast.layer_states": 4,
    "encore_fast.contexts": 4, "encore_fast.batch_report": 4, "encore_fast.export": 4,
    "encore_fast.editor": 5, "encore_fast": 5,
    "encore_fast.eval.*": 6, "encore_fast.compat.*": 6,
    "encore_fast.cli_common": 7.0, "encore_fast.eval.cli": 7.1, "encore_fast.cli": 7.2,
    "encore_fast.__main__": 7.3,
}

# Functions over MAX_LINES that are being shortened elsewhere; empty this set as they are.
PENDING: set[str] = set()


# ----------------------------------------------------------------------------- reading code

@dataclass(frozen=True)
class Import:
    """One imported module (``target``, absolute) and the names taken from it (empty for a
    plain ``import``), in ``module`` at ``line``; ``local``: inside a function."""

    module: str
    target: str
    names: tuple[str, ...]
    line: int
    local: bool


def find_modules(sources: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under each source folder (the folder
    is the package named by its key)."""
    modules: dict[str, Path] = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a ``from`` import names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_imports(module: str, path: Path) -> list[Import]:
    """Every import of one module, marked module level or function level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, (), child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = tuple(a.name for a in child.names)
                target = _absolute(module, is_package, child)
                found.append(Import(module, target, names, child.lineno, local))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, local or inner)

    visit(tree, False)
    return found


def all_imports(modules: Mapping[str, Path]) -> list[Import]:
    return [imp for name, path in modules.items() for imp in read_imports(name, path)]


def imported_modules(imp: Import, modules: Iterable[str]) -> set[str]:
    """The package modules an import depends on: a submodule taken by name (``from . import
    dispatch``), else the module the names come from (its parents are not counted)."""
    known = set(modules)
    if not imp.names:
        return {imp.target} & known
    out = set()
    for name in imp.names:
        sub = f"{imp.target}.{name}"
        out.add(sub if sub in known else imp.target)
    return out & known


# ----------------------------------------------------------------------------- checkers

def find_cycles(modules: Mapping[str, Path], imports: Iterable[Import]) -> list[list[str]]:
    """The import circles, each as a closed path ``a, b, ..., a`` (one per strongly connected
    group of modules). Function-level imports count too: one hides a circle, it does not
    break it."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.module] |= imported_modules(imp, modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_closed_path(graph, set(group), group[0]) for group in groups]


def _closed_path(graph: Mapping[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no path back to {start}")


def layer_of(module: str, layers: Mapping[str, float]) -> float | None:
    """The layer of ``module``: its exact entry, else the longest package pattern holding it."""
    if module in layers:
        return layers[module]
    best = None
    for pattern, layer in layers.items():
        if pattern.endswith(".*"):
            package = pattern[:-2]
            if (module == package or module.startswith(package + ".")) and (
                    best is None or len(package) > len(best[0])):
                best = (package, layer)
    return None if best is None else best[1]


def unplaced(modules: Iterable[str], layers: Mapping[str, float]) -> list[str]:
    """Modules no layer holds."""
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(modules: Mapping[str, Path], imports: Iterable[Import],
                   layers: Mapping[str, float]) -> list[str]:
    """Imports (module or function level) of a module in a higher layer than the importer."""
    bad = []
    for imp in imports:
        mine = layer_of(imp.module, layers)
        for target in sorted(imported_modules(imp, modules)):
            theirs = layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                where = "function" if imp.local else "module"
                bad.append(f"{imp.module} (L{mine:g}) imports {target} (L{theirs:g}) at "
                           f"{where} level, line {imp.line}")
    return bad


def parse_allowlist(text: str) -> dict[tuple[str, str], set[str]]:
    """The function-level import table of the architecture page: (module, imported module) ->
    names taken (empty: a plain import)."""
    section = text.split("## Function-level imports", 1)[1].split("\n## ", 1)[0]
    allowed: dict[tuple[str, str], set[str]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        module = cells[0].strip("`")
        target, *names = re.findall(r"`([^`]+)`", cells[1])
        assert cells[2], f"no reason given for {module} -> {target}"
        allowed.setdefault((module, target), set()).update(names)
    return allowed


def check_local_imports(imports: Iterable[Import], allowed: Mapping[tuple[str, str], set[str]]
                        ) -> tuple[list[str], list[str]]:
    """(function-level imports not in the table, table entries no code has any more)."""
    unlisted, used = [], set()
    for imp in imports:
        if not imp.local:
            continue
        names = set(imp.names)
        key = (imp.module, imp.target)
        if key not in allowed or not names <= allowed[key]:
            unlisted.append(f"{imp.module} line {imp.line}: {imp.target} {sorted(names)}")
        used |= {(imp.module, imp.target, n) for n in names or {""}}
    stale = [f"{m} -> {t} {sorted(ns)}" for (m, t), ns in allowed.items()
             if any((m, t, n) not in used for n in ns or {""})]
    return unlisted, stale


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated ``@triton.jit``/``@jit``, or taking ``tl.constexpr`` meta-parameters."""
    for dec in fn.decorator_list:
        if re.fullmatch(r"(triton\.)?jit(\(.*\))?", ast.unparse(dec), re.DOTALL):
            return True
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return any(a.annotation is not None and ast.unparse(a.annotation) == "tl.constexpr"
               for a in args)


def _comment_above(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The block of comment lines right above the function (and its decorators)."""
    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)]) - 1  # 0-based def line
    block = []
    i = first - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(reversed(block))


def _functions(node: ast.AST, prefix: str = ""
               ) -> Iterable[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method under ``node``, nested ones too, with its qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _functions(child, prefix + child.name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, prefix + child.name + ".")
        else:
            yield from _functions(child, prefix)


def long_functions(modules: Mapping[str, Path], limit: int = MAX_LINES
                   ) -> list[tuple[str, int, bool, str]]:
    """Every function or method over ``limit`` lines (``def`` line to last line): its name
    (``module:Class.function``), length, whether it is a Triton kernel body, and the comment
    above it."""
    out = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for name, fn in _functions(ast.parse(source, filename=str(path))):
            length = fn.end_lineno - fn.lineno + 1
            if length > limit:
                out.append((f"{module}:{name}", length, _is_triton_kernel(fn),
                            _comment_above(lines, fn)))
    return out


def length_problems(found: Iterable[tuple[str, int, bool, str]], pending: set[str]
                    ) -> list[str]:
    """Long functions that are neither pending nor a Triton kernel with a comment saying why
    it is long; and pending names that are no longer long (to take off the list)."""
    problems, long_names = [], set()
    for name, length, kernel, comment in found:
        long_names.add(name)
        if name in pending:
            continue
        if kernel and "long" in comment.lower():
            continue
        why = "a Triton kernel without a comment above it saying why it is long" if kernel \
            else f"over {MAX_LINES} lines"
        problems.append(f"{name}: {length} lines, {why}")
    problems += [f"{name}: no longer over {MAX_LINES} lines; take it off PENDING"
                 for name in sorted(pending - long_names)]
    return problems


def parse_layers(text: str) -> dict[str, float]:
    """The layer table of the architecture page: ``- **L<n> ...** — `mod`, `mod`: ...`` lines;
    in a line that orders its modules with ``<`` they get ``n.0, n.1, ...``."""
    layers: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"- \*\*L(\d+)\b[^—]*— (.*?):\s", line)
        if not match:
            continue
        level, listing = int(match.group(1)), match.group(2)
        names = re.findall(r"`([^`]+)`", listing)
        ordered = "<" in listing
        for i, name in enumerate(names):
            layers[name] = level + i / 10 if ordered else level
    return layers


# ----------------------------------------------------------------------------- the package

# Private names of other libraries that the package must touch (third-party internals).
FOREIGN_PRIVATE = {("encore_fast.models.arch", "config._attn_implementation"),
                   ("encore_fast.kernels._triton", "interpreter._patch_lang")}


def private_reaches(modules: Mapping[str, Path]) -> list[str]:
    """``obj._name`` on anything but ``self``/``cls``, and ``from m import _name`` of another
    module: a module reaching into another's private names (a relative import of a package's
    own private module, ``from . import _triton``, is its own business)."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = ast.unparse(node.value)
                if owner not in ("self", "cls") and (module, f"{owner}.{node.attr}") not in \
                        FOREIGN_PRIVATE:
                    found.append(f"{module} line {node.lineno}: {owner}.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found += [f"{module} line {node.lineno}: imports {a.name} from {node.module}"
                          for a in node.names if _private(a.name)]
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(SOURCES)
    return modules, all_imports(modules)


def test_no_import_cycles(package):
    modules, imports = package
    cycles = find_cycles(modules, imports)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_is_placed_in_a_layer(package):
    modules, _ = package
    assert not unplaced(modules, LAYERS), (
        f"modules without a layer (place them in docs/ARCHITECTURE.md and LAYERS): "
        f"{unplaced(modules, LAYERS)}")


def test_no_import_goes_up_a_layer(package):
    modules, imports = package
    bad = upward_imports(modules, imports, LAYERS)
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_layer_table_matches_the_architecture_page():
    assert parse_layers(DOC.read_text(encoding="utf-8")) == LAYERS


def test_function_level_imports_are_the_listed_ones(package):
    _, imports = package
    unlisted, stale = check_local_imports(imports, parse_allowlist(DOC.read_text("utf-8")))
    assert not unlisted, ("function-level imports not in docs/ARCHITECTURE.md (move them to "
                          "the top, or list them with a reason):\n" + "\n".join(unlisted))
    assert not stale, "rows of docs/ARCHITECTURE.md no code has:\n" + "\n".join(stale)


def test_functions_are_short(package):
    modules, _ = package
    problems = length_problems(long_functions(modules), PENDING)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the checkers

SYNTHETIC = {
    "__init__.py": "",
    "a.py": "from pkg.b import x\n",
    "b.py": "import pkg.c\nx = 1\n",
    "c.py": "from pkg import a\n",
    "low.py": "from pkg.high import y\n\n\ndef f():\n    import json\n    return json\n",
    "loop.py": "def f():\n    from pkg.loop2 import z\n    return z\n",
    "loop2.py": "from pkg.loop import f\nz = f\n",
    "high.py": "y = 2\n",
    "stray.py": "",
    "long.py": "def g():\n" + "    x = 1\n" * 70,
    "kern.py": ("def k(X, BLOCK: tl.constexpr):\n" + "    x = 1\n" * 70
                + "\n\n# Long on purpose: fused.\ndef k2(X, BLOCK: tl.constexpr):\n"
                + "    x = 1\n" * 70),
}
SYNTHETIC_LAYERS = {"pkg": 0, "pkg.a": 0, "pkg.b": 0, "pkg.c": 0, "pkg.low": 0, "pkg.high": 1,
                    "pkg.long": 0, "pkg.kern": 0, "pkg.loop": 0, "pkg.loop2": 0}


def test_no_module_reaches_into_another_modules_private_names(package):
    modules, _ = package
    found = private_reaches(modules)
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.fixture
def synthetic(tmp_path) -> tuple[dict[str, Path], list[Import]]:
    for name, text in SYNTHETIC.items():
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    modules = find_modules({"pkg": tmp_path / "pkg"})
    return modules, all_imports(modules)


def test_checkers_report_a_cycle_an_upward_import_and_an_unplaced_module(synthetic):
    modules, imports = synthetic
    assert find_cycles(modules, imports) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
                                             ["pkg.loop", "pkg.loop2", "pkg.loop"]]
    assert upward_imports(modules, imports, SYNTHETIC_LAYERS) == [
        "pkg.low (L0) imports pkg.high (L1) at module level, line 1"]
    assert unplaced(modules, SYNTHETIC_LAYERS) == ["pkg.stray"]
    assert layer_of("pkg.kern", {"pkg.*": 3, "pkg.kern": 1}) == 1


def test_checkers_report_unlisted_and_stale_function_level_imports(synthetic):
    _, imports = synthetic
    page = ("## Function-level imports\n\n| module | imports | reason |\n| --- | --- | --- |\n"
            "| `pkg.low` | `os` | gone |\n\n## Next\n| `pkg.low` | `json` | not this section |\n")
    assert parse_allowlist(page) == {("pkg.low", "os"): set()}
    unlisted, stale = check_local_imports(imports, parse_allowlist(page))
    assert unlisted == ["pkg.loop line 2: pkg.loop2 ['z']", "pkg.low line 5: json []"]
    assert stale == ["pkg.low -> os []"]
    listed = page.replace("`os` | gone", "`json` | standard library |\n"
                          "| `pkg.loop` | `pkg.loop2`: `z` | a reason")
    assert check_local_imports(imports, parse_allowlist(listed)) == ([], [])


def test_checkers_report_long_functions_and_uncommented_kernels(synthetic):
    modules, _ = synthetic
    found = long_functions(modules)
    assert sorted((n, k) for n, _, k, _ in found) == [
        ("pkg.kern:k", True), ("pkg.kern:k2", True), ("pkg.long:g", False)]
    assert length_problems(found, {"pkg.gone"}) == [
        "pkg.kern:k: 71 lines, a Triton kernel without a comment above it saying why it is long",
        "pkg.long:g: 71 lines, over 60 lines",
        "pkg.gone: no longer over 60 lines; take it off PENDING"]
    assert length_problems(found, {"pkg.kern:k", "pkg.long:g"}) == []


def test_layer_lines_are_read_with_their_order():
    page = ("- **L0 base** — `a`, `b.*`: what lives there.\n"
            "- **L7 cli**, lowest first — `c` < `d`: the command lines.\n"
            "- not a layer line: `e`\n")
    assert parse_layers(page) == {"a": 0, "b.*": 0, "c": 7.0, "d": 7.1}


def test_checker_reports_private_reaches(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text(
        "from pkg.b import _hidden, shown\n"
        "class A:\n    def f(self, ed):\n        return self._x + ed._history + ed.__class__\n")
    (tmp_path / "pkg" / "b.py").write_text("_hidden = shown = 1\n")
    found = private_reaches(find_modules({"pkg": tmp_path / "pkg"}))
    assert found == ["pkg.a line 1: imports _hidden from pkg.b", "pkg.a line 4: ed._history"]


def test_the_editor_reads_in_one_sitting_and_tests_no_engine_name():
    editor = (ROOT / "encore_fast" / "editor.py").read_text(encoding="utf-8")
    assert len(editor.splitlines()) < 450
    engine_tests = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "encore_fast").rglob("*.py")
                    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                    if re.search(r"engine\s*[!=]=", line)]
    assert not engine_tests, "the engine is an object chosen once, not a name tested: " + \
        ", ".join(engine_tests)
