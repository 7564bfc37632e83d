"""CollapseMonitor: known answers, equality with nclab.measure / measure_layers, layer
arguments, hooks and modes restored, and two gloo processes equal to one."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import nclab
from nclab import CollapseMonitor
from nclab.nets.probe import measure_layers

K = 3


def toy(seed=0, n=40, dtype=torch.float32):
    """K Gaussian classes in 6-D, an MLP 6 -> 8 -> 5 -> K (named layers), and its batches."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n * K) % K
    x = 3 * torch.randn(K, 6, generator=g)[y] + torch.randn(n * K, 6, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("lin1", nn.Linear(6, 8))
    model.add_module("act1", nn.Tanh())
    model.add_module("lin2", nn.Linear(8, 5))
    model.add_module("act2", nn.Tanh())
    model.add_module("head", nn.Linear(5, K))
    model = model.to(dtype)
    x = x.to(dtype)
    return model, x, y, [(x[i:i + 25], y[i:i + 25]) for i in range(0, len(y), 25)]


def ncc_by_hand(H, y):
    H = H.double()
    M = torch.stack([H[y == k].mean(0) for k in range(int(y.max()) + 1)])
    return float((torch.cdist(H, M).argmin(1) == y).double().mean())


def no_hooks(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_exactly_collapsed_layers():
    """One-hot inputs through a bias-free linear layer: every sample *is* its class mean."""
    d = 4
    emb = nn.Linear(K, d, bias=False)
    head = nn.Linear(d, K, bias=False)
    with torch.no_grad():
        M = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])
        emb.weight.copy_(M.T)
        head.weight.copy_(M)  # W = M with orthogonal rows: argmax_j μ_jᵀμ_k = k, the nearest mean
    model = nn.Sequential(emb, head)
    y = torch.arange(30) % K
    x = nn.functional.one_hot(y, K).float()
    res = CollapseMonitor(model, ["0"], K).measure([(x[:13], y[:13]), (x[13:], y[13:])])
    assert list(res) == ["0", "penultimate"]
    for level in res.values():
        assert level["nc1_trace"] == pytest.approx(0, abs=1e-12)
        assert level["ncc_accuracy"] == 1.0
    assert res["penultimate"]["nc4"] == 0.0


def test_equals_measure_and_measure_layers_on_the_same_features():
    model, x, y, data = toy(dtype=torch.float64)
    mon = CollapseMonitor(model, ["act1", "lin2"], K)
    assert mon.classifier is model.head and mon.levels == ["act1", "lin2", "penultimate"]
    res = mon.measure(data)
    with torch.no_grad():
        h1 = model.act1(model.lin1(x))
        h2 = model.lin2(h1)
    W, b = model.head.weight.detach(), model.head.bias.detach()
    for level, H in (("act1", h1), ("lin2", h2), ("penultimate", model.act2(h2).detach())):
        want = nclab.measure(H, y, W, b) if level == "penultimate" else nclab.measure(H, y)
        want["ncc_accuracy"] = ncc_by_hand(H, y)
        got = res[level]
        assert {"nc1", "nc2_etf", "ncc_accuracy"} <= set(got) <= set(want)
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), (level, k)
    assert "nc4" in res["penultimate"] and "nc3_etf" in res["penultimate"]
    layered = measure_layers(model, data, K, layers={"act1": model.act1, "lin2": model.lin2}, classifier=model.head)
    assert layered.pop("network")["samples"] == len(y)
    assert layered == res


def test_layer_names_modules_and_dict_agree():
    model, x, y, data = toy()
    by_name = CollapseMonitor(model, ["act1", "act2"], K).measure(data)
    by_module = CollapseMonitor(model, [model.act1, model.act2], K).measure(data)
    by_dict = CollapseMonitor(model, {"act1": model.act1, "act2": model.act2}, K).measure(data)
    assert by_name == by_module == by_dict
    assert list(by_name) == ["act1", "act2", "penultimate"]
    # the penultimate features are act2's output, the head's input
    assert by_name["act2"] == {k: v for k, v in by_name["penultimate"].items() if k in by_name["act2"]}


def test_classifier_default_explicit_and_none():
    model, x, y, data = toy()
    assert CollapseMonitor(model, [], K).classifier is model.head  # the last nn.Linear
    assert CollapseMonitor(model, [], K, classifier="head").classifier is model.head

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, K)
            self.proj = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.relu(self.proj(x)))
    net = Net()
    assert CollapseMonitor(net, [], K).classifier is net.fc  # model.fc first
    res = CollapseMonitor(model, ["act1"], K, classifier=False).measure(data)
    assert list(res) == ["act1"] and "nc4" not in res["act1"]
    with pytest.raises(ValueError, match="classifier: its weight has 5 rows"):
        CollapseMonitor(model, [], K, classifier=model.lin2)
    with pytest.raises(ValueError, match="layers: nothing to measure"):
        CollapseMonitor(model, [], K, classifier=False)


def test_bad_layer_arguments():
    model, *_ = toy()
    with pytest.raises(ValueError, match=r"layers: 'act3' is not a layer.*did you mean 'act2', 'act1'"):
        CollapseMonitor(model, ["act3"], K)
    with pytest.raises(ValueError, match="layers: the Linear given is not a submodule"):
        CollapseMonitor(model, [nn.Linear(2, 2)], K)
    with pytest.raises(TypeError, match="layers: expected a list"):
        CollapseMonitor(model, "act1", K)
    with pytest.raises(ValueError, match="layers: the name 'penultimate' is reserved"):
        CollapseMonitor(model, {"penultimate": model.act1}, K)
    with pytest.raises(ValueError, match="num_classes"):
        CollapseMonitor(model, ["act1"], 1)
    with pytest.raises(ValueError, match="max_batches"):
        CollapseMonitor(model, ["act1"], K).measure([], max_batches=0)
    with pytest.raises(ValueError, match="data: no batches"):
        CollapseMonitor(model, ["act1"], K).measure([])
    with pytest.raises(TypeError, match=r"loader: expected batches \(x, y\)"):
        CollapseMonitor(model, ["act1"], K).measure([torch.zeros(2, 6)])
    assert no_hooks(model)


def test_hooks_removed_and_modes_restored_after_exceptions():
    model, x, y, data = toy()
    model.train()
    model.act1.eval()  # a mixed state (e.g. frozen BatchNorm) comes back as it was
    seen = []
    model.lin2.register_forward_pre_hook(lambda m, i: seen.append(m.training))

    def failing():
        yield data[0]
        raise RuntimeError("loader broke")
    mon = CollapseMonitor(model, ["act1"], K)
    with pytest.raises(RuntimeError, match="loader broke"):
        mon.measure(failing())
    assert seen == [False]  # measured in eval mode
    assert model.training and not model.act1.training and model.lin2.training
    assert len(model.lin2._forward_pre_hooks) == 1 and not model.act1._forward_hooks
    assert not model.head._forward_pre_hooks
    mon.measure(data)
    assert model.training and not model.act1.training
    with pytest.raises(ZeroDivisionError):
        with mon.collect():
            model(x)
            1 / 0
    assert not model.head._forward_pre_hooks and not model.act1._forward_hooks


def test_collect_in_your_own_loop():
    model, x, y, data = toy()
    mon = CollapseMonitor(model, ["act1"], K)
    with pytest.raises(RuntimeError, match="inside `with monitor.collect"):
        mon.update(y)
    with torch.no_grad(), mon.collect():
        for xb, yb in data:
            model(xb)
            mon.update(yb)
        with pytest.raises(RuntimeError, match=r"no features from \['act1', 'penultimate'\]"):
            mon.update(y[:3])
        inside = mon.compute()
    assert mon.compute() == inside == mon.measure(data)
    # the first two batches only
    assert mon.measure(data, max_batches=2) == mon.measure(data[:2])


def test_float64_and_4d_outputs():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, K)).double()
    y = torch.arange(12) % K
    x = torch.randn(12, 1, 5, 5, dtype=torch.float64) + y[:, None, None, None]
    res = CollapseMonitor(conv, ["1"], K).measure([(x, y)])
    with torch.no_grad():
        pooled = conv[1](conv[0](x)).mean(dim=(2, 3))
    assert res["1"]["nc1_trace"] == pytest.approx(nclab.measure(pooled, y)["nc1_trace"], rel=1e-12)


def test_degenerate_level_is_nan():
    model, x, y, data = toy()
    with torch.no_grad():
        model.lin1.weight.zero_()
        model.lin1.bias.zero_()
    res = CollapseMonitor(model, ["act1"], K).measure(data)
    assert all(math.isnan(v) for v in res["act1"].values()) and "ncc_accuracy" in res["act1"]


SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import torch, torch.distributed as dist
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from test_monitor import K, toy
    from nclab import CollapseMonitor

    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model, x, y, _ = toy()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]  # 8 batches, uneven shares of 3
    res = CollapseMonitor(model, ["act1", "lin2"], K).measure(batches[rank::world])
    json.dump(res, open(sys.argv[1] + f".{rank}", "w"))
    if dist.is_initialized():
        dist.destroy_process_group()  # else gloo may abort at exit ("terminate called ...")
""")


def test_two_gloo_processes_equal_one(tmp_path):
    script = tmp_path / "monitor_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TESTS_DIR=str(Path(__file__).parent), OMP_NUM_THREADS="1")

    def run(*launcher, name):
        out = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]

    run(name="one")
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", name="two")
    one = json.loads((tmp_path / "one.0").read_text())
    r0, r1 = (json.loads((tmp_path / f"two.{r}").read_text()) for r in (0, 1))
    assert r0 == r1  # every rank the same result
    assert list(r0) == list(one) == ["act1", "lin2", "penultimate"]
    for level in one:
        assert set(r0[level]) == set(one[level])
        for k, v in one[level].items():
            assert r0[level][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (level, k)


def test_an_in_place_op_after_a_hooked_layer_does_not_change_its_features():
    """Sequential(Linear, ReLU(inplace=True), Linear): layer "0" is measured before the ReLU."""
    import numpy as np

    import nclab

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 3))
    x, y = torch.randn(60, 4), torch.arange(60) % 3
    got = nclab.CollapseMonitor(model, ["0"], num_classes=3).measure([(x, y)])
    with torch.no_grad():
        pre_relu = model[0](x)
    assert got["0"]["nc1_trace"] == pytest.approx(nclab.measure(pre_relu, y)["nc1_trace"], rel=1e-12)
    assert np.isfinite(got["0"]["nc1"])
