"""The command line: real files in, the library's numbers out, and every error as one line on stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from rich.console import Console

import ctxmix
import ctxmix.check
from ctxmix.check import RULES
from ctxmix.cli import cli
from ctxmix.progress import ProgressDisplay, progress_display

from fixtures.data import SMOKE_SHARD, TEXT

REPO = Path(__file__).resolve().parents[1]
SMALL_TEXT = TEXT / "grammar.lsp"  # 3,721 bytes of ASCII LISP
LOG2_V = 10.0  # log2(1024): the uniform expert's bits per token, exactly representable

UNIFORM = ["--expert", "uniform", "--mixer", "none"]


def invoke(*args: str | os.PathLike):
    return CliRunner().invoke(cli, [os.fspath(a) for a in args])


def json_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout must be one JSON object


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of a printed run table, as stripped cells (header and rule lines dropped)."""
    return [[cell.strip() for cell in line.split("│")] for line in stdout.splitlines() if "│" in line]


def assert_one_line_error(result, *fragments: str, exit_code: int = 1) -> str:
    """The error contract: exit status, nothing on stdout, exactly one ``error: ...`` line on stderr."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ---------------------------------------------------------------- version, list

def test_version_prints_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"ctxmix {ctxmix.__version__}\n"


def test_list_shows_registered_experts_and_mixers_with_options():
    data = json_of(invoke("list", "--json"))
    experts = {e["name"]: e for e in data["experts"]}
    mixers = {m["name"]: m for m in data["mixers"]}
    assert {"uniform", "unigram", "ngram", "neural"} <= set(experts)
    assert {"none", "hedge"} <= set(mixers)
    assert "orders" in {o["name"] for o in experts["ngram"]["options"]}
    table = invoke("list")
    assert table.exit_code == 0
    assert "ngram" in table.stdout and "orders=" in table.stdout


# ---------------------------------------------------------------- score

def test_score_uniform_costs_exactly_ten_bits_per_token():
    data = json_of(invoke("score", SMALL_TEXT, *UNIFORM, "--json"))
    (row,) = data["runs"]
    assert row["label"] == "uniform"
    assert row["bytes"] == SMALL_TEXT.stat().st_size  # text mode counts the file's real bytes
    assert row["tokens"] > 0
    assert row["bits"] == LOG2_V * row["tokens"]
    assert row["bpb"] == LOG2_V * row["tokens"] / row["bytes"]
    assert data["experts"] == ["uniform"] and data["version"] == ctxmix.__version__


def test_score_json_rows_equal_library_rows_with_default_experts_and_mixers():
    data = json_of(invoke("score", SMALL_TEXT, "--json"))
    report = ctxmix.score([str(SMALL_TEXT)])
    assert data["runs"] == report.runs
    assert data["experts"] == report.experts and data["mixers"] == report.mixers
    labels = [row["label"] for row in data["runs"]]
    assert len(labels) == 3 and labels[0] == "neural:model=default" and labels[1].startswith("ngram")
    assert labels[2] == "cm"


def test_score_table_shows_the_json_figures_to_four_decimals():
    rows = json_of(invoke("score", SMALL_TEXT, "--expert", "uniform", "--expert", "unigram", "--json"))["runs"]
    table = invoke("score", SMALL_TEXT, "--expert", "uniform", "--expert", "unigram")
    assert table.exit_code == 0 and table.stderr == ""
    printed = table_rows(table.stdout)
    assert [cells[0] for cells in printed] == [row["label"] for row in rows]
    for cells, row in zip(printed, rows):
        assert cells == [row["label"], row["file"], f"{row['tokens']:,}", f"{row['bytes']:,}", f"{row['bits']:,.1f}",
                         f"{row['bpb']:.4f}"]


def test_score_several_files_adds_total_rows_last():
    files = [TEXT / "grammar.lsp", TEXT / "xargs.1"]
    runs = json_of(invoke("score", *files, *UNIFORM, "--json"))["runs"]
    assert [row["file"] for row in runs] == [str(files[0]), str(files[1]), "total"]
    total = runs[-1]
    assert total["tokens"] == runs[0]["tokens"] + runs[1]["tokens"]
    assert total["bytes"] == sum(f.stat().st_size for f in files)
    assert total["bpb"] == LOG2_V * total["tokens"] / total["bytes"]
    table = invoke("score", *files, *UNIFORM)
    assert table_rows(table.stdout)[-1][:2] == ["uniform", "total"]


def test_save_trace_refuses_several_files(tmp_path):
    result = invoke("score", TEXT / "grammar.lsp", TEXT / "xargs.1", *UNIFORM, "--save-trace", tmp_path / "t")
    assert_one_line_error(result, "--save-trace", "2")
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- eval

def test_eval_on_smoke_shard_matches_library(tmp_path):
    args = ["--shard", SMOKE_SHARD, "--max-tokens", "2000", "--expert", "unigram", "--mixer", "none"]
    data = json_of(invoke("eval", *args, "--json"))
    report = ctxmix.evaluate(str(SMOKE_SHARD), experts=["unigram"], mixers=["none"], max_tokens=2000)
    assert data["runs"] == report.runs
    (row,) = data["runs"]
    assert 1999 <= row["tokens"] <= 2000 and row["bytes"] > row["tokens"]
    assert 0 < row["bpb"] < LOG2_V * row["tokens"] / row["bytes"]


def test_eval_with_no_arguments_scores_the_shipped_sample():
    result = invoke("eval", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    header = [cell.strip() for cell in result.stdout.splitlines()[0].split("┃")]
    assert header == ["label", "file", "tokens", "bytes", "bits", "bpb"]
    rows = table_rows(result.stdout)
    labels = [cells[0] for cells in rows]
    assert labels == ["neural:model=default", "ngram:orders=2-11,table=exact", "cm"]
    bpb = [float(cells[-1]) for cells in rows]
    assert bpb[2] < 0.9 * min(bpb[:2])  # the default mix pays: 2.05 against 2.47 and 2.59 (docs/mixing.md)


# ---------------------------------------------------------------- save-trace, mix

def test_saved_trace_mixed_again_gives_the_live_run_rows(tmp_path):
    trace = tmp_path / "grammar.trace"
    experts = ["--expert", "unigram", "--expert", "ngram:orders=2-4"]
    live = json_of(invoke("score", SMALL_TEXT, *experts, "--mixer", "none", "--mixer", "hedge", "--json",
                          "--save-trace", trace))
    assert trace.is_file()
    replay = json_of(invoke("mix", "--trace", trace, "--mixer", "none", "--mixer", "hedge", "--json"))
    assert replay["runs"] == live["runs"]
    assert replay["experts"] == live["experts"]
    shard_trace = tmp_path / "smoke.trace"
    invoke("eval", "--shard", SMOKE_SHARD, "--max-tokens", "500", "--expert", "unigram", "--quiet",
           "--save-trace", shard_trace)
    assert table_rows(invoke("mix", "--trace", shard_trace, "--mixer", "none").stdout)[0][0] == "unigram"


def test_mix_refuses_a_file_that_is_not_a_trace(tmp_path):
    not_trace = tmp_path / "notes.trace"
    not_trace.write_text("hello\n")
    assert_one_line_error(invoke("mix", "--trace", not_trace, "--mixer", "hedge"), "notes.trace")


# ---------------------------------------------------------------- check

def test_check_exits_zero_when_every_rule_holds():
    data = json_of(invoke("check", SMALL_TEXT, "-e", "unigram", "-e", "ngram:orders=2-4", "-m", "hedge",
                          "--positions", "300", "--json"))
    assert data["passed"] is True
    assert {r["subject"] for r in data["results"]} == {"expert unigram", "expert ngram:orders=2-4,table=exact",
                                                       "mixer hedge"}
    assert {r["rule"] for r in data["results"]} == set(RULES)


def test_check_fails_with_exit_one_on_the_target_hashed_cache(monkeypatch):
    # The PR #909 cache is a test fixture, not a registered expert: hand it to the real check_all.
    from fixtures.target_hashed_cache import TargetHashedCache

    real_check_all = ctxmix.check.check_all

    def with_broken_cache(stream, experts, mixers, **options):
        return real_check_all(stream, [*experts, lambda: TargetHashedCache(vocab_size=stream.vocab_size)], mixers,
                              **options)

    monkeypatch.setattr("ctxmix.check.check_all", with_broken_cache)
    result = invoke("check", SMALL_TEXT, "-e", "unigram", "-m", "hedge", "--positions", "300", "--quiet")
    assert result.exit_code == 1 and result.stderr == ""
    failed = {(cells[0], cells[1]) for cells in table_rows(result.stdout) if cells[2] == "FAIL"}
    assert ("normalized", "expert target_hashed_cache") in failed
    assert ("normalized", "expert unigram") not in failed
    assert "checks failed" in result.stdout.splitlines()[-1]


# ---------------------------------------------------------------- errors

def test_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "no_such.txt"
    assert_one_line_error(invoke("score", missing, *UNIFORM), "no_such.txt")


def test_empty_file_is_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_one_line_error(invoke("score", empty, *UNIFORM), "empty.txt")


def test_non_utf8_file_is_one_line():
    assert_one_line_error(invoke("score", TEXT / "cp.html", *UNIFORM), "cp.html")


def test_unknown_expert_suggests_close_match():
    line = assert_one_line_error(invoke("score", SMALL_TEXT, "--expert", "ngarm"), "ngarm")
    assert "did you mean ngram" in line


def test_unknown_mixer_is_one_line():
    assert_one_line_error(invoke("score", SMALL_TEXT, "--mixer", "blender"), "unknown mixer", "blender")


def test_bad_option_value_is_one_line():
    assert_one_line_error(invoke("score", SMALL_TEXT, "--expert", "ngram:orders=x"), "orders")


def test_bad_shard_header_is_one_line(tmp_path):
    shard = tmp_path / "bad_val_000000.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240519, 1, 16)  # wrong magic (the challenge's is 20240520)
    shard.write_bytes(header.tobytes() + np.arange(16, dtype="<u2").tobytes())
    assert_one_line_error(invoke("eval", "--shard", shard, "--max-tokens", "8", "--quiet"), "bad_val_000000.bin")


def test_usage_error_keeps_click_exit_code_and_is_one_line():
    assert_one_line_error(invoke("score"), "Missing argument", "ctxmix score --help", exit_code=2)
    assert_one_line_error(invoke("score", SMALL_TEXT, "--chunk-size", "0"), "--chunk-size", exit_code=2)
    assert_one_line_error(invoke("frobnicate"), "frobnicate", exit_code=2)


def test_unexpected_exception_is_one_line_and_debug_shows_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("kernel exploded\nsecond line")

    monkeypatch.setattr("ctxmix.api.score", broken)
    line = assert_one_line_error(invoke("score", SMALL_TEXT))
    assert line == "error: internal error: ValueError: kernel exploded second line (run with --debug for the traceback)"
    debug = invoke("--debug", "score", SMALL_TEXT)
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1].startswith("error: internal error")


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ctxmix.api.score", interrupted)
    assert invoke("score", SMALL_TEXT).exit_code == 130


def test_python_m_ctxmix_error_has_no_traceback_unless_debug(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    missing = str(tmp_path / "absent.txt")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ctxmix", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    plain = run("score", missing, "--expert", "uniform")
    assert plain.returncode == 1 and plain.stdout == ""
    assert len(plain.stderr.splitlines()) == 1 and plain.stderr.startswith("error: ")
    assert "absent.txt" in plain.stderr and "Traceback" not in plain.stderr
    debug = run("--debug", "score", missing, "--expert", "uniform")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1] == plain.stderr.strip()


# ---------------------------------------------------------------- progress

def test_progress_is_off_when_quiet_or_not_a_terminal():
    with progress_display(quiet=True, console=Console(file=StringIO(), force_terminal=True)) as progress:
        assert progress is None
    with progress_display(quiet=False, console=Console(file=StringIO(), force_terminal=False)) as progress:
        assert progress is None


def test_progress_draws_only_after_the_delay_and_is_erased():
    short = StringIO()
    display = ProgressDisplay(Console(file=short, force_terminal=True), show_after_s=3600.0)
    display("alice29.txt", 10, 100)
    display.close()
    assert short.getvalue() == ""  # work shorter than the delay prints nothing
    long = StringIO()
    display = ProgressDisplay(Console(file=long, force_terminal=True, width=100), show_after_s=0.0)
    display("alice29.txt", 10, 100)
    display("alice29.txt", 100, 100)
    display.close()
    assert "alice29.txt" in long.getvalue() and "100/100" in long.getvalue()


# ---------------------------------------------------------------- README and CI

def test_readme_python_example_runs(capsys):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    example = example.replace('"alice29.txt"', repr(str(TEXT / "alice29.txt")))
    exec(compile(example, "README.md", "exec"), {})  # the repository's own documentation, not user input
    labels = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(labels) == 3 and labels[0] == "unigram" and labels[1].startswith("ngram") and labels[2] == "cm"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    (install_and_test,) = [line for line in readme.splitlines() if "python -m pytest" in line]
    ci = (REPO / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()  # word for word, torch pinned before the package
    assert install_and_test.index("torch==2.13.0") < install_and_test.index("-e '.[test]'")
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    # ... run in a copy of the repository with nothing beside it
    assert ci.index("mktemp -d") < ci.index('cd "$work"') < ci.index(install_and_test)
