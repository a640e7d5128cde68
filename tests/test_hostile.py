"""Every CLI command, every numeric option, hostile values: one line and exit status 1 or 2, never a traceback,
and nothing written. The commands and their options are read from the click groups themselves, so an option
added later is driven too. Also: damaged checkpoint, weights and tokenizer files, and a diverging run."""

from __future__ import annotations

import click
import pytest
import torch

from cli.mapet import cli as mapet_cli
from cli.mapet import main as mapet_main
from cli.tokenkit import cli as tokenkit_cli
from cli.tokenkit import main as tokenkit_main
from pretrain.train import TrainConfig, pretrain
from tokenkit.tokenize_job import TokenizeConfig, tokenize

FLOATS = ("nan", "inf", "-inf", "1e30", "-1e30")
INTS = (str(2**64), str(-(2**63)), "99999999999999999999999")


@pytest.fixture(scope="module")
def world(tmp_path_factory, photos, features_store, codebook_path):
    """Valid inputs for every command: images, features, a codebook, a token store, a pre-training run and a
    fine-tuning run (tiny)."""
    root = tmp_path_factory.mktemp("hostile")
    tokens = tokenize(
        photos, codebook_path, root / "tokens", TokenizeConfig(shard_size=8, workers=0), progress=False
    )
    cfg = TrainConfig(
        tokens=str(tokens), out=str(root / "run"), model="mapet_micro", image_size=64, patch_size=16,
        batch_size=4, epochs=1, workers=0, max_steps=1, warmup_epochs=0,
    )  # fmt: skip
    pretrain(cfg, progress=False)
    ft = root / "ft"
    assert mapet_main([
        "finetune", "--checkpoint", str(root / "run/last.pt"), "--train", str(photos), "--val", str(photos),
        "--out", str(ft), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet",
    ]) == 0  # fmt: skip
    return {
        "photos": str(photos), "feat": str(features_store), "cb": str(codebook_path), "tokens": str(tokens),
        "ckpt": str(root / "run/last.pt"), "ft": str(ft / "last.pt"),
    }  # fmt: skip


# the valid arguments of each command; the hostile option is appended
BASE = {
    ("tokenkit", "features"): ["{photos}", "{out}/f", "--workers", "0", "--quiet"],
    ("tokenkit", "codebook"): ["{feat}", "{out}/cb.safetensors", "--k", "4", "--quiet"],
    ("tokenkit", "convert"): ["dalle", "{ckpt}", "{out}/q.safetensors"],
    ("tokenkit", "tokenize"): ["{photos}", "{cb}", "{out}/t", "--workers", "0", "--quiet"],
    ("tokenkit", "show"): ["{tokens}", "--code", "0", "--out", "{out}/s.png"],
    ("tokenkit", "encode"): ["{cb}", "{photos}/even/astronaut.jpg"],
    ("mapet", "pretrain"): ["--tokens", "{tokens}", "--out", "{out}/r", "--model", "mapet_micro", "--workers", "0", "--quiet"],
    ("mapet", "knn"): ["--checkpoint", "{ckpt}", "--train", "{photos}", "--val", "{photos}", "--workers", "0", "--quiet"],
    ("mapet", "linprobe"): ["--checkpoint", "{ckpt}", "--train", "{photos}", "--val", "{photos}", "--workers", "0", "--quiet"],
    ("mapet", "finetune"): [
        "--checkpoint", "{ckpt}", "--train", "{photos}", "--val", "{photos}", "--out", "{out}/ft", "--workers", "0", "--quiet",
    ],
    ("mapet", "validate"): ["--checkpoint", "{ft}", "--val", "{photos}", "--workers", "0", "--quiet"],
}  # fmt: skip
GROUPS = {"tokenkit": (tokenkit_cli, tokenkit_main), "mapet": (mapet_cli, mapet_main)}


def numeric_options():
    """(group, command, option, hostile value) for every numeric option of every command."""
    for group, (cli, _) in GROUPS.items():
        for name, cmd in cli.commands.items():
            for p in cmd.params:
                if not isinstance(p, click.Option) or p.is_flag:
                    continue
                types = p.type.types if isinstance(p.type, click.Tuple) else [p.type]
                if not all(t in (click.INT, click.FLOAT) for t in types):
                    continue
                assert (group, name) in BASE, f"{group} {name}: give it valid arguments in BASE"
                values = FLOATS if click.FLOAT in types else INTS
                for v in values:
                    yield group, name, p.opts[0], [v] * len(types)


CASES = list(numeric_options())


@pytest.mark.parametrize("group,command,option,values", CASES, ids=[f"{c[1]}{c[2]}={c[3][0]}" for c in CASES])
def test_every_numeric_option_refuses_hostile_values(world, tmp_path, capsys, group, command, option, values):
    out = tmp_path / "new"
    argv = [command, *(a.format(**{**world, "out": out}) for a in BASE[group, command]), option, *values]
    rc = GROUPS[group][1](argv)
    err = capsys.readouterr().err
    assert rc in (1, 2), f"{' '.join(argv)}: exit {rc}\n{err}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), "something was written"


def test_the_cases_cover_every_command_with_numbers():
    assert {(g, c) for g, c, _, _ in CASES} == set(BASE) and len(CASES) > 150


@pytest.mark.parametrize(
    "content",
    [b"hello, this is text\n", b"", b"\x00" * 10 + bytes(range(256)) * 4, b"PK\x03\x04truncated zip"],
    ids=["text", "empty", "random", "truncated-zip"],
)
def test_damaged_files_are_one_line(world, tmp_path, capsys, content):
    """A checkpoint, a weights file and a tokenizer file that are text, empty, random bytes or truncated."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(content)
    for main, argv in (
        (mapet_main, ["knn", "--checkpoint", str(bad), "--train", world["photos"], "--val", world["photos"]]),
        (
            mapet_main,
            ["knn", "--checkpoint", str(bad_st), "--train", world["photos"], "--val", world["photos"]],
        ),
        (mapet_main, ["validate", "--checkpoint", str(bad), "--val", world["photos"]]),
        (mapet_main, ["export", str(bad), str(tmp_path / "e")]),
        (mapet_main, ["import-official", str(bad), str(tmp_path / "imported")]),
        (tokenkit_main, ["inspect", str(bad_st)]),
        (tokenkit_main, ["encode", str(bad_st), f"{world['photos']}/even/astronaut.jpg"]),
        (tokenkit_main, ["tokenize", world["photos"], str(bad_st), str(tmp_path / "t")]),
        (tokenkit_main, ["convert", "vqkd", str(bad), str(tmp_path / "q.safetensors")]),
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc in (1, 2) and "Traceback" not in err and len(err.strip().splitlines()) == 1, (
            f"{argv}\n{err}"
        )
    assert not (tmp_path / "t").exists() and not (tmp_path / "q.safetensors").exists()


def test_checkpoint_dicts_missing_their_fields_are_one_line(world, tmp_path, capsys):
    ckpt = torch.load(world["ckpt"], weights_only=True)
    for drop in ("model", "vit", "config", "objective"):
        broken = {k: v for k, v in ckpt.items() if k != drop}
        torch.save(broken, tmp_path / f"no-{drop}.pt")
        rc = mapet_main(
            [
                "knn",
                "--checkpoint",
                str(tmp_path / f"no-{drop}.pt"),
                "--train",
                world["photos"],
                "--val",
                world["photos"],
            ]
        )
        err = capsys.readouterr().err
        assert rc in (1, 2) and "Traceback" not in err and len(err.strip().splitlines()) == 1, (
            f"{drop}\n{err}"
        )
