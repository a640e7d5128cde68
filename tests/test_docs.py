"""The commands the README and docs/ show use commands and flags that exist, so the docs cannot rot."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli.mapet import cli as mapet_cli
from cli.tokenkit import cli as tokenkit_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUPS = {"mapet": mapet_cli, "tokenkit": tokenkit_cli, "cli.mapet": mapet_cli, "cli.tokenkit": tokenkit_cli}


def shell_lines(text: str) -> list[str]:
    """Command lines of the fenced (but Python) and the 4-space-indented code blocks, continuation lines
    joined."""
    fenced = r"```([a-z]*)\n(.*?)```"
    blocks = [body for lang, body in re.findall(fenced, text, re.S) if lang != "python"]
    blocks += re.findall(r"((?:^    \S.*\n)+)", re.sub(fenced, "", text, flags=re.S), re.M)
    out = []
    for block in blocks:
        out += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return out


def documented() -> list[tuple[str, str, list[str]]]:
    """(doc, program, argv) of every tokenkit / mapet / bench command the docs show."""
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            command: list[str] = []
            for w in [*words, "&&"]:  # commands chained with && / || / ; / | each on their own
                if w not in ("&&", "||", ";", "|"):
                    command.append(w)
                    continue
                if command:
                    found += _program(doc.name, command)
                command = []
    return found


def _program(doc: str, words: list[str]) -> list[tuple[str, str, list[str]]]:
    if words[0] in ("tokenkit", "mapet"):
        return [(doc, words[0], words[1:])]
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        return [(doc, words[i + 1], words[i + 2 :])]
    if words[0] == "python" and len(words) > 1 and words[1].startswith("bench/"):
        return [(doc, words[1], words[2:])]
    return []


def flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_the_docs_show_commands_at_all():
    progs = {p for _, p, _ in documented()}
    assert {"tokenkit", "mapet", "cli.mapet", "cli.tokenkit"} <= progs
    assert any(p.startswith("bench/") for p in progs)


@pytest.mark.parametrize(
    "doc,prog,argv",
    [d for d in documented() if d[1] in GROUPS],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_documented_cli_commands_exist_with_their_flags(doc, prog, argv):
    group = GROUPS[prog]
    assert argv and argv[0] in group.commands, f"{doc}: '{prog} {argv[0] if argv else ''}' is not a command"
    cmd: click.Command = group.commands[argv[0]]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    unknown = [f for f in flags(argv[1:]) if f not in known]
    assert not unknown, f"{doc}: '{prog} {argv[0]}' has no {', '.join(unknown)}"


def test_documented_bench_flags_exist():
    by_script: dict[str, set[str]] = {}
    for _, prog, argv in documented():
        if prog.startswith("bench/"):
            by_script.setdefault(prog, set()).update(flags(argv))
    for script, used in by_script.items():
        r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-500:]
        missing = [f for f in sorted(used) if f not in r.stdout.decode()]
        assert not missing, f"{script} has no {', '.join(missing)}"


def test_the_python_api_block_runs(tmp_path, photos, codebook_path, monkeypatch):
    """docs/pipeline.md's Python API block runs as shown, on a tiny codebook and store, with the smallest
    preset in place of mapet_small; its MaPeT loss backpropagates into every weight but BEiT's."""
    from tokenkit.tokenize_job import TokenizeConfig, tokenize

    text = (ROOT / "docs" / "pipeline.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    tokenize(photos, codebook_path, tmp_path / "tokens", TokenizeConfig(workers=0), progress=False)
    photo = next(photos.rglob("*.jpg"))
    for doc, here in (("kclip-8192.safetensors", codebook_path), ("photo.jpg", photo)):
        assert f'"{doc}"' in code
        code = code.replace(f'"{doc}"', f'"{here}"')
    assert '"mapet_small"' in code
    code = code.replace('"mapet_small"', '"mapet_micro"')
    monkeypatch.chdir(tmp_path)  # the block opens the store "tokens"
    ns: dict = {}
    exec(compile(code, "docs/pipeline.md", "exec"), ns)
    tok, mapet = ns["tok"], ns["mapet"]
    assert ns["ids"].shape == (tok.grid, tok.grid) and int(ns["ids"].max()) < tok.k
    assert all(p.grad is not None for p in mapet.parameters())
    assert 0 <= ns["top1"].item() <= 1 and ns["loss"].detach().item() > 0


def test_the_mcnemar_block_runs(tmp_path, monkeypatch):
    """docs/pipeline.md's block comparing two evaluation JSONs runs as shown: 3 images right only for the
    first, 1 only for the second, p = 2 (1 + 4) / 16."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    code = re.search(r"```python\n(import json\n.*?mcnemar.*?)```", text, re.S).group(1)
    labels = [0, 1, 2, 0, 1, 2]
    for name, pred in (("knn-mapet.json", [0, 1, 2, 1, 1, 0]), ("knn-beit.json", [1, 0, 0, 1, 1, 2])):
        (tmp_path / name).write_text(json.dumps({"labels": labels, "predictions": pred}))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "docs/pipeline.md", "exec"), ns)
    assert (ns["only_a"], ns["only_b"]) == (3, 1) and ns["p"] == pytest.approx(0.625)
