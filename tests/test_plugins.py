"""Third-party experts and mixers: found through entry points, listed, checked and run like built-in ones.

``tests/plugins`` holds a package as an installed one looks to Python (its module and a ``.dist-info``
folder with ``entry_points.txt``). The commands run in a new process with that folder on the path, since
a registry reads the installed entry points once per process.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent / "plugins"


def ctxmix(*args: str, path: Path = PLUGINS) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), str(Path(__file__).resolve().parents[1])]))
    return subprocess.run([sys.executable, "-m", "ctxmix", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_third_party_expert_is_one_short_class_with_the_stepwise_pair_only():
    sys.path.insert(0, str(PLUGINS))
    try:
        import ctxmix_demo_plugin
    finally:
        sys.path.remove(str(PLUGINS))
    source = inspect.getsource(ctxmix_demo_plugin.BigramExpert)
    assert len(source.splitlines()) <= 40
    assert "score_chunk" not in source  # the engine's default chunked path comes from the stepwise pair


def test_entry_point_expert_and_mixer_are_listed_with_their_options_and_origin():
    done = ctxmix("list", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    bigram = next(e for e in found["experts"] if e["name"] == "bigram")
    equal = next(m for m in found["mixers"] if m["name"] == "equal")
    assert bigram["summary"] == "add-alpha bigram counts: p(v | previous token)"
    assert bigram["options"] == [{"name": "alpha", "default": "0.5", "help": "pseudo-count of every token"}]
    assert "ctxmix_demo_plugin:BigramExpert" in bigram["origin"] and "ctxmix-demo-plugin" in bigram["origin"]
    assert equal["summary"] == "the plain average of the experts" and "EqualMixer" in equal["origin"]


def test_entry_point_expert_and_mixer_pass_every_rule(text_dir):
    done = ctxmix("check", str(text_dir / "grammar.lsp"), "-e", "bigram", "-e", "bigram:alpha=0.1", "-m", "equal",
                  "-m", "cm", "--positions", "600", "--json", "--quiet")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    results = json.loads(done.stdout)["results"]
    subjects = {r["subject"] for r in results}
    assert {"expert bigram", "expert bigram:alpha=0.1", "mixer equal", "mixer cm"} <= subjects
    assert all(r["passed"] for r in results)


def test_entry_point_expert_mixes_with_builtin_ones(text_dir):
    done = ctxmix("score", str(text_dir / "grammar.lsp"), "-e", "bigram", "-e", "ngram", "-m", "none", "-m", "equal",
                  "-m", "cm", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    bpb = {row["label"].split(":")[0]: row["bpb"] for row in json.loads(done.stdout)["runs"]}
    assert set(bpb) == {"bigram", "ngram", "equal", "cm"}
    # cm reads the n-gram's order and the bigram expert provides no entropy: its contexts fall back, it still mixes
    assert bpb["cm"] < bpb["equal"]


@pytest.mark.parametrize("entry, message", [
    ("broken = ctxmix_no_such_module:Thing", "cannot load expert 'broken' (entry point broken = "
                                             "ctxmix_no_such_module:Thing (ctxmix-bad-plugin)) from "
                                             "ctxmix_no_such_module:Thing: ModuleNotFoundError"),
    ("broken = json:JSONDecoder", "json:JSONDecoder is not a subclass of ctxmix.experts.base.Expert"),
])
def test_a_plugin_that_cannot_load_is_one_line_and_listed_as_unavailable(tmp_path, text_dir, entry, message):
    info = tmp_path / "ctxmix_bad_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ctxmix-bad-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[ctxmix.experts]\n{entry}\n")
    done = ctxmix("score", str(text_dir / "grammar.lsp"), "-e", "broken", path=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr
    listed = ctxmix("list", "--json", path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    broken = next(e for e in json.loads(listed.stdout)["experts"] if e["name"] == "broken")
    assert message in broken["unavailable"]


def test_a_plugin_name_that_clashes_with_a_builtin_is_refused(tmp_path, text_dir):
    info = tmp_path / "ctxmix_clash-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ctxmix-clash\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[ctxmix.mixers]\nhedge = json:JSONDecoder\n")
    done = ctxmix("score", str(text_dir / "grammar.lsp"), "-e", "ngram", "-m", "hedge", path=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "mixer 'hedge' is registered twice (ctxmix and entry point hedge = json:JSONDecoder" in done.stderr
