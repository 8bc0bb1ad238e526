"""The `pgolf` command line (flows/cli.py): the stages' own command lines as its subcommands."""
from __future__ import annotations

import json

import pytest

from flows import cli


def test_export_stage_ranks_and_params_are_subcommands(capsys):
    for command, prog in (("export", "pgolf export"), ("params", "pgolf params"), ("ranks", "pgolf ranks"),
                          ("stage eval", "pgolf stage eval")):
        with pytest.raises(SystemExit) as done:
            cli.main([*command.split(), "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} "), command
    with pytest.raises(SystemExit):
        cli.main(["stage", "nosuch"])
    assert "STAGE is one of corpus, tokenizer" in capsys.readouterr().err


def test_pgolf_stage_runs_the_stage_alone(tmp_path, monkeypatch, capsys):
    """`pgolf stage corpus` is `python -m tasks.corpus`: the stage on its params section, no DVC."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    (tmp_path / "params.yaml").write_text(f"corpus:\n  source: {source}\n")
    assert cli.main(["stage", "corpus", "--out", str(tmp_path / "corpus")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"stage": "corpus", "num_docs": 3, "text_bytes": 30}
    assert (tmp_path / "corpus/docs.jsonl").is_file()


def test_pgolf_export_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("train: {seed: 1}\n")
    code = cli.main(["export", "--out", str(tmp_path / "rec"), "--params", str(tmp_path / "params.yaml"),
                     "--artifacts", str(tmp_path / "none")])
    assert code == 2 and "pgolf export: error:" in capsys.readouterr().err and not (tmp_path / "rec").exists()
