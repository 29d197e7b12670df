"""What the CLI prints: rich tables on stdout, or one JSON object with ``--json``.

Every function here takes a result the library returned (``Report``, ``check.CheckReport``, the
registries) and only formats it; nothing is computed here that the JSON or the Python API would not also
show. Numbers in tables are rounded for reading (bpb to 4 decimals); JSON keeps full float precision.

Two guards live here because every result passes through this layer on its way out:

- A score that is not a finite number is never printed: ``require_scores`` refuses it with one
  CtxmixError line (a bpb figure claims a code length; NaN or infinity claims nothing). The causes are
  fixed where the numbers are made; this is the last line that holds if one is missed.
- Names from outside (file names, trace names, specs) go through ``errors.printable``: control
  characters never reach the terminal raw, and undecodable bytes of a file name never make invalid JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import CtxmixError, printable
from .metric import bits_per_byte

TOTAL_FILE = "total"  # the ``file`` of the rows summed over several inputs (``total_rows``)
WIDE_OUTPUT = 10_000  # columns for a non-terminal stdout: table rows are never wrapped or cut in files and pipes


@dataclass
class Report:
    """A run's rows as the JSON report prints them, plus the per-stream results behind them (what
    ``ctxmix.score``, ``evaluate`` and ``mix`` return)."""

    runs: list[dict]  # {"label", "file", "tokens", "bytes", "bits", "bpb"}
    experts: list[str]
    mixers: list[str]
    results: list = field(default_factory=list)  # run.RunResult per stream
    streams: list = field(default_factory=list)  # the scored stream.Stream, in row order

    def to_dict(self) -> dict:
        from . import __version__

        return {"version": __version__, "experts": self.experts, "mixers": self.mixers, "runs": self.runs}


def rows_for(result) -> list[dict]:
    """The rows of one stream's ``run.RunResult``, one per label."""
    return [{"label": label, "file": result.name, "tokens": result.tokens, "bytes": result.nbytes, "bits": bits,
             "bpb": bits_per_byte(bits, result.nbytes)} for label, bits in result.bits.items()]


def total_rows(results) -> list[dict]:
    """One ``file: "total"`` row per label: bits and bytes summed over the streams."""
    rows = []
    for label in results[0].bits:
        tokens = sum(r.tokens for r in results)
        nbytes = sum(r.nbytes for r in results)
        bits = sum(r.bits[label] for r in results)
        rows.append({"label": label, "file": TOTAL_FILE, "tokens": tokens, "bytes": nbytes, "bits": bits,
                     "bpb": bits_per_byte(bits, nbytes)})
    return rows


def stdout_console() -> Console:
    """A console on stdout; off a terminal it is wide enough that every table row stays on one line."""
    console = Console(highlight=False)
    if console.is_terminal:
        return console
    return Console(highlight=False, width=WIDE_OUTPUT)


def _print(console: Console, renderable: Any) -> None:
    """Print; off a terminal without the cell padding at line ends, so files and pipes hold clean lines."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _json_value(value: Any) -> Any:
    """JSON has no NaN (a figure that does not apply, such as an overhead of zero bits): write null
    instead, so every reader can parse the output. Strings lose their lone surrogates (``printable``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return printable(value, controls=False)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _dumps(data: dict) -> str:
    return json.dumps(_json_value(data), indent=2, allow_nan=False)


def _shown(text: Any) -> Text:
    """A table cell from outside text: escapes for what must not reach the terminal, no markup."""
    return Text(printable(str(text)))


def _require_finite(what: str, bits: float, nbytes: int, bpb: float) -> None:
    if math.isfinite(bits) and math.isfinite(bpb):
        return
    if nbytes <= 0:
        raise CtxmixError(f"{what}: the scored tokens cover 0 bytes, so there is no bits per byte to report")
    raise CtxmixError(f"{what}: the score is not a finite number ({bits!r} bits over {nbytes} bytes); "
                      "refusing to print it as a result")


def require_scores(runs: list[dict]) -> None:
    """Refuse (one CtxmixError line) a run row whose bits or bpb is not a finite number."""
    for row in runs:
        _require_finite(f"{printable(row['label'])} on {printable(str(row['file']))}", row["bits"], row["bytes"],
                        row["bpb"])


# ---------------------------------------------------------------- runs (score, eval, mix)

def ordered_runs(runs: list[dict]) -> list[list[dict]]:
    """Rows grouped by file, files in first-seen order, the ``total`` rows last; labels keep their order."""
    groups: dict[str, list[dict]] = {}
    for row in runs:
        groups.setdefault(row["file"], []).append(row)
    totals = groups.pop(TOTAL_FILE, None)
    return list(groups.values()) + ([totals] if totals else [])


def _bpb_text(bpb: float) -> str:
    return f"{bpb:.4f}" if math.isfinite(bpb) else "n/a"


def print_report(report: Any, console: Console) -> None:
    """The run table: label, file, tokens, bytes, bits, bpb; one section per file, totals last."""
    require_scores(report.runs)
    table = Table(show_edge=False, pad_edge=False)
    # On a narrow terminal the label and file columns fold; the numbers are never cut.
    table.add_column("label", overflow="fold")
    table.add_column("file", overflow="fold")
    for name in ("tokens", "bytes", "bits", "bpb"):
        table.add_column(name, justify="right", no_wrap=True)
    groups = ordered_runs(report.runs)
    for i, rows in enumerate(groups):
        for row in rows:
            table.add_row(_shown(row["label"]), _shown(row["file"]), f"{row['tokens']:,}", f"{row['bytes']:,}",
                          f"{row['bits']:,.1f}", _bpb_text(row["bpb"]))
        if i < len(groups) - 1:
            table.add_section()
    _print(console, table)


def report_json(report: Any) -> str:
    """One JSON object: ``{"version", "experts", "mixers", "runs": [{label, file, tokens, bytes, bits, bpb}]}``."""
    require_scores(report.runs)
    return _dumps(report.to_dict())


# ---------------------------------------------------------------- check

def print_check(report: Any, console: Console) -> None:
    """One row per (rule, subject): pass or FAIL and what was measured; a verdict line after the table."""
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("rule", no_wrap=True)
    table.add_column("subject", overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for r in report.results:
        verdict = Text("pass") if r.passed else Text("FAIL", style="bold red")
        table.add_row(Text(r.rule), _shown(r.subject), verdict, _shown(r.detail))
    _print(console, table)
    failed = sum(not r.passed for r in report.results)
    if report.passed:
        console.print(f"all {len(report.results)} checks passed")
    else:
        console.print(f"[bold red]{failed} of {len(report.results)} checks failed[/]")


def check_json(report: Any) -> str:
    """``{"version", "passed", "results": [{rule, subject, passed, detail}]}``."""
    from . import __version__

    results = [{"rule": r.rule, "subject": r.subject, "passed": bool(r.passed), "detail": r.detail}
               for r in report.results]
    return _dumps({"version": __version__, "passed": bool(report.passed), "results": results})


# ---------------------------------------------------------------- list

NONE_SUMMARY = "no mixing: one row per expert alone"


def _entries(registry: Any) -> list[dict]:
    from .spec import option_help

    entries = []
    for name in registry.names():
        entry: dict[str, Any] = {"name": name, "summary": "", "options": []}
        if registry.origin(name) != "ctxmix":
            entry["origin"] = registry.origin(name)  # an installed package's entry point
        try:
            options_cls = getattr(registry.get(name), "Options", None)
        except CtxmixError as exc:
            # A backend whose dependency is missing, or a plugin that fails to load, is listed with the reason.
            entry["unavailable"] = str(exc)
        else:
            entry["options"] = [{"name": o, "default": d, "help": h} for o, d, h in option_help(options_cls)]
        entry["summary"] = registry.summary(name)  # (a plugin's docstring, now that it was loaded)
        entries.append(entry)
    return entries


def components() -> dict:
    """Registered experts and mixers: ``{"experts": [...], "mixers": [...]}``, each with its options."""
    from .components import NONE
    from .components import experts as expert_registry
    from .components import mixers as mixer_registry

    mixers = [{"name": NONE, "summary": NONE_SUMMARY, "options": []}] + _entries(mixer_registry)
    return {"experts": _entries(expert_registry), "mixers": mixers}


def components_json(found: dict) -> str:
    from . import __version__

    return _dumps({"version": __version__, **found})


def print_components(found: dict, console: Console) -> None:
    """One table per kind: a row per component (name, summary), then a row per option (key=default, help)."""
    for kind in ("experts", "mixers"):
        table = Table(title=kind, title_justify="left", box=None, pad_edge=False, show_header=False)
        table.add_column("name", no_wrap=True, style="bold")
        table.add_column("option", no_wrap=True)
        table.add_column("description")
        for entry in found[kind]:
            table.add_row(entry["name"], "", Text(entry["summary"]))
            if "origin" in entry:
                table.add_row("", "", Text(f"(from {entry['origin']})"))
            if "unavailable" in entry:
                table.add_row("", "", Text(f"(options unavailable: {entry['unavailable']})"))
            for option in entry["options"]:
                table.add_row("", Text(f"{option['name']}={option['default']}"), Text(option["help"]))
        _print(console, table)
        console.print()
    console.print(Text("spec grammar: name:key=value,key=value  (e.g. ngram:orders=2-6  hedge:eta=2  fixed:0.7,0.3)"))


# ---------------------------------------------------------------- compress, decompress

def _require_compress_scores(result: Any) -> None:
    where = f"compress {printable(result.file)}"
    _require_finite(where, 8.0 * result.file_bytes, result.input_bytes, result.bpb)
    _require_finite(where, result.bits, result.input_bytes, result.model_bpb)


def compress_line(result: Any) -> str:
    _require_compress_scores(result)
    return (f"{printable(result.file)} -> {printable(result.out)}: {result.input_bytes:,} -> {result.file_bytes:,} bytes, "
            f"{result.bpb:.4f} bpb (the run's bits: {result.model_bpb:.4f} bpb; coder overhead "
            f"{100 * result.overhead:.3f}%, header {result.header_bytes} bytes; {result.lanes} lane"
            f"{'s' if result.lanes != 1 else ''}, {result.input_bytes / max(result.seconds, 1e-9) / 1000:,.1f} kB/s)")


def compress_json(result: Any) -> str:
    _require_compress_scores(result)
    return _dumps(result.to_dict())


def decompress_line(result: Any) -> str:
    return (f"{printable(result.file)} -> {printable(result.out)}: {result.output_bytes:,} bytes, checksum ok "
            f"({result.lanes} lane{'s' if result.lanes != 1 else ''}, "
            f"{result.output_bytes / max(result.seconds, 1e-9) / 1000:,.1f} kB/s)")


def decompress_json(result: Any) -> str:
    return _dumps(result.to_dict())


# ---------------------------------------------------------------- info (artifacts)

def print_info(found: dict, console: Console) -> None:
    table = Table(title=_shown(found["path"]), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in found.items():
        if key in ("path", "meta"):
            continue
        if key == "fits_cap":
            value = Text("yes", style="green") if value else Text("NO", style="red")
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, value if isinstance(value, Text) else _shown(value))
    _print(console, table)


def info_json(found: dict) -> str:
    return _dumps(found)


# ---------------------------------------------------------------- bench

def _require_bench_scores(result: Any) -> None:
    for f in result.figures:
        if not math.isfinite(f.bpb):
            raise CtxmixError(f"bench {printable(f.file)}, {printable(f.name)}: bpb {f.bpb!r} is not a finite number; "
                              "refusing to print it as a result")


def print_bench(result: Any, console: Console) -> None:
    _require_bench_scores(result)
    console.print(f"machine: {result.machine}", highlight=False)
    speed = Table(title="experts, fast path (after JIT warm-up; medians)")
    for column in ("expert", "input", "tokens", "tokens/s", "table MB", "stored entries", "bytes/entry"):
        speed.add_column(column, justify="left" if column in ("expert", "input") else "right")
    for s in result.speeds:
        speed.add_row(_shown(s.spec), _shown(s.input), f"{s.tokens:,}", f"{s.tokens_per_s:,.0f}", f"{s.memory_bytes / 1e6:.1f}",
                      f"{s.stored_entries:,}" if s.stored_entries else "-",
                      f"{s.bytes_per_entry:.1f}" if s.bytes_per_entry else "-")
    _print(console, speed)
    if result.figures:
        table = Table(title="bits per byte and compression speed (medians)")
        for column in ("file", "compressor", "bpb", "MB/s"):
            table.add_column(column, justify="left" if column in ("file", "compressor") else "right")
        for f in result.figures:
            table.add_row(_shown(f.file), _shown(f.name), f"{f.bpb:.4f}", f"{f.mb_per_s:.3f}")
        _print(console, table)


def bench_json(result: Any) -> str:
    _require_bench_scores(result)
    return _dumps(result.to_dict())
