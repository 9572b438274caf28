"""Cost of Grad-CAM over the plain forward pass, measured in one run.

Compares, on the same input and model (ResNet-50 BoneAgeNet, random weights):

- the bare forward pass (trunk + head, inference mode),
- our head-only Grad-CAM (`models.gradcam.predict_with_cam`): one trunk forward and a
  gradient through the head only,
- full-autograd Grad-CAM (`models.gradcam.full_autograd_gradcam`): hooks and a backward
  pass through the whole trunk,
- the `grad-cam` package from PyPI (`pytorch_grad_cam.GradCAM`) on the same layer
  (``layer4``), as an outside reference. It is optional, installed with the ``bench`` extra
  (``pip install -e '.[bench]'``); without it that row is skipped. Only its CAM call is
  timed (building the ``GradCAM`` object, i.e. registering its hooks, and releasing it are
  not), and that call also min-max scales the map and resizes it to the input size with
  OpenCV, which our cases do not. Its map is checked once, untimed, against ours (Pearson
  correlation at input resolution, ours resized as OpenCV resizes).

Timings are medians of interleaved repeats, so drift affects all cases alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gradcam import full_autograd_gradcam, predict_with_cam
from models.net import BoneAgeNet, build_model
from tests.bench import heap_as_in_workers

LIBRARY_CASE = "pytorch-grad-cam GradCAM"


class _SingleInput(nn.Module):
    """BoneAgeNet as a one-input model (what pytorch-grad-cam calls): sex held, output (N, 1)."""

    def __init__(self, model: BoneAgeNet, male: Tensor) -> None:
        super().__init__()
        self.model = model
        self.male = male

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.male).unsqueeze(1)


class _LibraryGradCAM:
    """pytorch-grad-cam's GradCAM on ``layer4``; hooks live only from setup to teardown.

    A fresh ``GradCAM`` per call keeps its hooks (and the graph it retains) off the model
    while the other cases run; the timing loop calls :meth:`setup` and :meth:`teardown`
    outside the timed region.
    """

    def __init__(self, model: BoneAgeNet, x: Tensor, male: Tensor) -> None:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

        self._cls = GradCAM
        self.model = model
        self.wrapped = _SingleInput(model, male)
        self.x = x
        # one target per image: the raw regression output
        self.targets = [RawScoresOutputTarget() for _ in range(x.shape[0])]
        self.cam = None

    def setup(self) -> None:
        self.cam = self._cls(model=self.wrapped, target_layers=[self.model.layer4])

    def __call__(self) -> np.ndarray:
        assert self.cam is not None
        return self.cam(input_tensor=self.x, targets=self.targets)

    def teardown(self) -> None:
        assert self.cam is not None
        self.cam.activations_and_grads.release()
        self.cam = None  # drops the retained graph
        self.model.zero_grad(set_to_none=True)

    def once(self) -> np.ndarray:
        self.setup()
        try:
            return self()
        finally:
            self.teardown()


def _library_case(model: BoneAgeNet, x: Tensor, male: Tensor) -> _LibraryGradCAM | None:
    try:
        return _LibraryGradCAM(model, x, male)
    except ImportError as exc:
        print(
            f"{LIBRARY_CASE}: skipped, grad-cam is not installed ({exc}); "
            "install it with: pip install -e '.[bench]'"
        )
        return None


def _agreement(library: _LibraryGradCAM, model: BoneAgeNet, x: Tensor, male: Tensor) -> float:
    """Pearson correlation of the library's map and ours upsampled, image 0 (untimed)."""
    lib_map = library.once()[0]
    _, cam = predict_with_cam(model, x, male)
    # resized as the library resizes (half-pixel centres), not as upsample_cam draws it
    # for a person (each cell on its receptive field's centre, half a cell up and left):
    # the maps are compared, not the two ways of resizing them
    grid = cam[:1, None].float().cpu()
    ours = F.interpolate(grid, size=lib_map.shape, mode="bilinear", align_corners=False)
    return float(np.corrcoef(lib_map.ravel(), ours[0, 0].numpy().ravel())[0, 1])


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
    heap = heap_as_in_workers()

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

    cases: dict[str, Callable[[], object]] = {
        "forward": forward,
        "head-only Grad-CAM": head_only,
        "full-autograd Grad-CAM": full,
    }
    library = _library_case(model, x, male)
    if library is not None:
        cases[LIBRARY_CASE] = library

    def run(fn: Callable[[], object]) -> float:
        """Time one call; a case's setup/teardown, if any, run outside the clock."""
        setup = getattr(fn, "setup", None)
        teardown = getattr(fn, "teardown", None)
        if setup is not None:
            setup()
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            if teardown is not None:
                teardown()

    for fn in cases.values():  # warm-up: allocator, kernels
        run(fn)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(run(fn))

    base = statistics.median(times["forward"])
    print(
        f"{args.arch}, {args.size}x{args.size}, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; {heap}"
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
    if library is not None:
        lib_t = statistics.median(times[LIBRARY_CASE])
        print(
            f"{LIBRARY_CASE} (grad-cam {version('grad-cam')}) / head-only: {lib_t / head:.2f}×; "
            f"its time includes min-max scaling and an OpenCV resize to {args.size}x{args.size}"
        )
        corr = _agreement(library, model, x, male)
        print(
            f"map agreement, grad-cam vs ours (upsampled bilinearly to "
            f"{args.size}x{args.size}), image 0: Pearson r = {corr:.6f}"
        )


if __name__ == "__main__":
    main()
