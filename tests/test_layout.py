"""The package's house rules: dependencies point down, never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "study"


def _imports() -> dict[str, set[str]]:
    """module -> the study modules it imports (module level and inside functions)."""
    mods = {}
    for p in STUDY.rglob("*.py"):
        name = ".".join(p.relative_to(STUDY.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "study":
                target = node.module
            else:
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}"
                graph[m].add(name if name in mods else target)
    # `from . import __version__` reads the package's version, not a module
    return {m: {d for d in ds if d in mods and d != m and d != "study"} for m, ds in graph.items()}


def test_study_modules_import_each_other_without_a_cycle():
    graph, cycles, done = _imports(), [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles


# The layers, bottom first: a module may import from its own layer and those below it.
LAYERS = [
    ("study.config", "study.errors", "study.quiet"),  # the ground
    ("study.trial",),  # what a trial is
    ("study.store",),  # where a study is stored
    ("study.views",),  # what a study says
    ("study.run",),  # how trials are run
    ("study.compare",),  # the course report's comparisons
    ("study.cli", "study.__main__"),  # the command line
]


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py LAYERS")


def test_imports_point_down_the_layers():
    up = [
        f"{m} -> {d}"
        for m, deps in _imports().items()
        if m != "study"
        for d in deps
        if _layer(d) > _layer(m)
    ]
    assert not up, up


def test_each_engine_has_a_module_named_for_it():
    graph = _imports()
    assert {
        "study.run.standard",
        "study.run.batched.engine",
        "study.run.batched.stack",
        "study.run.opening",
        "study.views.summary",
        "study.views.artifacts",
    } <= set(graph)
    # the top: nothing else runs a run
    assert [m for m, deps in graph.items() if "study.run.runner" in deps] == ["study.cli"]


def test_comments_and_docstrings_carry_no_benchmark_figures():
    """Timings in code go stale with the next machine or release; they belong in
    docs/results.md, where each has its machine, date and command."""
    import io
    import re
    import tokenize

    figure = re.compile(
        r"~ ?\d[\d.]* ?(s|ms|us|µs)\b|\b\d[\d.]* ?(ms|us|µs)\b|\b\d[\d.]*x (as|faster|slower)"
        r"|[Mm]easured on (the |an? |one )?(\d+-core|H[12]00|CPU|GPU)"
    )
    found = []
    for p in STUDY.rglob("*.py"):
        for tok in tokenize.generate_tokens(io.StringIO(p.read_text()).readline):
            is_doc = tok.type == tokenize.STRING and tok.string.startswith(('"""', "'''"))
            if (tok.type == tokenize.COMMENT or is_doc) and figure.search(tok.string):
                found.append(f"{p.relative_to(STUDY.parent)}:{tok.start[0]}")
    assert not found, found


def test_the_trainer_and_its_writer_talk_only_in_the_typed_messages():
    """study.run.batched.messages is the contract: every job the engine puts and every reply the
    writer puts is one of its dataclasses (no tuples, lists or dicts read by position), and the
    mirror and the engine take no type from the writer."""
    from study.run.batched import messages

    kinds = set(messages.Job.__args__) | set(messages.Reply.__args__)
    names = {k.__name__ for k in kinds}
    graph = _imports()
    assert "study.run.batched.writer" not in graph["study.run.batched.mirror"]
    puts = 0
    for module in ("engine", "writer"):
        tree = ast.parse((STUDY / "run" / "batched" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "put"
                and ast.unparse(node.func.value).split(".")[-1] in ("writer", "results", "jobs")
            ):
                continue
            (arg,) = node.args
            if ast.unparse(node) == "self.jobs.put(job)":  # Writer.put(self, job: Job)
                continue
            puts += 1
            assert isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name), ast.unparse(node)
            assert arg.func.id in names, ast.unparse(node)
    assert puts >= 10
    assert (
        "def put(self, job: Job) -> None:" in (STUDY / "run" / "batched" / "writer.py").read_text()
    )


BACKENDS = {"sqlite", "postgresql", "postgres", "journal", "memory"}
BACKEND_NAMES = {"JournalStorage", "RDBStorage", "InMemoryStorage", "dialect"}


def _backend_branches(tree: ast.AST) -> list[int]:
    """Lines that ask which storage backend they hold: a name of Optuna's storage classes or
    the SQL dialect, or a comparison with a backend's name or URL scheme."""
    lines = []
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if isinstance(node, ast.Name | ast.Attribute) and name in BACKEND_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare):
            consts = [
                c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)
            ]
            if any(isinstance(v, str) and v.lower() in BACKENDS for v in consts):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if any(isinstance(v, str) and v.split(":")[0].lower() in BACKENDS for v in args):
                lines.append(node.lineno)
    return lines


def test_no_module_outside_the_store_asks_which_backend_it_holds():
    found = [
        f"{p.relative_to(STUDY.parent)}:{line}"
        for p in STUDY.rglob("*.py")
        if "store" not in p.relative_to(STUDY).parts[:1]
        for line in _backend_branches(ast.parse(p.read_text()))
    ]
    assert not found, found
    # and the check finds what it looks for
    inside = [
        p for p in (STUDY / "store").rglob("*.py") if _backend_branches(ast.parse(p.read_text()))
    ]
    assert inside
