#!/usr/bin/env bash
# On the GPU machine (from the repository root, with artifacts/gpu-bundle carried over): install the carried
# onnxruntime-gpu and web stack into folders of their own, put them first on PYTHONPATH (shadowing the CPU
# onnxruntime there), check that CUDA really is available, then run the accelerator check.
#   OUT=loadtest/results/gpu bash scripts/gpu_check.sh [python -m loadtest.gpu_check options]
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=artifacts/gpu-bundle
site=${SITE:-/tmp/scs-gpu-site}
out=${OUT:-loadtest/results/gpu}
mkdir -p "$site" "$out"
if [ ! -d "$site/ort/onnxruntime" ]; then
    wheel=$(cut -d' ' -f3 "$bundle/ort/SHA256SUMS")
    cat "$bundle"/ort/part-* > "$site/$wheel"
    (cd "$site" && sha256sum -c "$OLDPWD/$bundle/ort/SHA256SUMS")
    python3 -m pip install --quiet --no-index --no-deps --target "$site/ort" "$site/$wheel"
    rm "$site/$wheel"
fi
[ -d "$site/deps/fastapi" ] || python3 -m pip install --quiet --no-index --no-deps --target "$site/deps" "$bundle"/wheels/*.whl
export PYTHONPATH="$site/ort:$site/deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import onnxruntime as ort
ort.preload_dlls()
available = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers", available)
raise SystemExit(0 if "CUDAExecutionProvider" in available else "error: onnxruntime-gpu offers no CUDAExecutionProvider here")
PY
python3 -m loadtest.gpu_check --provider cuda --out "$out" "$@"
