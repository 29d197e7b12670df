"""``ctxmix-train``: prepare shards, train a recipe, check a recipe's artifact size.

    ctxmix-train prepare alice29.txt docs.jsonl --out data/ --val-fraction 0.1
    ctxmix-train run --recipe toy --data data/ --out model.ptz --max-minutes 5
    torchrun --standalone --nproc_per_node=8 -m ctxmix_train run --recipe record --data fineweb/ --out m.ptz
    ctxmix-train size --recipe record

Errors are one line on stderr (``error: ...``, exit status 1; under torchrun from rank 0 only); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys

import click

from ctxmix.cli import CtxmixGroup

from .config import RECIPES, resolve_config


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class TrainGroup(CtxmixGroup):
    """ctxmix's error handling (one line, exit 1; usage 2; Ctrl-C 130), printed by rank 0 only."""

    def report_error(self, message: str) -> None:
        if _rank() == 0:  # under torchrun every rank fails alike; one line is enough
            super().report_error(message)


@click.group(name="ctxmix-train", cls=TrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_obj
def cli(settings, debug: bool) -> None:
    """Train ctxmix's neural experts and write Parameter Golf artifacts (.ptz)."""
    settings.set_debug(debug)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Directory for the shards (created if missing).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of each input's tokens (its end) that goes to validation.")
@click.option("--tokenizer", "tokenization", default="challenge", show_default=True,
              type=click.Choice(["challenge", "text"]),
              help="challenge: sp1024 as the challenge's export runs it; text: ctxmix's lossless text mode.")
@click.option("--shard-tokens", default=100_000_000, show_default=True, type=int, help="Tokens per shard.")
@click.option("--shuffle-block", default=0, show_default=True, type=int,
              help="Write the training tokens as blocks of this many tokens in a seeded random order (0 = keep order).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --shuffle-block.")
@click.option("--force", is_flag=True, help="Replace shards already in --out.")
@click.option("--sp-model", default=None, metavar="FILE",
              help="SentencePiece .model to tokenize with instead of the shipped sp1024 (then train with "
                   "--set vocab_size=V --set tokenizer=FILE).")
def prepare(inputs, out_dir, val_fraction, tokenization, shard_tokens, shuffle_block, seed, force, sp_model) -> None:
    """Tokenize text or JSONL files ({"text": ...} per line) into train_*.bin / val_*.bin shards."""
    from .prepare import prepare as run_prepare

    result = run_prepare(list(inputs), out_dir, val_fraction, tokenization, shard_tokens, force, shuffle_block, seed,
                         sp_model)
    for f in result.files:
        click.echo(f"{f['path']}: {f['documents']} documents, {f['train_tokens']:,} train + {f['val_tokens']:,} val tokens")
    click.echo(f"wrote {len(result.train_shards)} train shard(s) ({result.train_tokens:,} tokens) and "
               f"{len(result.val_shards)} val shard(s) ({result.val_tokens:,} tokens) to {result.out_dir}")


def _config_options(fn):
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="Override one hyperparameter (repeatable); the key must exist and keep its type.")(fn)
    fn = click.option("--config", "config_file",
                      help="JSON or TOML table of overrides (data only; may name the recipe).")(fn)
    fn = click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
                      help="Starting hyperparameters (default: baseline, or the config file's recipe).")(fn)
    return fn


@cli.command()
@_config_options
@click.option("--data", "data_dir", required=True, help="Directory with train_*.bin and val_*.bin shards.")
@click.option("--out", "out_path", required=True, help="Artifact to write (.ptz).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (sets iterations).")
@click.option("--max-minutes", type=float, default=None,
              help="Wall-clock budget for training; the artifact is still written (sets max_wallclock_seconds).")
@click.option("--json-log", default=None, help="One JSON object per logged step.")
@click.option("--save-float", default=None, help="Also write the unquantized float32 state dict (torch.save).")
@click.option("--quiet", is_flag=True, help="No progress or log lines; only the summary.")
def run(recipe, config_file, sets, data_dir, out_path, steps, max_minutes, json_log, save_float, quiet) -> None:
    """Train a recipe on shards and write its artifact (single process or under torchrun)."""
    from .progress import JsonLog, MultiReporter, NullReporter, PlainReporter, RichReporter
    from .trainer import train

    cfg = resolve_config(recipe, config_file, sets, steps, max_minutes)
    reporter = NullReporter()
    if _rank() == 0:
        reporters = []
        if not quiet:
            interactive = sys.stdout.isatty() and sys.stderr.isatty()
            reporters.append(RichReporter() if interactive else PlainReporter())
        if json_log:
            log = JsonLog(json_log)
            log.event("config", {"kind": "config", **cfg.to_dict()})
            reporters.append(log)
        reporter = MultiReporter(*reporters)
    try:
        result = train(cfg, data_dir, out_path, reporter, save_float=save_float)
    finally:
        reporter.close()
    if _rank() == 0:
        click.echo(f"steps {result.steps}  train_time {result.train_seconds:.1f}s  params {result.params:,}")
        click.echo(f"val_bpb unigram {result.unigram.bpb:.4f}  model {result.final.bpb:.4f}  "
                   f"roundtrip {result.roundtrip.bpb:.4f}")
        click.echo(f"artifact {result.artifact_path} {result.artifact_bytes:,} bytes")


@cli.command("config")
@_config_options
def show_config(recipe, config_file, sets) -> None:
    """Print the resolved hyperparameters as JSON (what `run` would use)."""
    cfg = resolve_config(recipe, config_file, sets)
    click.echo(json.dumps(cfg.to_dict(), indent=2))


@cli.command()
def recipes() -> None:
    """List the recipes and their model shapes."""
    for name in RECIPES:
        cfg = resolve_config(name)
        click.echo(f"{name:11s} family={cfg.family} layers={cfg.num_layers} dim={cfg.model_dim} "
                   f"heads={cfg.num_heads}/{cfg.num_kv_heads} mlp={cfg.mlp_mult:g}x seq={cfg.train_seq_len} "
                   f"batch={cfg.train_batch_tokens:,} quant={cfg.quant}+{cfg.compressor}")


@cli.command()
@_config_options
@click.option("--weights", type=click.Choice(["gaussian", "laplace", "init"]), default="gaussian", show_default=True,
              help="gaussian: N(0,1) matrices (near worst case); laplace: heavier tails, closer to trained "
                   "weights; init: the recipe's initialization.")
def size(recipe, config_file, sets, weights) -> None:
    """Artifact bytes of a recipe's model shape with random weights (no training, nothing written)."""
    from .size import size_check

    cfg = resolve_config(recipe, config_file, sets)
    report = size_check(cfg, weights)
    verdict = "fits" if report.fits else "DOES NOT FIT"
    fit = report.fit
    if fit is not None:
        what = (f"pruned {fit.amount:.2%} of int6 values" if fit.method == "prune"
                else f"int6 steps widened x{1 + fit.amount:.4f}, {fit.changed_fraction:.2%} of int6 values changed")
        forced = " (forced by fit_force)" if fit.forced else ""
        click.echo(f"fit_to_cap={fit.method}: {fit.bytes_before:,} bytes before, {what}{forced}, "
                   f"{fit.bytes_after:,} after ({fit.compressions} compressions)")
    elif cfg.fit_to_cap != "off":
        click.echo(f"fit_to_cap={cfg.fit_to_cap}: nothing changed (already within the cap)")
    click.echo(f"params {report.params:,}  raw {report.raw_bytes:,} bytes  artifact {report.artifact_bytes:,} bytes "
               f"({cfg.quant}+{cfg.compressor}-{cfg.compress_level}, {weights} weights)  cap {report.cap_bytes:,}: {verdict}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``ctxmix-train``, ``python -m ctxmix_train``)."""
    cli.main(argv, prog_name="ctxmix-train")
