"""NeuralCollapseCallback with the real Lightning: logged keys reach CSVLogger, values are
finite, NC1 of a separable problem falls; a clear ImportError without Lightning."""
import csv
import importlib
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")  # installed by .[test]: this runs in CI
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from nclab.lightning import NeuralCollapseCallback  # noqa: E402

K = 3


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, K))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def clusters(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 2 * torch.randn(K, 8, generator=g)[y] + torch.randn(n, 8, generator=g)
    return TensorDataset(x, y)


def fit(tmp_path, callback, epochs=3, val=False):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[callback],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    model = Classifier()
    train = DataLoader(clusters(), batch_size=20, shuffle=True)
    trainer.fit(model, train, DataLoader(clusters(seed=1), batch_size=100) if val else None)
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return trainer, model, rows


def test_logs_every_metric_of_every_layer_and_nc1_falls(tmp_path):
    cb = NeuralCollapseCallback(layers=["net.1"], num_classes=K)
    trainer, model, rows = fit(tmp_path, cb)
    logged = [r for r in rows if r.get("nc1/penultimate")]
    assert [int(r["epoch"]) for r in logged] == [0, 1, 2]
    keys = {f"{m}/{layer}" for layer, metrics in cb.results.items() for m in metrics}
    assert {"nc1/net.1", "nc2_etf/net.1", "ncc_accuracy/net.1", "nc1/penultimate", "nc3_etf/penultimate",
            "nc4/penultimate", "ncc_accuracy/penultimate"} <= keys <= set(rows[0])
    for r in logged:
        assert all(math.isfinite(float(r[k])) for k in keys)
    nc1 = [float(r["nc1/penultimate"]) for r in logged]
    assert nc1[-1] < nc1[0], nc1
    assert float(logged[-1]["ncc_accuracy/penultimate"]) > 0.9
    assert "nc1/penultimate" in trainer.callback_metrics
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_val_loader_every_second_epoch(tmp_path):
    cb = NeuralCollapseCallback(layers=["net.3"], num_classes=K, every_n_epochs=2,
                                dataloader="val", max_batches=2)
    _, _, rows = fit(tmp_path, cb, epochs=4, val=True)
    assert [int(r["epoch"]) for r in rows if r.get("nc1/net.3")] == [1, 3]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        NeuralCollapseCallback(layers=[], num_classes=K, every_n_epochs=0)
    with pytest.raises(ValueError, match="dataloader"):
        NeuralCollapseCallback(layers=[], num_classes=K, dataloader="test")
    with pytest.raises(ValueError, match=r"layers: 'net.9' is not a layer"):  # at setup, before training
        fit(tmp_path, NeuralCollapseCallback(layers=["net.9"], num_classes=K))


def test_clear_import_error_without_lightning(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # import of each raises ImportError
    monkeypatch.delitem(sys.modules, "nclab.lightning")
    with pytest.raises(ImportError, match=r'pip install "nclab\[lightning\]"'):
        importlib.import_module("nclab.lightning")
