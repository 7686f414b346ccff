"""Do the example nets in nets/ meet the deployment gate (int8 at most 0.5 pp below fp32)?

Trains each net on the built-in MNIST (the pipeline's split of builtin:mnist5k: 4,000 train, 500
test), then quantizes it with FX for x86 two ways, PTQ (calibration only) and QAT (fine-tuning
with fake-quant, the qat stage's recipe), and prints fp32 / PTQ int8 / QAT int8 test accuracy.
A stand-in until the pipeline itself can train nets/ models; params.yaml's train and qat values
are copied here, not read, so that this keeps working while those sections change.

    python -m bench.nets_accuracy [--epochs 6] [--qat-epochs 4] [--nets resnet mobilenet] [--dry-run]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer

from tasks.augment import random_shift
from tasks.prepare import stratified_split
from tasks.quantize import convert, prepare
from tasks.sources import load_mnist5k

BATCH, LR, QAT_LR, LABEL_SMOOTHING, SHIFT, CALIBRATION_BATCHES = 64, 3e-3, 1e-4, 0.1, 2, 16


def mnist(limit: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/test splits as prepare makes them (stratified, seed 0), normalized by the train
    split's mean and std."""
    source = load_mnist5k()
    x = source.x.array.astype(np.float32) / 255.0
    splits = stratified_split(source.y, {"train": 0.8, "val": 0.1, "test": 0.1}, 0, source.class_names)
    mean, std = x[splits["train"]].mean(), x[splits["train"]].std()
    if limit:  # a random few of each split, so that every class is in them
        splits = {name: np.random.default_rng(0).permutation(i)[:limit] for name, i in splits.items()}
    return {name: (torch.from_numpy((x[i] - mean) / std), torch.from_numpy(source.y[i]))
            for name, i in splits.items() if name != "val"}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)]).eq(y).float().mean())


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, x: torch.Tensor,
        y: torch.Tensor, epochs: int, generator: torch.Generator, on_epoch=lambda epoch: None) -> None:
    for epoch in range(epochs):
        on_epoch(epoch)
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), BATCH):
            batch = order[i : i + BATCH]
            loss = F.cross_entropy(model(random_shift(x[batch], SHIFT, generator)), y[batch],
                                   label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()


def run(name: str, data: dict, epochs: int, qat_epochs: int) -> dict[str, float]:
    (x, y), (x_test, y_test) = data["train"], data["test"]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    build = importlib.import_module(f"nets.{name}").build
    fp32 = build(num_classes=10, input_shape=list(x.shape[1:]))
    steps = epochs * -(-len(y) // BATCH)
    optimizer = torch.optim.AdamW(fp32.parameters(), lr=LR, weight_decay=1e-4)
    start = time.perf_counter()
    fit(fp32, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps), x, y,
        epochs, generator)
    trained = time.perf_counter() - start

    ptq = prepare(copy.deepcopy(fp32), "ptq", "x86", x[:1])
    calibration = x[torch.randperm(len(y), generator=generator)[: CALIBRATION_BATCHES * BATCH]]
    with torch.no_grad():
        for i in range(0, len(calibration), BATCH):
            ptq(calibration[i : i + BATCH])

    # The qat stage's recipe: SGD at a low LR, cosine to zero; BatchNorm statistics frozen
    # halfway, observers for the last epoch.
    qat = prepare(copy.deepcopy(fp32), "qat", "x86", x[:1])
    optimizer = torch.optim.SGD(qat.parameters(), lr=QAT_LR, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, qat_epochs * -(-len(y) // BATCH))

    def freeze(epoch: int) -> None:
        if epoch == qat_epochs // 2:
            qat.apply(freeze_bn_stats)
        if epoch == qat_epochs - 1:
            qat.apply(disable_observer)

    start = time.perf_counter()
    fit(qat, optimizer, schedule, x, y, qat_epochs, generator, freeze)
    return {"params": sum(p.numel() for p in fp32.parameters()), "fp32": accuracy(fp32, x_test, y_test),
            "ptq_int8": accuracy(convert(ptq), x_test, y_test), "qat_int8": accuracy(convert(qat), x_test, y_test),
            "train_s": trained, "qat_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--nets", nargs="+", default=["resnet", "mobilenet"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="one epoch each on 256 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
    data = mnist(256 if args.dry_run else None)
    epochs, qat_epochs = (1, 2) if args.dry_run else (args.epochs, args.qat_epochs)
    print(f"{'net':<10} {'params':>8} {'fp32':>7} {'ptq int8':>9} {'qat int8':>9} {'qat drop':>9}  time")
    for name in args.nets:
        r = run(name, data, epochs, qat_epochs)
        print(f"{name:<10} {r['params']:>8,} {r['fp32']:>7.2%} {r['ptq_int8']:>9.2%} {r['qat_int8']:>9.2%} "
              f"{100 * (r['fp32'] - r['qat_int8']):>6.2f} pp  train {r['train_s']:.0f}s, qat {r['qat_s']:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
