"""cm's lanes without the experts: capture the experts' lane rows of a compress run once, then replay only the
mixer over them, for each lane-state version (``mixers/cm.py``: ``CMMixer.lanes_begin``).

Run from the repository root (reads ../shared/data/text, or the paths given; the package never does):

    python benchmarks/cm_lanes.py capture --files lcet10.txt plrabn12.txt enwik8.first1MB --lanes 64 --out /tmp/cmlanes
    python benchmarks/cm_lanes.py capture --files lcet10.txt --lanes 1 8 --out /tmp/cmlanes
    python benchmarks/cm_lanes.py capture --files lcet10.txt --prefix 100000 --lanes 0 --out /tmp/cmlanes
    python benchmarks/cm_lanes.py replay --dir /tmp/cmlanes --versions 1 2

``capture`` runs ``ctxmix.codec.compress`` with the default experts and mixer, and records what the mixer
is given at every lane step: the experts' rows (float64[La, K, V], raw on disk: 16 KiB a token with the
default experts), the features cm reads (the n-gram expert's matched order, the base expert's entropy) and
the lanes' tokens. Neither expert reads the mixer, so the rows are the same whatever mixer replays them.

``replay`` builds cm (``--mixer``, default ``cm``) and steps it over each capture: ``lanes_distributions``
then ``lanes_observe``, as ``LaneEngine`` does. It prints the mixer's bits (what the coder would spend,
without its small overhead) per capture and lane-state version, the change against the 1-lane capture of the
same text where there is one (otherwise against ``--one-lane-bits NAME=BITS``), and the mixer's time per
coded token (rows + learning; the capture's reading from disk excluded). A 1-lane capture replays through the
one-lane path (``next_distribution`` / ``observe``), which is what ``compress`` codes one lane with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEXT_DIR = REPO.parent / "shared" / "data" / "text"
sys.path.insert(0, str(REPO))

CHUNK_STEPS = 64  # steps read from disk at a time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def capture(path: Path, lanes: int | None, prefix: int, out: Path) -> Path:
    """Compress ``path`` (its first ``prefix`` bytes when > 0) on ``lanes`` lanes (None: the default),
    recording the mixer's inputs under ``out/<name>.L<lanes>``."""
    from ctxmix.codec import compress
    from ctxmix.mixers.cm import CMMixer

    data = path.read_bytes()
    name = path.name + (f".first{prefix}" if prefix else "")
    with tempfile.TemporaryDirectory(prefix="cm_lanes_") as tmp:
        source = Path(tmp) / name
        source.write_bytes(data[:prefix] if prefix else data)
        part = out / f"{name}.partial"
        part.mkdir(parents=True, exist_ok=True)
        rows_file = open(part / "rows.f64", "wb")
        steps: list[tuple[int, np.ndarray, np.ndarray]] = []  # (active, features float64[La, 2], tokens)
        saved = (CMMixer.lanes_distributions, CMMixer.lanes_observe, CMMixer.next_distribution, CMMixer.observe,
                 CMMixer.lanes_begin)

        def lanes_begin(self, n_lanes, *args, **kwargs):  # (the rows do not depend on the mixer's lane state)
            return saved[4](self, n_lanes)

        def lanes_distributions(self, p, features, lanes=None):
            rows = saved[0](self, p, features, lanes)
            if lanes is None or lanes[0] == 0:  # the step's first group (its tokens come group by group)
                steps.append((p.shape[0], None, None))
            if lanes is None or lanes[1] == p.shape[0]:  # the step's last group: every lane's rows are in p
                rows_file.write(np.ascontiguousarray(p, np.float64).tobytes())
                steps[-1] = (p.shape[0], _features(self, features, p.shape[0]), steps[-1][2])
            return rows

        def lanes_observe(self, tokens, lanes=None):  # (from lane state 4 on, group by group)
            active, feats, known = steps[-1]
            tokens = np.asarray(tokens, np.int64)
            steps[-1] = (active, feats, tokens.copy() if known is None or lanes is None or lanes[0] == 0
                         else np.concatenate([known, tokens]))
            return saved[1](self, tokens, lanes)

        def next_distribution(self, p, features):
            rows_file.write(np.ascontiguousarray(p, np.float64).tobytes())
            steps.append((1, _features(self, [{k: np.array([v]) for k, v in f.items()} for f in features], 1), None))
            return saved[2](self, p, features)

        def observe(self, token):
            active, feats, _ = steps[-1]
            steps[-1] = (active, feats, np.array([token], np.int64))
            return saved[3](self, token)

        CMMixer.lanes_distributions, CMMixer.lanes_observe = lanes_distributions, lanes_observe
        CMMixer.next_distribution, CMMixer.observe = next_distribution, observe
        CMMixer.lanes_begin = lanes_begin
        try:
            start = time.perf_counter()
            result = compress(source, Path(tmp) / "x.cmx", lanes=lanes)
            seconds = time.perf_counter() - start
        finally:
            (CMMixer.lanes_distributions, CMMixer.lanes_observe, CMMixer.next_distribution, CMMixer.observe,
             CMMixer.lanes_begin) = saved
            rows_file.close()
    np.save(part / "active.npy", np.array([s[0] for s in steps], np.int64))
    np.save(part / "features.npy", np.concatenate([s[1] for s in steps]))
    np.save(part / "tokens.npy", np.concatenate([s[2] for s in steps]))
    meta = {"file": name, "lanes": result.lanes, "tokens": result.tokens, "input_bytes": result.input_bytes,
            "file_bytes": result.file_bytes, "payload_bytes": result.payload_bytes, "bits": result.bits,
            "experts": result.experts, "mixer": result.mixer, "compress_s": seconds, "vocab": 1024,
            "n_experts": len(result.experts)}
    (part / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    final = out / f"{name}.L{result.lanes}"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    part.rename(final)
    log(f"{name}: {result.lanes} lanes, {result.tokens} tokens, {result.file_bytes:,} bytes, {seconds:.0f} s -> {final}")
    return final


def _features(mixer, features, n_rows: int) -> np.ndarray:
    """float64[La, 2]: (matched order, base entropy) as cm reads them (0 where not given)."""
    out = np.zeros((n_rows, 2))
    for col, (index, name) in enumerate(((mixer._ngram, "order"), (mixer._base, "entropy"))):
        if index >= 0 and name in features[index]:
            out[:, col] = np.asarray(features[index][name], np.float64)
    return out


def replay(capture_dir: Path, mixer_spec: str, version: int | None) -> dict:
    """The mixer's bits and time over one capture (``version``: the lane state; ignored on 1 lane)."""
    from ctxmix.components import mixers
    from ctxmix.lanes import AHEAD_GROUPS, lane_groups
    from ctxmix.mixers.cm import CM_LANE_STATE_GROUPS

    meta = json.loads((capture_dir / "meta.json").read_text())
    active = np.load(capture_dir / "active.npy")
    feats = np.load(capture_dir / "features.npy")
    tokens = np.load(capture_dir / "tokens.npy")
    k, vocab = meta["n_experts"], meta["vocab"]
    rows = np.memmap(capture_dir / "rows.f64", np.float64, "r").reshape(-1, k, vocab)
    specs = ["neural", "ngram"] if k == 2 else meta["experts"]
    mixer = mixers.build(mixer_spec, experts=specs)
    one_lane = meta["lanes"] == 1
    if not one_lane:
        if version is None:
            mixer.lanes_begin(meta["lanes"])
        else:
            mixer.lanes_begin(meta["lanes"], version)
    base, ngram = mixer._base, mixer._ngram
    groups = None  # lane states from CM_LANE_STATE_GROUPS on learn group by group, in the lane engine's groups
    if not one_lane and mixer._lane_state >= CM_LANE_STATE_GROUPS:
        groups = lane_groups(meta["lanes"], AHEAD_GROUPS)
    bits = 0.0
    seconds = 0.0
    at = 0
    n_steps = len(active)
    for first in range(0, n_steps, CHUNK_STEPS):
        chunk = active[first:first + CHUNK_STEPS]
        stop = at + int(chunk.sum())
        block = np.array(rows[at:stop])  # read (and paged in) before the clock starts
        offset = 0
        for n in chunk:
            p = block[offset:offset + n]
            f = feats[at + offset:at + offset + n]
            y = tokens[at + offset:at + offset + n]
            features = [{} for _ in range(k)]
            if ngram >= 0:
                features[ngram]["order"] = f[:, 0].copy()
            if base >= 0:
                features[base]["entropy"] = f[:, 1].copy()
            start = time.perf_counter()
            if one_lane:
                row = mixer.next_distribution(p[0], [{name: float(v[0]) for name, v in d.items()} for d in features])
                mixer.observe(int(y[0]))
                bits -= np.log2(row[y[0]])
            elif groups is None:
                out = mixer.lanes_distributions(p, features)
                mixer.lanes_observe(y)
                bits -= np.log2(out[np.arange(n), y]).sum()
            else:  # the lane engine's groups: each mixed, then learned from, in turn
                for lo, hi in groups:
                    hi = min(hi, n)
                    if lo >= hi:
                        break
                    out = mixer.lanes_distributions(p, features, lanes=(lo, hi))
                    mixer.lanes_observe(y[lo:hi], lanes=(lo, hi))
                    bits -= np.log2(out[np.arange(hi - lo), y[lo:hi]]).sum()
            seconds += time.perf_counter() - start
            offset += n
        at = stop
    n_coded = int(active.sum())
    return {"capture": capture_dir.name, "file": meta["file"], "lanes": meta["lanes"], "version": version,
            "mixer": mixer_spec, "coded": n_coded, "bits": float(bits), "payload_bytes_est": bits / 8,
            "us_per_token": 1e6 * seconds / n_coded, "captured_bits": meta["bits"]}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="record the mixer's inputs of compress runs")
    cap.add_argument("--files", nargs="+", required=True)
    cap.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    cap.add_argument("--lanes", nargs="+", type=int, default=[0], help="lane counts (0: the default)")
    cap.add_argument("--prefix", type=int, default=0, help="only the first PREFIX bytes of each text")
    cap.add_argument("--out", type=Path, default=Path("/tmp/cmlanes"))
    rep = sub.add_parser("replay", help="replay cm over captures")
    rep.add_argument("--dir", type=Path, default=Path("/tmp/cmlanes"))
    rep.add_argument("--captures", nargs="*", default=None, help="capture names (default: all in --dir)")
    rep.add_argument("--versions", nargs="+", type=int, default=None, help="lane-state versions (default: cm's)")
    rep.add_argument("--mixer", default="cm")
    rep.add_argument("--one-lane-bits", nargs="*", default=[], metavar="NAME=BITS")
    rep.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import numba

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; python {platform.python_version()}, numpy "
          f"{np.__version__}, numba {numba.__version__}")
    if args.command == "capture":
        import torch

        torch.set_num_threads(1)
        paths = [Path(f) if Path(f).is_file() else args.text_dir / f for f in args.files]
        for path in paths:
            for lanes in args.lanes:
                capture(path, lanes or None, args.prefix, args.out)
        return []
    names = args.captures or sorted(d.name for d in args.dir.iterdir() if (d / "meta.json").exists())
    one_lane = {k: float(v) for k, v in (item.split("=", 1) for item in args.one_lane_bits)}
    results = []
    for name in names:
        capture_dir = args.dir / name
        meta = json.loads((capture_dir / "meta.json").read_text())
        if meta["lanes"] == 1:
            r = replay(capture_dir, args.mixer, None)
            one_lane.setdefault(meta["file"], r["bits"])
            results.append(r)
            log(f"{name}: {r['bits'] / 8:,.0f} bytes (captured {meta['bits'] / 8:,.0f}), {r['us_per_token']:.1f} us/token")
            continue
        for version in args.versions or [None]:
            r = replay(capture_dir, args.mixer, version)
            results.append(r)
            log(f"{name} v{version}: {r['bits'] / 8:,.0f} bytes (captured {meta['bits'] / 8:,.0f}), "
                f"{r['us_per_token']:.1f} us/token")
    print("| capture | lanes | version | mixer bytes | vs 1 lane | us/token |")
    print("|---|---|---|---|---|---|")
    for r in results:
        base = one_lane.get(r["file"])
        versus = f"{100 * (r['bits'] / base - 1):+.2f}%" if base and r["lanes"] > 1 else "n/a"
        print(f"| {r['capture']} | {r['lanes']} | {r['version'] if r['lanes'] > 1 else '-'} | {r['bits'] / 8:,.0f} | "
              f"{versus} | {r['us_per_token']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
