"""House rules that code review would otherwise have to catch: import direction and dependency edges."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_libraries_never_import_the_cli_and_tokenkit_never_imports_pretrain():
    for pkg in ("tokenkit", "pretrain"):
        for f in (ROOT / pkg).rglob("*.py"):
            mods = imports_of(f)
            assert not any(m == "cli" or m.startswith("cli.") for m in mods), f
            if pkg == "tokenkit":
                assert not any(m.startswith("pretrain") for m in mods), f


def test_heavy_dependencies_stay_at_the_edge():
    users = {"open_clip": set(), "faiss": set(), "timm": set()}
    for f in (ROOT / "tokenkit").rglob("*.py"):
        for m in imports_of(f):
            for dep in users:
                if m == dep or m.startswith(dep + "."):
                    users[dep].add(f.name)
    assert users == {"open_clip": {"clip.py"}, "faiss": {"kmeans.py"}, "timm": {"timm_backbone.py"}}


def test_library_code_reads_no_argv_or_environment():
    for pkg in ("tokenkit", "pretrain"):
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            assert "sys.argv" not in text and "os.environ" not in text, f
