#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored) with what `python bench/report.py --gpu` installs on a GPU machine that has no
# registry access: cp312 manylinux/any wheels of every distribution in bench/gpu_wheels.txt, each at the version
# installed in this repo's venv (so the GPU side runs the same diffusers/transformers/flax as our tests), no deps.
#   bench/fetch_gpu_wheels.sh            # on a machine with PyPI access, from the repo root
# Then carry bench/wheels/ along with the work tree to the GPU machine (about 30 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/wheels
mkdir -p "$OUT"
pins=$("$PY" - <<'PYEOF'
import importlib.metadata as md
for line in open("bench/gpu_wheels.txt"):
    name = line.split("#")[0].strip()
    if not name:
        continue
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --dest "$OUT" --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  $pins
ls "$OUT" | wc -l | xargs echo "wheels in $OUT:"
du -sh "$OUT"
