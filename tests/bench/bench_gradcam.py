"""Cost of Grad-CAM over the plain forward pass, measured in one run.

Compares, on the same input and model (ResNet-50 BoneAgeNet, random weights):

- the bare forward pass (trunk + head, inference mode),
- our head-only Grad-CAM (`models.gradcam.predict_with_cam`): one trunk forward and a
  gradient through the head only,
- full-autograd Grad-CAM (`models.gradcam.full_autograd_gradcam`): hooks and a backward
  pass through the whole trunk.

Timings are medians of interleaved repeats, so drift affects all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.gradcam import full_autograd_gradcam, predict_with_cam
from models.net import build_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(arch=args.arch).to(device).eval()
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    male = torch.ones(args.batch, device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(x, male)

    def head_only() -> None:
        predict_with_cam(model, x, male)

    def full() -> None:
        full_autograd_gradcam(model, x, male)

    cases = {"forward": forward, "head-only Grad-CAM": head_only, "full-autograd Grad-CAM": full}
    for fn in cases.values():  # warm-up: allocator, kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["forward"])
    print(
        f"{args.arch}, {args.size}x{args.size}, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'case':<26}{'median s':>10}{'× forward':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<26}{median:>10.3f}{median / base:>11.2f}")
    head = statistics.median(times["head-only Grad-CAM"])
    full_t = statistics.median(times["full-autograd Grad-CAM"])
    print(
        f"head-only overhead over forward: {100 * (head / base - 1):+.1f}%; "
        f"full autograd / head-only: {full_t / head:.2f}×"
    )


if __name__ == "__main__":
    main()
