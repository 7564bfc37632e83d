"""Hooks record the right feature levels; the streaming metric pass equals materialised metrics."""
import math

import pytest
import torch
from torch import nn

from nclab import measure
from nclab.nets.models import ResNet18, build_model, resnet18, stage_modules
from nclab.nets.probe import PENULTIMATE, batches, measure_layers, record_features


@pytest.mark.parametrize("stem, shape, sizes", [
    ("small", (1, 8, 8), [8, 8, 16, 32, 64]),
    ("imagenet", (3, 32, 32), [8, 8, 16, 32, 64]),
])
def test_resnet_hooks_shapes(stem, shape, sizes):
    torch.manual_seed(0)
    model = resnet18(10, shape[0], stem, width=0.125, bias=False).eval()
    assert model.fc.bias is None
    with record_features(model) as feats:
        logits = model(torch.randn(5, *shape))
    assert logits.shape == (5, 10)
    assert list(feats) == ["stem", "layer1", "layer2", "layer3", PENULTIMATE]
    assert [f.shape for f in feats.values()] == [(5, d) for d in sizes]
    # the penultimate level is stage 4 pooled: the classifier's input
    torch.testing.assert_close(model.fc(feats[PENULTIMATE]), logits)
    # hooks are gone afterwards
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_imagenet_stem_downsamples():
    model = resnet18(10, 3, "imagenet", width=0.125).eval()
    # 32 -> conv stride 2 -> 16 -> max-pool -> 8; the stem level is the max-pool's output
    out = {}
    h = model.maxpool.register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    model(torch.randn(2, 3, 32, 32))
    h.remove()
    assert out["x"].shape[-2:] == (8, 8)


def test_mlp_levels_and_custom_layers():
    model = build_model("mlp", 4, (1, 6, 6), hidden=16, depth=3, bias=True).eval()
    x = torch.randn(3, 1, 6, 6)
    with record_features(model) as feats:
        model(x)
    # the last hidden layer's output is the penultimate feature: listed once
    assert list(feats) == ["hidden1", "hidden2", PENULTIMATE]
    torch.testing.assert_close(feats[PENULTIMATE], model.body(torch.flatten(x, 1)))
    # any module: name the levels and the classifier explicitly
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with record_features(net, {"relu": net[1]}, classifier=net[2]) as feats:
        net(torch.randn(4, 5))
    assert feats["relu"].shape == (4, 7) and feats[PENULTIMATE].shape == (4, 7)
    with pytest.raises(ValueError, match="layers"):
        stage_modules(net)


@pytest.mark.parametrize("model_name, bias", [("resnet18", False), ("mlp", True)])
def test_streaming_equals_materialised(model_name, bias):
    torch.manual_seed(1)
    K, n = 4, 9
    x = torch.randn(K * n, 1, 8, 8) + torch.arange(K).repeat_interleave(n)[:, None, None, None] * 0.3
    y = torch.arange(K).repeat_interleave(n)
    width = 0.125 if model_name == "resnet18" else 1.0
    model = build_model(model_name, K, (1, 8, 8), width=width, bias=bias, hidden=12).eval()
    streamed = measure_layers(model, batches(x, y, 7), K,
                              sample_loss=lambda f, t: nn.functional.cross_entropy(f, t, reduction="none"))
    with torch.no_grad(), record_features(model) as feats:
        logits = model(x)
        full = {k: v.clone() for k, v in feats.items()}
    W = model.fc.weight.detach()
    b = None if model.fc.bias is None else model.fc.bias.detach()
    for level, H in full.items():
        want = measure(H, y, W, b) if level == PENULTIMATE else measure(H, y)
        want["ncc_accuracy"] = ncc_by_hand(H, y)
        got = streamed[level]
        # every key streamed is measured in memory too (measure may have more: ClassStats.metrics's subset)
        assert {"nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of", "ncc_accuracy"} <= set(got) <= set(want)
        assert level != PENULTIMATE or {"nc3_etf", "nc4"} <= set(got)
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (level, k)
    net = streamed["network"]
    assert net["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert net["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert net["samples"] == K * n
    assert list(streamed)[:-1][-1] == PENULTIMATE


def ncc_by_hand(H, y):
    """Fraction of rows whose nearest class mean (Euclidean, float64) is their label."""
    H = H.double()
    M = torch.stack([H[y == k].mean(0) for k in range(int(y.max()) + 1)])
    return float((torch.cdist(H, M).argmin(1) == y).double().mean())


def test_ncc_accuracy_separated_clusters_is_one():
    """Well-separated clusters: every sample is nearest its own class mean, at every level."""
    torch.manual_seed(0)
    K, n = 4, 10
    y = torch.arange(K).repeat_interleave(n)
    x = 10 * torch.eye(K)[y] + 0.1 * torch.randn(K * n, K)
    net = nn.Sequential(nn.Identity(), nn.Linear(K, K))
    res = measure_layers(net, batches(x, y, 7), K, layers={"input": net[0]}, classifier=net[1])
    assert res["input"]["ncc_accuracy"] == 1.0 and res[PENULTIMATE]["ncc_accuracy"] == 1.0


def test_ncc_accuracy_counted_by_hand():
    """1-D features, two classes. Class 0 at 0, 0, 0, 4 (mean 1); class 1 at 2, 6, 6, 6 (mean 5).
    The midpoint is 3: the 4 of class 0 and the 2 of class 1 sit on the wrong side, 2 errors in 8."""
    x = torch.tensor([0.0, 0.0, 0.0, 4.0, 2.0, 6.0, 6.0, 6.0])[:, None]
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    net = nn.Sequential(nn.Identity(), nn.Linear(1, 2))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    res = measure_layers(net, batches(x[perm], y[perm], 3), 2, layers={"h": net[0]}, classifier=net[1])
    assert res["h"]["ncc_accuracy"] == 6 / 8 == res[PENULTIMATE]["ncc_accuracy"]
    assert ncc_by_hand(x, y) == 6 / 8


def test_degenerate_level_is_nan_including_nc4():
    """Features that are all equal (dead layer): every metric NaN, nc4 too, and no error."""
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    nn.init.zeros_(net[0].weight)
    nn.init.zeros_(net[0].bias)
    x, y = torch.randn(12, 5), torch.arange(12) % 3
    res = measure_layers(net, batches(x, y, 5), 3, layers={"relu": net[1]}, classifier=net[2])
    assert res[PENULTIMATE] and all(math.isnan(v) for v in res[PENULTIMATE].values())
    assert "nc4" in res[PENULTIMATE] and "nc3_of" in res[PENULTIMATE]
    assert res["network"]["samples"] == 12


def test_same_as_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.resnet18(num_classes=10).eval()
    ours = ResNet18(10, 3, "imagenet", 1.0, bias=True).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
