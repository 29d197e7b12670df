"""ctxmix_train: train the neural experts ctxmix scores with, and write their Parameter Golf artifacts.

    from ctxmix_train import prepare, resolve_config, train
    prepare(["alice29.txt"], "data/", val_fraction=0.1)
    cfg = resolve_config("toy", sets=["iterations=200"])
    result = train(cfg, "data/", "toy.ptz")  # result.roundtrip.bpb: the artifact as ctxmix loads it

Modules, one job each: ``config`` (hyperparameters, recipes, overrides), ``prepare`` (text -> shards),
``loader`` (shards -> per-rank batches), ``distributed`` (torchrun environment), ``model`` (ctxmix's model
families, initialization, artifact metadata), ``optim`` (Muon + Adam, schedules), ``evaluate`` (val
loss/bpb), ``export`` (quantize, cap, write), ``reload`` (read back through ctxmix), ``trainer`` (the
loop), ``progress`` (reporters), ``size`` (size-only checks), ``cli``.
"""

from .config import RECIPES, TrainConfig, resolve_config
from .prepare import prepare
from .trainer import TrainResult, train

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "prepare", "resolve_config", "train"]
