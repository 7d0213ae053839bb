"""Docs that cannot drift: every file and symbol the docs (and the code's comments) name exists, no doc points
outside the repository, the contract's config keys are the schema's, and the layout's import rules hold.

Conventions the docs follow, and this test checks:
- a link to a file, `[text](../bertino/grad_cache.py)`, must resolve; links never carry line numbers (#L12);
- a link whose text is a backticked name, [`forward_no_grad`](../bertino/grad_cache.py) or `Class.method`, names a
  symbol defined in that file;
- a backticked `module.symbol` whose module is one of the project's (`grad_cache.classic_plan`) must exist;
- a repo path (`bertino/...`, `tests/...`, ...) or a bare `name.py` anywhere in a doc or the code must exist,
  and `tests/test_x.py::test_name` must name a test that exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        ROOT / "data" / "demo" / "README.md"]
OUTSIDE = ("CONTRACT" + ".md", "STYLE" + ".md", "../" + "shared")  # spelled apart: this file must not match itself
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
# Paths of the repository's own files (data/ holds user data too: only data/demo/ is the repository's)
REPO_PATH = re.compile(r"(?<![\w./-])((?:bertino|tests|scripts|benchmarks|configs|docs|data/demo|\.ci)/[\w./-]*\w)")
BARE_PY = re.compile(r"(?<![\w/.-])([a-z_0-9]+\.py)\b")
TEST_REF = re.compile(r"(tests/test_\w+\.py)::(\w+)")
DOTTED = re.compile(r"`([a-z_]+)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?`")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def python_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".py"]


@lru_cache(maxsize=None)
def symbols(path: Path) -> frozenset[str]:
    """Names defined in a Python file: top-level defs, classes and assignments, and `Class.member`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{item.name}")
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(f"{node.name}.{item.target.id}")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return frozenset(names)


def modules_by_name() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for p in python_files():
        found.setdefault(p.stem, []).append(p)
    return found


FILE_SUFFIXES = {"py", "json", "jsonl", "md", "safetensors", "gz", "sh", "txt", "png", "pt", "bin", "csv", "parquet"}


@lru_cache(maxsize=None)
def config_keys() -> dict[str, set[str]]:
    """{section: its keys}: `train.max_steps` is a config key, not the symbol max_steps of train.py."""
    import dataclasses

    from bertino.plumbing import config

    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SCHEMA().items()}
    for old in config.MOVED_KEYS:  # a key that moved is still documented at its old place (and still works)
        section, key = old.split(".")
        keys[section].add(key)
    return keys


def SCHEMA() -> dict:
    from bertino.plumbing import config

    return {"model": config.ModelConfig, "tasks": config.TaskConfig, "matryoshka": config.MatryoshkaConfig,
            "train": config.TrainConfig, "eval": config.EvalConfig, "speedups": config.SpeedupsConfig}


def doc_problems(doc: Path) -> list[str]:
    text, problems = doc.read_text(encoding="utf-8"), []
    for label, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if re.search(r"#L\d+", target):
            problems.append(f"{doc.name}: link {target} points at line numbers")
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            problems.append(f"{doc.name}: link {target} does not exist")
            continue
        name = re.fullmatch(r"`([A-Za-z_][\w.]*)`", label)
        if name and path.suffix == ".py" and not name.group(1).endswith(".py"):
            if name.group(1) not in symbols(path):
                problems.append(f"{doc.name}: [{label}] is not defined in {path.relative_to(ROOT)}")
    modules = modules_by_name()
    for module, attr, member in DOTTED.findall(text):
        if module in modules and attr not in FILE_SUFFIXES and attr not in config_keys().get(module, ()):
            wanted = f"{attr}.{member}" if member and attr[:1].isupper() else attr
            if not any(wanted in symbols(p) or attr in symbols(p) and not member for p in modules[module]):
                problems.append(f"{doc.name}: `{module}.{attr}{'.' + member if member else ''}` does not exist")
    return problems


def reference_problems(path: Path, text: str) -> list[str]:
    """Repo paths, bare file names and test references that do not exist."""
    problems, basenames = [], {p.name for p in tracked_files()}
    for ref in REPO_PATH.findall(text):
        if not (ROOT / ref).exists() and not any(ch in ref for ch in "*<>"):
            problems.append(f"{path.relative_to(ROOT)}: {ref} does not exist")
    for name in BARE_PY.findall(text) if path.parent.name != "tests" else ():  # tests name files they write
        if name not in basenames:
            problems.append(f"{path.relative_to(ROOT)}: {name} does not exist in the repository")
    for file, test in TEST_REF.findall(text):
        if not (ROOT / file).exists() or test not in symbols(ROOT / file):
            problems.append(f"{path.relative_to(ROOT)}: {file}::{test} does not exist")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_symbol_a_doc_names_exists(doc):
    problems = doc_problems(doc) + reference_problems(doc, doc.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_every_file_the_code_names_exists():
    problems = []
    for path in python_files():
        if path.name != "test_docs.py":
            problems += reference_problems(path, path.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_nothing_points_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in tracked_files() if p.suffix in (".py", ".md", ".sh", ".json", "")
            for word in OUTSIDE if word in p.read_text(encoding="utf-8", errors="replace")]
    assert not hits, "\n".join(hits)


def test_the_contract_lists_the_schema_s_config_keys():
    """docs/contract.md's key list is exactly the dataclass fields of the config schema, section by section."""
    import dataclasses


    block = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8").split("## Config (JSON)")[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    section = None
    for line in block.strip().splitlines():
        head = re.match(r"(\w+):(.*)", line)
        section, rest = (head.group(1), head.group(2)) if head else (section, line)
        listed.setdefault(section, set()).update(re.findall(r"\b[a-z][a-z_0-9]*\b", rest.split(" or null")[0]))
    schema = SCHEMA()
    assert set(listed) == set(schema)
    for name, cls in schema.items():
        assert listed[name] == {f.name for f in dataclasses.fields(cls)}, name


STUDENT_MODULES = ["model", "encoder", "batching", "losses", "matryoshka", "objectives", "grad_cache", "keyed_dropout",
                   "step", "sampler", "optim", "distributed", "metrics", "evaluation", "eval_names", "eval_sets",
                   "eval_tables", "quantization", "vector_indexes", "hard_negatives", "corpus_search", "errors"]
# Every other module of bertino/ says here why it may lean on the speed-ups or the plumbing: no silent exemption.
MEETING_POINTS = {
    "__init__": "the package's public names",
    "build": "the one builder of the training step: installs the speed-ups (train.py and the check)",
    "check": "a command: builds the run and compares two gradients",
    "mine": "a command: hard-negative mining over files",
    "convert": "a command: pickled weights to safetensors",
    "plot": "a command: a run's curves from metrics.jsonl",
}


def test_every_module_is_a_student_module_or_a_named_meeting_point():
    modules = {p.stem for p in (ROOT / "bertino").glob("*.py")}
    assert modules == set(STUDENT_MODULES) | set(MEETING_POINTS), (
        f"not classified: {sorted(modules - set(STUDENT_MODULES) - set(MEETING_POINTS))}; "
        f"gone: {sorted((set(STUDENT_MODULES) | set(MEETING_POINTS)) - modules)}")


@pytest.mark.parametrize("name", STUDENT_MODULES)
def test_student_modules_do_not_lean_on_speedups_or_plumbing(name):
    """The reading path stands on its own: no speed-up, and plumbing only to read or write files."""
    tree = ast.parse((ROOT / "bertino" / f"{name}.py").read_text(encoding="utf-8"))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if "speedups" in m], name
    plumbing = sorted({m for m in imported if "plumbing" in m})
    allowed = {"encoder": {"plumbing.files", "plumbing.model_folder", "plumbing.sources", "plumbing.weights"},
               "evaluation": {"plumbing.eval_data"}}.get(name, set())
    assert set(plumbing) <= allowed, (name, plumbing)


def test_a_long_module_says_why_at_its_top():
    """No module of bertino/ (and no top-level script) over 400 lines without the reason in its docstring."""
    long = []
    for path in [*(ROOT / "bertino").rglob("*.py"), ROOT / "train.py", ROOT / "evaluate.py"]:
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 400 and "Why this file is long" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, long


# ================================================================================================ import cycles
def bertino_imports() -> dict[str, set[str]]:
    """{module: the bertino modules it imports}, for every module of bertino/, from its source: every import
    statement anywhere in the file (function-local ones too: they run, only later), relative ones resolved against
    the importing module's package. `from PACKAGE import NAME` counts as importing PACKAGE.NAME when that is a
    module. Parent packages' __init__ files are not counted (Python runs them first, but they import nothing that
    imports back: the test below would not hold otherwise)."""
    files = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sorted((ROOT / "bertino").rglob("*.py"))}
    names = {name.removesuffix(".__init__") for name in files.values()}
    graph: dict[str, set[str]] = {}
    for path, name in files.items():
        module = name.removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in names:  # `import bertino.x.y` where y is an attribute
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list: every cycle lies in
    one of them."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_bertino():
    """No module of bertino/ imports, directly or through others, a module that imports it back — counting imports
    inside functions too (a cycle hidden in a function still ties the two modules together)."""
    graph = bertino_imports()
    assert graph["bertino.plumbing.config"] >= {"bertino.eval_names", "bertino.losses"}  # the parser sees them
    assert "bertino.plumbing.eval_data" in graph["bertino.evaluation"]
    assert not import_cycles(graph), import_cycles(graph)


def test_the_cycle_finder_finds_function_local_and_relative_cycles():
    graph = {"bertino.a": {"bertino.b"}, "bertino.b": {"bertino.plumbing.c"}, "bertino.plumbing.c": {"bertino.a"},
             "bertino.d": {"bertino.a"}}
    assert import_cycles(graph) == [["bertino.a", "bertino.b", "bertino.plumbing.c"]]
    assert import_cycles({"bertino.a": {"bertino.b"}, "bertino.b": set()}) == []
