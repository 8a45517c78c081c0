"""Training throughput (images/s) of candidate architectures on this machine, side by side in one process.

    python bench/throughput.py [--steps 12] [--batch 128]     # prints; writes nothing

Session measurement (2 shared cores, OMP_NUM_THREADS=1, crop+flip, batch 128): small_cnn w16 ~405-430 img/s,
w32 + stem_pool ~430-470 img/s (4x the weights), w48 + stem_pool ~170-245 img/s. Under contention 2 threads ran
2-3x slower than 1 (140-190 vs 415-420 img/s for w16).
"""

from __future__ import annotations

import time

import torch
from common import argparser

from prune2edge import models, train


def measure(arch: str, kwargs: dict, batch: int, steps: int, augment: str) -> float:
    torch.manual_seed(0)
    model = models.build(arch, (32, 32, 3), 10, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch * steps, 3, 32, 32), torch.randint(0, 10, (batch * steps,))
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = None
    for i in range(steps):
        if i == 2:
            t0 = time.perf_counter()
        xb = train.augment_batch(x[i * batch : (i + 1) * batch], augment, gen)
        loss = torch.nn.functional.cross_entropy(model(xb), y[i * batch : (i + 1) * batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * (steps - 2) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparser(__doc__, docs=False)
    ap.add_argument(
        "--steps", type=int, default=12, help="training steps per network, the first 2 untimed (default 12)"
    )
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    a = ap.parse_args()
    cands = [
        ("small_cnn", {"width": 16, "depth": 3}),
        ("small_cnn", {"width": 24, "depth": 3}),
        ("small_cnn", {"width": 32, "depth": 3}),
        ("small_cnn", {"width": 32, "depth": 3, "stem_pool": True}),
        ("small_cnn", {"width": 48, "depth": 3, "stem_pool": True}),
        ("resnet20", {}),
    ]
    print(f"torch threads {torch.get_num_threads()}")
    for arch, kw in cands:
        for aug in ("none", "crop_flip"):
            ips = measure(arch, kw, a.batch, a.steps, aug)
            print(f"{arch} {kw} augment={aug}: {ips:7.0f} img/s  -> {45000 / ips:6.1f} s/epoch (45k)", flush=True)


if __name__ == "__main__":
    main()
