"""The CLI shell: help without torch, version, exit codes, one-line errors, --debug tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from genrecal_cli import __version__

from .conftest import heavy_imports


def test_help_imports_neither_torch_nor_transformers():
    assert heavy_imports(["--help"]) == []


def test_help_names_the_built_in_models(cli):
    out = cli("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in ("zoo:shapes-teacher", "zoo:tiny-teacher", "zoo:tiny-student", "zoo:qwen2_vl", "zoo:idefics3"):
        assert name in text


def test_every_command_has_help(cli):
    for cmd in ("distill", "eval", "chat", "inspect-vocab", "report", "teach"):
        out = cli(cmd, "--help")
        assert out.returncode == 0, out.stderr
        assert "Usage" in out.stdout


def test_version_and_module_entry_point_agree(cli):
    out = cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"genrecal {__version__}"
    # the console script installed beside this interpreter (the tests run from the install they check)
    script = subprocess.run([str(Path(sys.executable).with_name("genrecal")), "--version"], capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert script.stdout == out.stdout


def test_dry_run_validates_and_shows_the_plan(cli):
    out = cli("distill", "recipes/tiny-shapes.toml", "--dry-run")
    assert out.returncode == 0, out.stderr
    for stage in ("align", "distill", "finetune"):
        assert stage in out.stdout
    assert "zoo:shapes-teacher" in out.stdout and "zoo:tiny-student" in out.stdout


def test_missing_recipe_is_one_line_exit_1(cli, tmp_path):
    out = cli("distill", str(tmp_path / "missing.toml"))
    assert out.returncode == 1
    assert "recipe file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_recipe_lists_every_problem(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[student]\npath = "zoo:s"\ndtyp = "x"\n[stages.finetune]\nsteps = 0\n')
    out = cli("distill", str(bad))
    assert out.returncode == 1
    assert str(bad) in out.stderr and "2 problems" in out.stderr
    assert "did you mean `dtype`?" in out.stderr
    assert "stages.finetune.steps: 0 must be > 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_set_override_errors_name_the_key(cli):
    out = cli("distill", "recipes/tiny-shapes.toml", "--set", "train.sed=3", "--dry-run")
    assert out.returncode == 1
    assert "unknown key `train.sed`; did you mean `seed`?" in out.stderr


def test_debug_shows_the_traceback(cli, tmp_path):
    out = cli("--debug", "distill", str(tmp_path / "missing.toml"))
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "RecipeError" in out.stderr


def test_usage_error_exits_2(cli):
    out = cli("distill")
    assert out.returncode == 2
    assert "Missing argument" in out.stderr


def test_inspect_vocab_json_on_the_tiny_pair(cli, tiny_pair):
    import json

    out = cli("inspect-vocab", "zoo:tiny-teacher", "zoo:tiny-student", "--json", "-")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["teacher"]["len_tokenizer"] != report["student"]["len_tokenizer"]
    assert report["verdict"]["same"] is False
    assert report["teacher"]["image"]["image_token"] != report["student"]["image"]["image_token"]


def test_inspect_vocab_bad_inputs_are_one_line(cli, tmp_path, tiny_pair):
    out = cli("inspect-vocab", "zoo:tiny-teacher")
    assert out.returncode == 1 and "needs TEACHER and STUDENT" in out.stderr
    out = cli("inspect-vocab", "zoo:tiny-teacher", "zoo:tiny-student", "--text", str(tmp_path / "nope.txt"))
    assert out.returncode == 1 and "nope.txt" in out.stderr and "Traceback" not in out.stderr
    out = cli("inspect-vocab", str(tmp_path), "zoo:tiny-student")
    assert out.returncode == 1 and str(tmp_path) in out.stderr


def test_inspect_vocab_with_data_answers_and_bad_files(cli, tmp_path, tiny_pair):
    import json

    out = cli("inspect-vocab", "zoo:tiny-teacher", "zoo:tiny-student", "--data", "shapes", "--samples", "20", "--json", "-")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["text"]["texts"] == 20 and report["text"]["source"] == "shapes"
    # conversations: every assistant turn is a sample answer
    rows = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": f"first answer {i}"},
                               {"from": "human", "value": "q2"}, {"from": "gpt", "value": f"second answer {i}"}]}
            for i in range(3)]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli("inspect-vocab", "zoo:tiny-teacher", "zoo:tiny-student", "--data", str(chats), "--samples", "5", "--json", "-")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"]["texts"] == 5  # 3 rows x 2 turns, the first 5
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = cli("inspect-vocab", "zoo:tiny-teacher", "zoo:tiny-student", "--text", str(empty))
    assert out.returncode == 1 and "empty" in out.stderr and "Traceback" not in out.stderr
    corrupt = tmp_path / "broken.tiktoken"
    corrupt.write_text("this is not base64 rank data\n")
    out = cli("inspect-vocab", str(corrupt), "zoo:tiny-student")
    assert out.returncode == 1 and "broken.tiktoken" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("error", ["internal", "user"])
def test_error_text_with_brackets_prints_as_it_is(monkeypatch, capsys, error):
    """An error whose text holds brackets (gloo's "[/pytorch/.../pair.cc:553]", a recipe's
    "[teacher]" table, "[/bold]") prints in its one line as it is: rich markup in it would
    otherwise raise MarkupError, and the user would get a traceback instead."""
    from genrecal_cli import cli as cli_module
    from genrecal_cli.errors import GenrecalError

    text = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer; [teacher] [/bold]"

    def broken(**kwargs):
        raise (RuntimeError(text) if error == "internal" else GenrecalError(text))

    monkeypatch.setattr(cli_module, "app", broken)
    with pytest.raises(SystemExit) as done:
        cli_module.main(["distill", "x.toml"])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
