#!/usr/bin/env bash
# Wheels for running the benchmarks on a lent GPU machine, whose image has PyTorch but
# neither the DICOM nor the database packages, and which can download nothing.
#
#   scripts/gpu-wheels.sh            # here: fills .whl/ (ignored by git) with CPython 3.12 wheels
#
# Then, through the device tool, with `.whl` carried (docs/performance.md, "GPU"):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. python3 -m tests.bench.bench_batching --device cuda
#
# The versions are those this project's .venv holds, so the GPU runs the code tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/pip ]] || { echo "run scripts/setup.sh first" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

# What the benchmark imports beyond what the GPU image carries (PyTorch, numpy, scipy,
# Pillow, safetensors, tqdm, packaging, typing-extensions are there).
packages=(alembic annotated-types highdicom imagecodecs mako pydantic pydantic-core
  pydantic-settings pydicom pyjpegls pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg
  pylibjpeg-rle pynetdicom python-dotenv sqlalchemy typing-inspection)
pins=()
for name in "${packages[@]}"; do
  version=$(.venv/bin/pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)
  [[ -n "$version" ]] || { echo "$name is not installed in .venv" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform any -d .whl "${pins[@]}"
# bench_gradcam's outside reference, pytorch-grad-cam, comes as a source archive only: pure
# Python, so a wheel built here installs there (OpenCV, matplotlib and scikit-learn, which
# it needs, are in the GPU image).
for name in grad-cam ttach; do
  version=$(.venv/bin/pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)
  [[ -n "$version" ]] || { echo "$name is not installed in .venv: pip install -e '.[bench]'" >&2; exit 1; }
  .venv/bin/pip wheel -q --no-deps -w .whl "$name==$version"
done
echo "==> $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
