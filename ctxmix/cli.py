"""The ``ctxmix`` command line: thin click commands over the library.

Each command parses its options, calls one library function and hands the result to ``report``.
Errors are turned into one line on stderr in exactly one place, ``CtxmixGroup.main``:

  CtxmixError          ``error: <message>``, exit 1
  click usage error    ``error: <message> (see 'ctxmix CMD --help')``, exit 2 (click's own status)
  anything else        ``error: internal error: <type>: <message> (run with --debug ...)``, exit 1
  Ctrl-C               exit 130

``ctxmix --debug CMD ...`` also prints the traceback, and shows numpy's floating-point RuntimeWarnings,
which are otherwise kept off stderr: they would add lines to the one-line contract, and a result they
could stand for (a score that is not finite) is refused in one line anyway (``report.require_scores``).
Heavy modules (numba kernels, torch) are imported
inside the commands, so ``ctxmix --version`` and ``--help`` stay instant.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import click

from . import __version__
from .errors import CtxmixError, printable

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


@dataclass
class Settings:
    """Group-level options, filled by the group callback and read back by the error handler."""

    debug: bool = False

    def set_debug(self, debug: bool) -> None:
        """``--debug``: tracebacks of errors, and numpy's RuntimeWarnings shown as Python shows them."""
        self.debug = debug
        if debug:
            warnings.simplefilter("default", RuntimeWarning)


def _one_line(text: Any) -> str:
    return printable(" ".join(str(text).split()))


def _error(message: str) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)


class CtxmixGroup(click.Group):
    """A click group whose ``main`` owns all error reporting (also under click's ``CliRunner``).

    ``ctxmix-train`` uses it too, overriding ``report_error`` so that only rank 0 prints under torchrun.
    """

    def report_error(self, message: str) -> None:
        _error(message)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        settings = extra.setdefault("obj", Settings())
        code = 0
        try:
            with warnings.catch_warnings():  # see the module docstring; set_debug shows them again
                warnings.simplefilter("ignore", RuntimeWarning)
                code = super().main(args, prog_name or self.name, complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except click.exceptions.NoArgsIsHelpError as exc:  # bare ``ctxmix``: the help is the answer
            exc.show()
            code = exc.exit_code
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else self.name
            self.report_error(f"{exc.format_message().rstrip('.')} (see '{command} --help')")
            code = exc.exit_code
        except click.ClickException as exc:
            self.report_error(exc.format_message())
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            self.report_error("interrupted")
            code = EXIT_INTERRUPTED
        except CtxmixError as exc:
            if settings.debug:
                traceback.print_exc()
            self.report_error(str(exc))
            code = EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - the one place where unexpected failures are reported
            if settings.debug:
                traceback.print_exc()
                self.report_error(f"internal error: {type(exc).__name__}: {exc}")
            else:
                self.report_error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
            code = EXIT_ERROR
        if standalone_mode:
            sys.exit(code)
        return code


# Options shared by the scoring commands.
def _expert_option(f):
    return click.option("--expert", "-e", "experts", multiple=True, metavar="SPEC",
                        help="Expert spec, repeatable (default: neural (the shipped model) and ngram). See 'ctxmix list'.")(f)


def _mixer_option(f):
    return click.option("--mixer", "-m", "mixers", multiple=True, metavar="SPEC",
                        help="Mixer spec, repeatable; 'none' reports each expert alone (default: none and cm).")(f)


def _neural_options(f):
    """The neural expert's window options, shared by score and eval (added to every neural spec that does
    not set them)."""
    for option in reversed([
        click.option("--stride", type=click.IntRange(min=1), default=None, help="Neural sliding-window stride."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Neural windows per forward pass."),
        click.option("--device", default=None, help="Neural expert device (cpu, cuda, cuda:1, ...)."),
        click.option("--window", type=click.IntRange(min=1), default=None,
                     help="Neural context window (default: the artifact's training length, else 1024)."),
    ]):
        f = option(f)
    return f


def _neural_kwargs(stride, batch_size, device, window) -> dict:
    # Neural options reach the api only when given, so runs without them need no neural support.
    return {k: v for k, v in (("stride", stride), ("batch_size", batch_size), ("device", device),
                              ("window", window)) if v is not None}


def _tokenizer_option(help_text: str):
    return click.option("--tokenizer", type=click.Path(), default=None, metavar="FILE|DIR", help=help_text)


TOKENIZER_HELP = ("SentencePiece .model file (any vocabulary up to 65,536) or Hugging Face model directory that "
                  "tokenizes the run (default: the shipped sp1024, or the tokenizer of an hf expert).")


def _run_options(f):
    for option in reversed([
        click.option("--model", type=click.Path(dir_okay=False), default=None,
                     help="Parameter Golf artifact (.ptz): adds the neural expert first."),
        _tokenizer_option(TOKENIZER_HELP),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table."),
        click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr."),
        click.option("--save-trace", type=click.Path(dir_okay=False), default=None,
                     help="Save per-position expert outputs, for 'ctxmix mix' (one input only)."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                     help="Positions per engine step (trades memory for speed; default: the engine's)."),
        click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                     help="Draw bits per byte along the stream and mixer weights to a PNG (needs matplotlib)."),
        click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a one-page HTML report: the table and the plot."),
    ]):
        f = option(f)
    return _expert_option(_mixer_option(f))


@click.group(name="ctxmix", cls=CtxmixGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="ctxmix", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_obj
def cli(settings: Settings, debug: bool) -> None:
    """Score text with mixes of neural and n-gram experts, in bits per byte, and check that the
    figures are real (causal, normalized, scored before update)."""
    settings.set_debug(debug)


def _run_inputs(files: Sequence[str], model: str | None, experts: Sequence[str], tokenizer: str | None = None) -> list[str]:
    """What a run reads, which no output may replace: its files, its shard matches, model artifacts and
    the tokenizer."""
    import glob

    from .spec import split_spec

    found = []
    for name in files:
        found += [name] + glob.glob(name)
    found += [path for path in (model, tokenizer) if path is not None]
    for spec in experts:
        items = split_spec(spec)[1] if spec.strip() else []
        found += [value.strip() for key, _, value in (item.partition("=") for item in items)
                  if key.strip() in ("model", "path")]
    return found


def _check_run_outputs(inputs: list[str], *outputs: str | None) -> None:
    """Refuse a bad output (a device, the input itself) before the run, not after minutes of it."""
    from .atomic import check_outputs

    check_outputs(outputs, inputs)


def _finish(report: Any, as_json: bool, trace_path: str | None, plot_path: str | None, html_path: str | None) -> None:
    """A finished run: refuse a non-finite score, then write the outputs asked for, then print."""
    from .report import require_scores

    require_scores(report.runs)
    _save_outputs(report, trace_path, plot_path, html_path)
    _emit(report, as_json)


def _emit(report: Any, as_json: bool) -> None:
    from .report import print_report, report_json, stdout_console

    if as_json:
        click.echo(report_json(report))
    else:
        print_report(report, stdout_console())


def _save_outputs(report: Any, trace_path: str | None, plot_path: str | None, html_path: str | None) -> None:
    """Write what was asked for beside the table: the trace, the plot, the HTML page (each atomically)."""
    if trace_path is not None:
        from .trace import save_trace

        save_trace(trace_path, report.results[0], report.streams[0], report.experts)
    if plot_path is not None:
        from .plot import plot_report

        plot_report(report, plot_path)
    if html_path is not None:
        from .html_report import write_html

        write_html(report, html_path, plot_path)


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...", type=click.Path(dir_okay=False))
@_neural_options
@_run_options
def score(files, stride, batch_size, device, window, experts, mixers, model, tokenizer, as_json, quiet, save_trace,
          chunk_size, plot_path, html_path):
    """Score text FILEs (UTF-8, tokenized losslessly; bpb over the files' real bytes)."""
    from .api import score as score_files
    from .progress import progress_display

    if save_trace and len(files) > 1:
        raise CtxmixError(f"--save-trace takes one input file, {len(files)} were given")
    _check_run_outputs(_run_inputs(files, model, experts, tokenizer), save_trace, plot_path, html_path)
    with progress_display(quiet) as progress:
        report = score_files(list(files), list(experts) or None, list(mixers) or None, model=model,
                             keep_trace=save_trace is not None, keep_bits=bool(plot_path or html_path),
                             chunk_size=chunk_size, progress=progress, tokenizer=tokenizer,
                             **_neural_kwargs(stride, batch_size, device, window))
    if report is None:  # a torchrun rank other than 0: rank 0 prints the table
        return
    _finish(report, as_json, save_trace, plot_path, html_path)


@cli.command(name="eval")
@click.option("--shard", "shards", multiple=True, metavar="GLOB",
              help="Parameter Golf token shard(s), repeatable; default: the sample text shipped in the package.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score only the first N tokens.")
@click.option("--bytes", "token_bytes", multiple=True, metavar="GLOB",
              help="Per-token byte counts in shard format, one per token of --shard (a CaseOps "
                   "fineweb_val_bytes_*.bin sidecar); used instead of the tokenizer's piece counts.")
@_neural_options
@_run_options
def evaluate(shards, max_tokens, token_bytes, stride, batch_size, device, window, experts, mixers, model, tokenizer,
             as_json, quiet, save_trace, chunk_size, plot_path, html_path):
    """Score validation shards (bytes counted as Parameter Golf counts them)."""
    from .api import evaluate as evaluate_shards
    from .progress import progress_display

    neural = _neural_kwargs(stride, batch_size, device, window)
    _check_run_outputs(_run_inputs(shards + token_bytes, model, experts, tokenizer), save_trace, plot_path, html_path)
    with progress_display(quiet) as progress:
        report = evaluate_shards(_shard_arg(shards), model, list(experts) or None, list(mixers) or None,
                                 max_tokens=max_tokens, keep_trace=save_trace is not None,
                                 keep_bits=bool(plot_path or html_path), chunk_size=chunk_size,
                                 progress=progress, tokenizer=tokenizer, token_bytes=_shard_arg(token_bytes),
                                 **neural)
    if report is None:  # a torchrun rank other than 0: rank 0 prints the table
        return
    _finish(report, as_json, save_trace, plot_path, html_path)


def _shard_arg(shards: tuple[str, ...]) -> str | list[str] | None:
    if not shards:
        return None
    return shards[0] if len(shards) == 1 else list(shards)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_expert_option
@_mixer_option
@click.option("--positions", type=click.IntRange(min=1), default=None,
              help="Scored positions to check (default: the library's choice).")
@_tokenizer_option(TOKENIZER_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
@click.pass_context
def check(ctx, file, experts, mixers, positions, tokenizer, as_json, quiet):
    """Check the four rules on FILE for each expert and mixer; exit 0 only when every rule holds."""
    from .check import check_all
    from .components import run_text_options, run_tokenizer
    from .data import load_text
    from .progress import progress_display
    from .report import check_json, print_check, stdout_console

    options = {"positions": positions} if positions is not None else {}
    specs = list(experts) or None
    stream = load_text(file, run_tokenizer(specs, tokenizer), **run_text_options(specs))
    with progress_display(quiet) as progress:
        result = check_all(stream, list(experts) or None, list(mixers) or None, progress=progress, **options)
    if as_json:
        click.echo(check_json(result))
    else:
        print_check(result, stdout_console())
    ctx.exit(0 if result.passed else EXIT_ERROR)


@cli.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False),
              help="A trace written by --save-trace.")
@click.option("--mixer", "-m", "mixers", multiple=True, required=True, metavar="SPEC",
              help="Mixer spec, repeatable; 'none' reports each expert alone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
def mix(trace_path, mixers, as_json, quiet):
    """Score linear mixers on a saved trace (the experts are not run again)."""
    from .api import mix as mix_trace
    from .progress import progress_display

    with progress_display(quiet) as progress:
        report = mix_trace(trace_path, list(mixers), progress=progress)
    _finish(report, as_json, None, None, None)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table.")
def list_components(as_json):
    """List the registered experts and mixers with their options."""
    from .report import components, components_json, print_components, stdout_console

    found = components()
    if as_json:
        click.echo(components_json(found))
    else:
        print_components(found, stdout_console())


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", "out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default FILE.cmx; an existing default is not replaced).")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="Parameter Golf artifact (.ptz): adds the neural expert first.")
@_expert_option
@click.option("--mixer", "-m", "mixers", multiple=True, metavar="SPEC",
              help="One mixer spec (default: cm); 'none' with exactly one expert.")
@_tokenizer_option(TOKENIZER_HELP + " Its path and sha256 are recorded in the file.")
@click.option("--lanes", type=click.IntRange(min=1), default=None,
              help="Segments coded in lockstep, with batched model calls (default: from the length, up to 128; "
                   "1 when an expert or the mixer cannot run lanes). 1 codes with score's own distributions, so the "
                   "file's size proves the score. Recorded in the file.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of the coding loop (default 1): groups of lanes side by side, or torch's threads on one lane; the decoder runs the same number. Recorded in the file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
def compress(file, out, model, experts, mixers, tokenizer, lanes, threads, as_json, quiet):
    """Compress a text FILE with the experts' mixed predictions (range coding): the proof of a bpb figure."""
    from .codec import compress as compress_file
    from .progress import progress_display
    from .report import compress_json, compress_line

    with progress_display(quiet, unit="bytes") as progress:
        result = compress_file(file, out, experts=list(experts) or None, mixers=list(mixers) or None, model=model,
                               tokenizer=tokenizer, progress=progress, lanes=lanes, threads=threads)
    click.echo(compress_json(result) if as_json else compress_line(result))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", "out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: FILE without .cmx; an existing default is not replaced).")
@click.option("--model", type=click.Path(), default=None,
              help="Where the model artifact (or hf model directory) is now, if it moved (its sha256 must match).")
@_tokenizer_option("Where the tokenizer the file was made with is now, if it moved (its sha256 must match).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of the coding loop: must equal the number the file records (the default uses it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
def decompress(file, out, model, tokenizer, threads, as_json, quiet):
    """Decompress a .cmx FILE (checked against the original's sha256 before anything is written)."""
    from .codec import decompress as decompress_file
    from .progress import progress_display
    from .report import decompress_json, decompress_line

    with progress_display(quiet, unit="bytes") as progress:
        result = decompress_file(file, out, model=model, tokenizer=tokenizer, progress=progress, threads=threads)
    click.echo(decompress_json(result) if as_json else decompress_line(result))


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table.")
def info(artifact, as_json):
    """Describe a Parameter Golf artifact: family, shape, format, sizes, and the 16,000,000-byte cap."""
    from .models import describe
    from .report import info_json, print_info, stdout_console

    found = describe(artifact)
    if as_json:
        click.echo(info_json(found))
    else:
        print_info(found, stdout_console())


@cli.command()
@click.argument("files", nargs=-1, metavar="[FILE...]", type=click.Path(dir_okay=False))
@click.option("--expert", "-e", "experts", multiple=True, metavar="SPEC",
              help="Expert spec to time, repeatable (default: ngram:orders=2-11,table=exact).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, help="Runs per figure (the median is reported).")
@click.option("--compressors/--no-compressors", default=True,
              help="Also compare n-gram-only ctxmix with xz, zstd, bzip2 and PPMd on the files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the tables.")
def bench(files, experts, repeats, compressors, as_json):
    """Time experts (tokens/s, table memory) and compare with classical compressors on FILEs
    (default: the sample text shipped in the package)."""
    from .bench import run_bench
    from .report import bench_json, print_bench, stdout_console

    result = run_bench(list(files), list(experts) or None, repeats=repeats, compressors=compressors)
    if as_json:
        click.echo(bench_json(result))
    else:
        print_bench(result, stdout_console())


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``ctxmix``) and ``python -m ctxmix``."""
    cli.main(argv, prog_name="ctxmix")
