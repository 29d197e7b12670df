"""ctxmix_train's fit-to-cap step: an int6 artifact over size_cap_bytes is pruned (or its steps widened)
just enough to fit, loads in ctxmix as exactly those weights, and is refused in one line when even the
most allowed does not fit. One small record-family model (1 layer x 128, MLP x5 so that its two MLP
matrices of 81,920 values are int6) with zstd-3, so every compression takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ctxmix.data import default_tokenizer
from ctxmix.errors import CtxmixError
from ctxmix.models import load_model
from ctxmix_train import export, prepare, resolve_config
from ctxmix_train.config import TrainConfig
from ctxmix_train.model import artifact_meta, build_model
from test_train import run_cli  # tests/test_train.py (pytest puts tests/ on the path)

SMALL = ["num_layers=1", "ve_layers=0", "xsa_last_n=1", "model_dim=128", "num_heads=2", "num_kv_heads=1", "mlp_mult=5.0",
         "compressor=zstd", "compress_level=3", "threads=1"]
INT6_VALUES = 2 * 640 * 128  # the MLP's two matrices; every other tensor is int8 or passes through


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On two shared cores, torch's default two threads make these small tensor ops many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(extra: list[str] = ()) -> TrainConfig:
    return resolve_config("toy-record", sets=SMALL + list(extra))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(small_cfg())
    with torch.no_grad():  # trained-looking weights: nothing zero, every tensor used
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def plain(model) -> export.PackedArtifact:
    cfg = small_cfg()
    packed = export.pack(model, cfg, artifact_meta(cfg))
    int6 = [k for k, kind in packed.quantized["m"].items() if isinstance(kind, dict) and kind["type"] == "int6"]
    assert sum(packed.quantized["w"][k + ".q"].numel() for k in int6) == INT6_VALUES
    return packed


def int6_names(packed: export.PackedArtifact) -> list[str]:
    return [k for k, kind in packed.quantized["m"].items() if isinstance(kind, dict) and kind["type"] == "int6"]


def logits_of_artifact_and_of_weights(path: Path, packed: export.PackedArtifact, cfg: TrainConfig, text: str):
    loaded = load_model(path)
    twin = build_model(cfg)
    export.load_dequantized(twin, export.dequantized_state_dict(packed))
    twin.eval()
    idx = torch.tensor([[1] + default_tokenizer().encode(text)[:127]])
    with torch.no_grad():
        return loaded.model(idx), twin(idx)


def test_prune_zeroes_the_cheapest_pm1_values_until_it_fits_and_ctxmix_loads_them(model, plain, tmp_path: Path,
                                                                                   alice_path: Path):
    cap = int(plain.nbytes * 0.98)
    cfg = small_cfg(["fit_to_cap=prune", f"size_cap_bytes={cap}", "prune_max_fraction=0.6"])
    packed = export.pack(model, cfg, artifact_meta(cfg))
    fit = packed.fit
    assert packed.nbytes <= cap and packed.nbytes > cap * 0.99  # fits, and not by pruning far more than needed
    assert fit.method == "prune" and not fit.forced and fit.bytes_before == plain.nbytes
    assert fit.bytes_after == packed.nbytes and fit.int6_values == INT6_VALUES
    # Exactly the +-1 values with the smallest squared-error growth w^2 - (w - q s)^2 became 0; nothing else moved.
    state = export.float_state_dict(model)
    zeroed_costs, kept_costs = [], []
    for name in int6_names(plain):
        q0, q1 = plain.quantized["w"][name + ".q"], packed.quantized["w"][name + ".q"]
        assert torch.equal(plain.quantized["w"][name + ".scale"], packed.quantized["w"][name + ".scale"])
        changed = q0 != q1
        assert bool((q0[changed].abs() == 1).all()) and bool((q1[changed] == 0).all())
        s = plain.quantized["w"][name + ".scale"].float()[:, None].expand_as(q0)
        w = state[name]
        cost = w * w - (w - q0.float() * s) ** 2
        zeroed_costs.append(cost[changed])
        kept_costs.append(cost[(q1.abs() == 1)])
    zeroed, kept = torch.cat(zeroed_costs), torch.cat(kept_costs)
    assert len(zeroed) == fit.changed_values == round(fit.amount * fit.int6_values) > 0
    assert float(zeroed.max()) <= float(kept.min())
    for name, kind in plain.quantized["m"].items():  # everything but the int6 values is as before
        if name not in int6_names(plain):
            keys = [name] if isinstance(kind, str) else [name + ".q", name + ".scale"]
            assert all(torch.equal(plain.quantized["w"][k], packed.quantized["w"][k]) for k in keys)
    # Written, it loads in ctxmix as exactly the pruned weights, and says what was done.
    path = tmp_path / "pruned.ptz"
    assert export.write(path, packed, cfg.size_cap_bytes) == path.stat().st_size == packed.nbytes
    from_file, from_weights = logits_of_artifact_and_of_weights(path, packed, cfg, alice_path.read_text()[:2000])
    assert torch.equal(from_file, from_weights)
    meta = load_model(path).artifact.meta
    assert meta["fit_method"] == "prune" and meta["fit_changed_values"] == fit.changed_values
    assert meta["fit_bytes_before"] == plain.nbytes and meta["fit_amount"] == fit.amount


def test_coarsen_widens_every_int6_step_until_it_fits(model, plain, tmp_path: Path, alice_path: Path):
    cap = int(plain.nbytes * 0.98)
    cfg = small_cfg(["fit_to_cap=coarsen", f"size_cap_bytes={cap}", "coarsen_max=1.0"])
    packed = export.pack(model, cfg, artifact_meta(cfg))
    fit = packed.fit
    assert cap * 0.99 < packed.nbytes <= cap and fit.method == "coarsen" and 0 < fit.amount <= 1.0
    state = export.float_state_dict(model)
    for name in int6_names(plain):
        scale = (plain.quantized["w"][name + ".scale"].float() * (1 + fit.amount)).half()
        assert torch.equal(packed.quantized["w"][name + ".scale"], scale)
        expected = torch.clamp(torch.round(state[name] / scale.float()[:, None]), -31, 31).to(torch.int8)
        assert torch.equal(packed.quantized["w"][name + ".q"], expected)
    path = tmp_path / "coarse.ptz"
    export.write(path, packed, cfg.size_cap_bytes)
    from_file, from_weights = logits_of_artifact_and_of_weights(path, packed, cfg, alice_path.read_text()[:2000])
    assert torch.equal(from_file, from_weights)
    assert load_model(path).artifact.value_bits == 6


def test_an_artifact_within_the_cap_is_left_byte_for_byte_alone(model, plain):
    for method in ("prune", "coarsen"):
        cfg = small_cfg([f"fit_to_cap={method}", f"size_cap_bytes={plain.nbytes}"])
        packed = export.pack(model, cfg, artifact_meta(cfg))
        assert packed.fit is None and packed.data == plain.data


def test_fit_force_prunes_exactly_the_given_fraction_even_when_it_fits(model, plain):
    cfg = small_cfg(["fit_to_cap=prune", "fit_force=0.05"])
    packed = export.pack(model, cfg, artifact_meta(cfg))
    n = sum(plain.quantized["w"][k + ".q"].numel() for k in int6_names(plain))
    changed = sum(int((plain.quantized["w"][k + ".q"] != packed.quantized["w"][k + ".q"]).sum())
                  for k in int6_names(plain))
    assert packed.fit.forced and changed == packed.fit.changed_values == round(0.05 * n)
    assert packed.nbytes < plain.nbytes


def test_entropy_estimate_of_pruning_matches_the_pruned_values(model, plain):
    fitter = export.Int6Fit(plain.quantized, export.float_state_dict(model), "prune")
    for x in (0.0, 0.03, 0.2):
        pruned, _ = fitter.apply(x)
        counts = torch.stack([torch.bincount(pruned["w"][k + ".q"].flatten().long() + 31, minlength=63)
                              for k in fitter.names]).numpy()
        assert fitter.estimate(x) == pytest.approx(export._entropy_bytes(counts), rel=1e-12)
    assert fitter.estimate(0.2) < fitter.estimate(0.03) < fitter.estimate(0.0)


def test_when_even_the_most_allowed_does_not_fit_export_refuses(model, plain):
    cfg = small_cfg(["fit_to_cap=coarsen", "coarsen_max=0.01", f"size_cap_bytes={plain.nbytes // 2}"])
    with pytest.raises(CtxmixError, match=r"the most coarsen allowed \(coarsen_max=0.01: .* still leaves"):
        export.pack(model, cfg, artifact_meta(cfg))
    # ctxmix-train size does not refuse: it reports the smallest artifact tried and that it does not fit.
    from ctxmix_train.size import size_check

    report = size_check(dataclasses.replace(cfg, fit_to_cap="prune", prune_max_fraction=0.01), "gaussian")
    assert not report.fits and report.fit.amount == 0.01 and report.artifact_bytes == report.fit.bytes_after


def test_config_fit_to_cap_is_on_for_the_record_recipe_only_and_int6_only():
    assert resolve_config("record").fit_to_cap == "coarsen"
    assert all(resolve_config(r).fit_to_cap == "off" for r in ("baseline", "toy", "toy-record"))
    with pytest.raises(CtxmixError, match="fit_to_cap.*off unless quant=int6"):
        resolve_config("record", sets=["quant=int8"])
    with pytest.raises(CtxmixError, match="fit_force"):
        resolve_config("toy-record", sets=["fit_force=0.1"])  # fit_to_cap is off
    with pytest.raises(CtxmixError, match="fit_to_cap"):
        resolve_config("record", sets=["fit_to_cap=squeeze"])


# --- the CLI -------------------------------------------------------------------------------------------


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_cli_size_reports_the_fitted_size_and_what_it_changed(capsys):
    from ctxmix_train.size import size_check

    plain = size_check(small_cfg(), "gaussian")
    cap = int(plain.artifact_bytes * 0.98)
    code, out, _ = run_cli(["size", "--recipe", "toy-record", "--weights", "gaussian",
                            *sets(SMALL + ["fit_to_cap=coarsen", f"size_cap_bytes={cap}", "coarsen_max=1"])], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"fit_to_cap=coarsen: {plain.artifact_bytes:,} bytes before, int6 steps widened x1.")
    assert "% of int6 values changed" in lines[0] and lines[1].endswith(f"cap {cap:,}: fits")
    code, out, _ = run_cli(["size", "--recipe", "toy-record", "--weights", "gaussian",
                            *sets(SMALL + ["fit_to_cap=prune", f"size_cap_bytes={cap}", "prune_max_fraction=0.01"])], capsys)
    assert code == 0 and f"{plain.artifact_bytes:,} bytes before, pruned 1.00% of int6 values" in out
    assert out.rstrip().endswith("DOES NOT FIT")


def test_cli_run_refuses_in_one_line_when_pruning_cannot_fit(tmp_path: Path, alice_path: Path, capsys):
    data = tmp_path / "shards"
    prepare([alice_path], data, val_fraction=0.1)
    out = tmp_path / "m.ptz"
    run = ["train_seq_len=64", "train_batch_tokens=64", "micro_batch_seqs=1", "iterations=1", "val_tokens=64",
           "val_every=0", "log_every=0", "fit_to_cap=prune", "prune_max_fraction=0.05", "size_cap_bytes=100000"]
    code, _, err = run_cli(["run", "--recipe", "toy-record", "--data", str(data), "--out", str(out), "--quiet",
                            *sets(SMALL + run)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: artifact would be ") and "over the size cap of 100,000" in lines[0]
    assert "the most prune allowed (prune_max_fraction=0.05:" in lines[0] and "nothing was written" in lines[0]
    assert not out.exists()
