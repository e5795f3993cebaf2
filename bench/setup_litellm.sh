#!/usr/bin/env bash
# Install the LiteLLM proxy into its own virtual environment (bench/.venv-litellm), never into
# fleet's .venv: LiteLLM pins its own versions of openai, pydantic, uvicorn, etc.
#   bench/setup_litellm.sh            # create or reuse bench/.venv-litellm
#   LITELLM_SPEC='litellm[proxy]==1.x' bench/setup_litellm.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LITELLM_VENV:-$here/.venv-litellm}"
spec="${LITELLM_SPEC:-litellm[proxy]}"
python="${PYTHON:-python3}"
if [[ -x "$venv/bin/litellm" ]]; then
    echo "LiteLLM already installed in $venv ($("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))'))"
    exit 0
fi
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install --quiet "$spec" 2>&1 | grep -v "^WARNING: Location" || true
echo "LiteLLM $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') installed in $venv"
