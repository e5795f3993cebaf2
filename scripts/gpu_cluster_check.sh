#!/usr/bin/env bash
# On a CUDA machine with Ray and vLLM importable (the offline kit of ../shared/gpu with
# EXTRA_WHEELS holding ray; PYTHONPATH=/root/site:.): a one-node Ray cluster over this machine's
# GPUs and fleet on it ([cluster]). STAGE=replicas: the default model as one replica per GPU
# (Ray actors; gpus = count), answers, nvidia-smi, the status's nodes and GPUs, an actor killed
# and placed anew, `fleet stop` leaving nothing. STAGE=ray-executor: the same model as one
# `multi_node` replica of all the GPUs (tensor parallel = GPUs) through vLLM's Ray executor in a
# placement group fleet made, then `fleet stop` leaving nothing (STOP=kill: a SIGKILLed launcher
# instead). Every snapshot lists the GPU processes with their card's UUID and each card's memory in
# use. Output in ${OUT:-/tmp/gpu-cluster}.
set -uo pipefail
out=${OUT:-/tmp/gpu-cluster}; mkdir -p "$out"
stage=${STAGE:-replicas}
export FLEET_CACHE_DIR=${FLEET_CACHE_DIR:-/root/fleet-cache} FLEET_LOG_DIR=$out/logs HF_HUB_OFFLINE=1
export VLLM_USE_FLASHINFER_SAMPLER=0 RAY_USAGE_STATS_ENABLED=0
model=${LOCAL_MODEL:-/root/models/smollm2-135m-instruct}
gpus=$(nvidia-smi -L | wc -l)
fleet() { python3 -m fleet.cli "$@"; }
ray_cli() { python3 -c 'from ray.scripts.scripts import main; main()' "$@"; }
if ! ray_cli status >/dev/null 2>&1; then
  ray_cli start --head --num-gpus="$gpus" --num-cpus=8 --include-dashboard=false --disable-usage-stats > "$out/ray-start.txt" 2>&1
fi
if [ "$stage" = replicas ]; then
  extra="gpus = $gpus
replicas = $gpus"
else
  extra="gpus = $gpus
multi_node = true"
fi
cat > "$out/$stage.toml" <<TOML
[gateway]
port = 8000

[cluster]
address = "auto"

[[models]]
name = "smol"
source = "$model"
port = 5001
max_model_len = 2048
gpu_memory_utilization = 0.5
enforce_eager = true
$extra
TOML
snapshot() {  # what runs: GPU processes, engines, actors
  { date +%T; nvidia-smi --query-compute-apps=pid,process_name,used_memory,gpu_uuid --format=csv
    nvidia-smi --query-gpu=index,uuid,memory.used --format=csv
    ps -eo pid,ppid,pgid,etimes,cmd | grep -E 'fleet.engine|VLLM|EngineHost|RayWorkerWrapper|fleet.cluster.reaper' | grep -v grep | cut -c1-160; } > "$out/$stage-$1.txt" 2>&1
}
wait_ready() {  # until every replica is ready ($1: how many), or the launcher died; at most $2 s
  for _ in $(seq 1 "$2"); do
    n=$(curl -s localhost:8000/fleet/status | python3 -c 'import json,sys; print(sum(r["state"]=="ready" for r in json.load(sys.stdin)["models"]))' 2>/dev/null)
    [ "${n:-0}" -ge "$1" ] && return 0
    kill -0 "$launcher" 2>/dev/null || return 1; sleep 1
  done; return 1
}
ask() {
  python3 - <<'PY'
from openai import OpenAI
c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x", max_retries=0)
for i in range(8):
    r = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
print("completion:", repr(r.choices[0].text))
r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0)
print("chat:", repr(r.choices[0].message.content))
PY
}
fleet check --config "$out/$stage.toml" > "$out/$stage-check.txt" 2>&1
start=$(date +%s)
python3 -m fleet.cli launch --config "$out/$stage.toml" > "$out/$stage-launcher.txt" 2>&1 &  # not the shell function: $! is the launcher itself
launcher=$!
want=$([ "$stage" = replicas ] && echo "$gpus" || echo 1)
wait_ready "$want" 300; echo "ready: $? after $(( $(date +%s) - start )) s" | tee "$out/$stage-ready.txt"
snapshot running
ask > "$out/$stage-answers.txt" 2>&1
fleet status --json --config "$out/$stage.toml" > "$out/$stage-status.json" 2>&1
if [ "$stage" = replicas ]; then
  engine=$(python3 -c 'import json; print(json.load(open("'"$out/$stage-status.json"'"))["models"][0]["pid"])')
  actor=$(ps -o ppid= -p "$engine" | tr -d ' ')
  echo "killing actor worker $actor (engine $engine)" > "$out/$stage-kill.txt"
  kill -9 "$actor"; sleep 3
  start=$(date +%s); wait_ready "$want" 300; echo "ready again: $? after $(( $(date +%s) - start )) s" >> "$out/$stage-kill.txt"
  ask >> "$out/$stage-kill.txt" 2>&1
  fleet status --config "$out/$stage.toml" >> "$out/$stage-kill.txt" 2>&1
  fleet stop --config "$out/$stage.toml" > "$out/$stage-stop.txt" 2>&1
  wait "$launcher"; echo "launcher exit: $?" >> "$out/$stage-stop.txt"
elif [ "${STOP:-fleet}" = fleet ]; then
  fleet stop --config "$out/$stage.toml" > "$out/$stage-stop.txt" 2>&1
  wait "$launcher"; echo "launcher exit: $?" >> "$out/$stage-stop.txt"
else
  kill -9 "$launcher"; killed=$(date +%s)
  for _ in $(seq 1 120); do
    pgrep -f 'EngineHost|fleet.engine' >/dev/null || break; sleep 1
  done
  echo "launcher SIGKILLed; engine processes gone after $(( $(date +%s) - killed )) s" > "$out/$stage-stop.txt"
fi
snapshot after
