"""The tests' own layout: builders live in tests/helpers/, and no test module imports another.

A test module that imports another runs that module's import-time work (servers, checkpoints, marks) where it
was not meant to, ties two files that should move and change apart, and hides what is shared. pytest puts the
folder of each test file on sys.path, so any file beside the tests is importable by its bare name: the only
such name a test or helper may import is `helpers` (fixtures come from conftest.py by injection).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def local_names(root: Path) -> set[str]:
    """Names importable bare from inside the test tree: modules and packages in the folders that pytest puts on
    sys.path (every folder under `root` that is not itself inside a package)."""
    names: set[str] = set()
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        if any((p / "__init__.py").is_file() for p in [folder, *folder.parents] if p == root or root in p.parents):
            continue  # inside a package: importable only through it
        for entry in folder.iterdir():
            if entry.suffix == ".py":
                names.add(entry.stem)
            elif entry.is_dir() and (entry / "__init__.py").is_file():
                names.add(entry.name)
    return names


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (imports inside functions too), with its line;
    `from a import b` names both `a` and `a.b`, as b may be a module. `importlib.import_module("x")` counts."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: only within helpers/, never to a test module
            found += [(node.lineno, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def layout_faults(root: Path) -> list[str]:
    """`path:line imports name` for each import of a test module (a module named test_*) or of a file beside the
    tests other than the `helpers` package."""
    local = local_names(root)
    faults: dict[tuple[Path, int], str] = {}  # one per import statement: the first module it names at fault
    for path in sorted(root.rglob("*.py")):
        if "data" in path.relative_to(root).parts[:-1]:
            continue
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            parts = module.split(".")
            test_module = any(p.startswith("test_") for p in parts) and parts[0] in local | {"helpers", "tests"}
            beside = parts[0] in local and parts[0] != "helpers"
            if test_module or beside:
                faults.setdefault((path, line), f"{path.relative_to(root)}:{line} imports {module}")
    return list(faults.values())


def test_no_test_module_imports_another_and_builders_come_from_helpers() -> None:
    faults = layout_faults(TESTS)
    assert not faults, "move what is shared to tests/helpers/ and import it from there:\n" + "\n".join(faults)


def test_the_layout_check_finds_each_kind_of_cross_import(tmp_path: Path) -> None:
    """The check above must be able to fail: a tree with one import of each forbidden kind, and allowed ones."""
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (tmp_path / "helpers" / "pdfs.py").write_text("import pymupdf\nfrom .images import png\n")
    (tmp_path / "helpers" / "images.py").write_text("def png():\n    from test_b import thing\n")
    (tmp_path / "builder.py").write_text("")
    (tmp_path / "conftest.py").write_text("from helpers.pdfs import make_pdf\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test_c.py").write_text("import importlib\nm = importlib.import_module('test_a')\n")
    (tmp_path / "test_a.py").write_text(
        "import jobs.views\nfrom helpers import pdfs\nfrom helpers.images import png\nimport test_b as b\n"
        "from builder import x\n"
    )
    (tmp_path / "test_b.py").write_text("def test_one():\n    from test_a import helper\n    import conftest\n")
    assert layout_faults(tmp_path) == [
        "helpers/images.py:2 imports test_b",
        "sub/test_c.py:2 imports test_a",
        "test_a.py:4 imports test_b",
        "test_a.py:5 imports builder",
        "test_b.py:2 imports test_a",
        "test_b.py:3 imports conftest",
    ]


def test_every_import_in_the_tests_resolves() -> None:
    """An import inside a function runs only when its test does: a name that no longer exists (a builder moved to
    tests/helpers/, a product module renamed) would fail that one test late, or hide behind a skip. Every
    absolute import a test or helper names must be found: the standard library, an installed package, a product
    module (the repository root), `helpers`, or a benchmark script (benchmarks/, which tests/benchmarks/ puts
    on sys.path itself). vLLM and Ray are optional (GPU and cluster tests). The folders are put on sys.path
    here, so the answer does not depend on which test files this process ran before."""
    import importlib.util
    import sys

    optional = {"vllm", "ray", "triton"}
    roots = [str(TESTS.parent), str(TESTS), str(TESTS.parent / "benchmarks")]
    sys.path[:0] = [r for r in roots if r not in sys.path]
    missing = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in optional or top in sys.stdlib_module_names or top.startswith("test_"):
                    continue  # test_* imports: the test above
                if importlib.util.find_spec(top) is None:
                    missing.append(f"{path.relative_to(TESTS)}:{node.lineno} imports {name}")
    assert not missing, "\n".join(missing)
