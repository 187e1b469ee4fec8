#!/usr/bin/env bash
# Prepare, on this machine, what the GPU machine lacks (it has no network): onnxruntime-gpu for CPython 3.12 cut
# into parts that fit one device-run carry (45 MB each, with the whole wheel's sha256), and a wheelhouse of the
# service's web stack and the load generator's client for CPython 3.12. Writes artifacts/gpu-bundle/ (git-ignored).
#   bash scripts/gpu_bundle.sh            then carry artifacts/gpu-bundle/<part> one per run (README, "GPU")
set -euo pipefail
cd "$(dirname "$0")/.."
out=artifacts/gpu-bundle
PY=${PY:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out/ort" "$out/wheels"
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64)
"$PY" -m pip download --quiet --no-deps "${target[@]}" -d "$out/ort" onnxruntime-gpu==1.31.1
wheel=$(ls "$out"/ort/*.whl)
(cd "$out/ort" && sha256sum "$(basename "$wheel")" > SHA256SUMS && split -b 45M -d "$(basename "$wheel")" part- \
    && rm "$(basename "$wheel")")
# The serve extra without onnxruntime (the GPU machine has numpy and tokenizers), and the traffic client.
"$PY" -m pip download --quiet "${target[@]}" -d "$out/wheels" \
    "fastapi==0.165.0" "starlette==1.10.0" "uvicorn==0.54.0" "httptools==0.9.0" "pydantic==2.14.4" \
    "pydantic-settings==2.16.3" "orjson==3.13.0" "gevent==26.9.0" "geventhttpclient==2.6.1" "greenlet==3.3.2" \
    "psutil==7.2.2"
rm -f "$out"/wheels/numpy-* "$out"/wheels/tokenizers-* "$out"/wheels/huggingface_hub-*
du -sh "$out"/ort/part-* "$out/wheels" | sed 's/^/  /'
echo "bundle ready in $out: carry each $out/ort/part-* in its own run, and $out/wheels with the last part"
