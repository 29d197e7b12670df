"""Where a run's progress goes: a rich bar on a terminal, plain lines otherwise, and a JSON-lines log.

The trainer never prints; it calls a ``Reporter``. Only rank 0 gets a real one (the others get
``NullReporter``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import IO, Any

from ctxmix.errors import CtxmixError


@dataclass
class StepRecord:
    step: int  # optimizer steps done
    total: int  # planned steps (iterations)
    elapsed_s: float  # training time so far (validation excluded)
    tokens_per_s: float  # global tokens per second of training time
    lr_scale: float
    eta_s: float | None  # time to the step or wall-clock limit, whichever comes first
    train_loss: float | None = None  # mean loss of this step (only on logged steps)
    val_loss: float | None = None
    val_bpb: float | None = None

    def line(self) -> str:
        parts = [f"step:{self.step}/{self.total}"]
        if self.train_loss is not None:
            parts.append(f"train_loss:{self.train_loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val_loss:{self.val_loss:.4f} val_bpb:{self.val_bpb:.4f}")
        parts.append(f"train_time:{self.elapsed_s * 1000:.0f}ms step_avg:{self.elapsed_s * 1000 / max(self.step, 1):.2f}ms")
        parts.append(f"tok/s:{self.tokens_per_s:,.0f}")
        return " ".join(parts)


class Reporter:
    """Base: ignores everything. ``step`` is called every step, ``logged`` true on log/val steps."""

    def start(self, total_steps: int) -> None: ...

    def step(self, record: StepRecord, logged: bool) -> None: ...

    def event(self, message: str, data: dict[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


NullReporter = Reporter


class PlainReporter(Reporter):
    """Log lines on a stream (stdout off a terminal): the challenge's ``step:...`` format."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout

    def step(self, record: StepRecord, logged: bool) -> None:
        if logged:
            print(record.line(), file=self.stream, flush=True)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        print(message, file=self.stream, flush=True)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichReporter(Reporter):
    """A live bar on stderr (step, loss, tokens/s, ETA); events print above it."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA {task.fields[eta]}"), console=self.console, transient=False,
        )
        self.task = None

    def start(self, total_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, loss="-", tps="-", eta="-")

    def step(self, record: StepRecord, logged: bool) -> None:
        if self.task is None:
            return
        fields = {"tps": f"{record.tokens_per_s:,.0f}", "eta": _fmt_eta(record.eta_s)}
        if record.train_loss is not None:
            fields["loss"] = f"{record.train_loss:.4f}"
        self.progress.update(self.task, completed=record.step, **fields)
        if record.val_loss is not None:
            self.progress.console.print(record.line())

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        self.progress.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


class JsonLog(Reporter):
    """One JSON object per logged step (and one per event with data) in ``path``."""

    def __init__(self, path: str):
        try:
            self.handle = open(path, "w", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise CtxmixError(f"cannot write JSON log {path}: {exc.strerror}") from None

    def step(self, record: StepRecord, logged: bool) -> None:
        if logged:
            row = {k: v for k, v in asdict(record).items() if v is not None}
            self.handle.write(json.dumps({"kind": "step", **row}) + "\n")

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        if data is not None:
            self.handle.write(json.dumps(data) + "\n")

    def close(self) -> None:
        self.handle.close()


class MultiReporter(Reporter):
    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def start(self, total_steps: int) -> None:
        for r in self.reporters:
            r.start(total_steps)

    def step(self, record: StepRecord, logged: bool) -> None:
        for r in self.reporters:
            r.step(record, logged)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        for r in self.reporters:
            r.event(message, data)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
