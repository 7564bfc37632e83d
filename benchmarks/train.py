"""Epoch time of nclab's training loop against the usual one, and the metric-pass cost.

Reference ("the usual way"): a torch DataLoader over CPU float32 tensors (shuffle,
drop_last like ours, pin_memory and worker processes on CUDA), each batch copied to the device with
``.to(device)``, float32 compute, default memory format. Ours: nclab.nets.loop.Trainer
(data resident on the device, bf16 autocast and channels_last on CUDA). Same model
(ResNet18, small stem), same MNIST-shaped synthetic data (N x 1 x 32 x 32, 10 classes),
same SGD (the paper's lr and weight decay in the loss's scaling, from TrainSettings). Each
loop runs one warm-up epoch, then ``--epochs`` timed epochs.

Also times the metric pass (all levels, ``--measure-per-class`` samples per class from
train and test) and prints metric pass / epoch. ``--compile``: our loop with
``TrainSettings.compile`` (torch.compile of the training forward; CUDA only, ignored on the
CPU; its compilation happens in the warm-up epoch, outside the timing).

    python benchmarks/train.py                  # CPU here: tiny sizes
    python benchmarks/train.py --device cuda    # defaults: N = 60000, width 1
    python benchmarks/train.py --device cuda --compile
Prints the ratio reference / ours, then one JSON line (the last line) with every number.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nclab.nets.data import ImageData  # noqa: E402
from nclab.nets.models import build_model  # noqa: E402
from nclab.nets.losses import sample_losses  # noqa: E402
from nclab.nets.loop import Trainer  # noqa: E402
from nclab.nets.settings import TrainSettings  # noqa: E402


def synthetic(n: int, size: int, channels: int, K: int = 10, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.randn(n, channels, size, size, generator=g) + 0.5 * y[:, None, None, None].float() / K
    n_test = max(n // 6, 10 * K)
    return ImageData("synthetic", x, y, x[:n_test].clone(), y[:n_test].clone(), K, f"synthetic {n}x{channels}x{size}x{size}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(model, loader, opt, device, loss):
    model.train()
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        l = sample_losses(out, yb, loss).mean()
        opt.zero_grad(set_to_none=True)
        l.backward()
        opt.step()


def settings(args, device) -> TrainSettings:
    return TrainSettings(dataset="digits", width=args.width, bias=False, loss=args.loss, batch_size=args.batch_size,
                         measure_per_class=args.measure_per_class, device=str(device),
                         measure_batch_size=args.measure_batch_size, compile=args.compile)


def time_reference(args, data, device) -> float:
    cfg = settings(args, device)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, data.input_shape, width=args.width, bias=False).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr, momentum=cfg.momentum,
                          weight_decay=cfg.sgd_weight_decay)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         pin_memory=cuda,
                                         num_workers=args.workers if cuda else 0,
                                         persistent_workers=cuda and args.workers > 0)
    reference_epoch(model, loader, opt, device, args.loss)  # warm-up (cuDNN autotune, workers)
    times = []
    for _ in range(args.epochs):
        sync(device)
        t0 = time.perf_counter()
        reference_epoch(model, loader, opt, device, args.loss)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def time_ours(args, data, device) -> tuple[float, float]:
    cfg = settings(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), quiet=True, data=data)
        tr.train_epoch(0)  # warm-up
        tr.measure()
        epochs, passes = [], []
        for e in range(1, args.epochs + 1):
            sync(device)
            t0 = time.perf_counter()
            tr.train_epoch(e)
            sync(device)
            t1 = time.perf_counter()
            tr.measure()
            sync(device)
            epochs.append(t1 - t0)
            passes.append(time.perf_counter() - t1)
    return min(epochs), min(passes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="training images (default 60000 on CUDA, 2048 on CPU)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=float, help="ResNet18 width (default 1 on CUDA, 0.125 on CPU)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (the minimum is reported)")
    p.add_argument("--loss", default="mse", choices=["mse", "ce"])
    p.add_argument("--measure-per-class", type=int,
                   help="default: the fraction of MNIST's 100 of 6000 per class, i.e. N/600 (>= 5)")
    p.add_argument("--measure-batch-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reference on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile our training forward (CUDA only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.n = args.n or (60000 if cuda else 2048)
    args.width = args.width or (1.0 if cuda else 0.125)
    args.measure_per_class = args.measure_per_class or max(5, round(args.n / 600))
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    data = synthetic(args.n, args.size, args.channels)
    ref = time_reference(args, data, device)
    epoch, metric_pass = time_ours(args, data, device)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "n": args.n, "shape": [args.channels, args.size, args.size], "width": args.width,
        "batch_size": args.batch_size, "measured_per_class": args.measure_per_class,
        "compile": args.compile and cuda, "images_per_s": round(args.n / epoch, 1),
        "reference_epoch_s": round(ref, 4), "ours_epoch_s": round(epoch, 4),
        "speedup": round(ref / epoch, 3), "metric_pass_s": round(metric_pass, 4),
        "metric_pass_over_epoch": round(metric_pass / epoch, 4),
    }
    print(f"reference (DataLoader, float32, per-batch .to(device)): {ref:.3f} s/epoch")
    tricks = (", bf16, channels_last" + (", torch.compile" if args.compile else "")) if cuda else ""
    print(f"nclab (device-resident{tricks}): {epoch:.3f} s/epoch = {args.n / epoch:.0f} images/s "
          f"-> {ref / epoch:.2f}x the reference")
    print(f"metric pass (all levels, {args.measure_per_class}/class train+test): {metric_pass:.3f} s "
          f"= {metric_pass / epoch:.3f} of an epoch")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
