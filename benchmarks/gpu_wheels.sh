#!/usr/bin/env bash
# Download, HERE (with network), the wheels that benchmarks/gpu_campaign.sh installs on the GPU machine,
# which has Python 3.12, torch, numba, tifffile and timm but not zarr, numcodecs, h5py, imagecodecs,
# torchmetrics, einops.
#
#     bash benchmarks/gpu_wheels.sh                      # -> .whl/*.whl (git-ignored; about 16 MiB)
#     WITH_IMAGECODECS=1 bash benchmarks/gpu_wheels.sh   # + imagecodecs (26 MiB more; the campaign needs
#                                                        #   none: its images are zarr and synthetic)
#
# Carry the folder to the device call: carry [".whl", ".mnist"] (see benchmarks/README.md, "GPU campaign").
# The versions are the ones tested in .venv; each wheel's own requirements were read with
#     unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist
# zarr 3 -> numcodecs, donfig (-> pyyaml), google-crc32c, typing_extensions, packaging, numpy;
# numcodecs -> numpy, typing_extensions; torchmetrics -> lightning-utilities (-> packaging,
# typing_extensions), numpy, packaging, torch; h5py, imagecodecs -> numpy. numpy and torch are on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 typing_extensions==4.16.0
  packaging==26.4 PyYAML==6.0.4 einops==0.8.2 h5py==3.16.0 torchmetrics==1.9.0 lightning-utilities==0.15.3
)
if [ "${WITH_IMAGECODECS:-0}" = 1 ]; then WHEELS+=(imagecodecs==2026.3.6); fi
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
