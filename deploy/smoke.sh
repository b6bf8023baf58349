#!/usr/bin/env bash
# Build the server image, start it, wait for /ready, classify one text; print the image size, the
# seconds from `docker run` to ready, the container's memory, and how it shuts down (docker stop).
#
#   bash deploy/smoke.sh                                  # a tiny random checkpoint: checks the image works
#   bash deploy/smoke.sh runs/compare/scratch/checkpoint  # bake a trained checkpoint in
#   TORCH_WHEEL_FILE=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl bash deploy/smoke.sh
#       (a local torch wheel instead of PyTorch's CPU index, for machines that cannot reach it)
#
# Needs docker (on this project's machines: bash ../shared/tools/docker-python-base.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-distrinews-server}
PORT=${PORT:-7860}
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)

rm -rf deploy/checkpoint && mkdir -p deploy/checkpoint
if [ -n "${1:-}" ]; then
  cp -r "$1"/. deploy/checkpoint/
else  # a randomly initialised tiny model: answers are meaningless, but every part of the image runs
  "$PY" - <<'PYEOF'
import torch
from experiments.checkpoint import save_checkpoint
from experiments.model import build_model, build_tokenizer
torch.manual_seed(0)
tok = build_tokenizer("tiny")
save_checkpoint(build_model("tiny", vocab_size=len(tok)), tok, "deploy/checkpoint", {"model": "tiny", "max_length": 64})
PYEOF
fi
build_args=()
if [ -n "${TORCH_WHEEL_FILE:-}" ]; then
  cp "$TORCH_WHEEL_FILE" deploy/wheels/
  build_args+=(--build-arg "TORCH_WHEEL=$(basename "$TORCH_WHEEL_FILE")")
fi
t_build=$(date +%s)
docker build --network host -t "$IMAGE" -f deploy/Dockerfile "${build_args[@]}" . >/tmp/distrinews-build.log 2>&1 \
  || { tail -30 /tmp/distrinews-build.log; exit 1; }
echo "built $IMAGE in $(( $(date +%s) - t_build )) s; image size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

t0=$(date +%s.%N)
cid=$(docker run -d --network host -e PORT="$PORT" "$IMAGE")
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 600); do
  if curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; then break; fi
  if [ "$(docker inspect -f '{{.State.Running}}' "$cid")" != true ]; then docker logs "$cid"; exit 1; fi
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { docker logs "$cid"; echo "not ready after 60 s"; exit 1; }
echo "ready $(echo "$(date +%s.%N) - $t0" | bc) s after docker run"
echo "predict: $(curl -s -X POST "http://127.0.0.1:$PORT/predict" -H 'content-type: application/json' \
  -d '{"text": "Stocks fell sharply after the central bank raised interest rates."}')"
echo "memory: $(docker stats --no-stream --format '{{.MemUsage}}' "$cid")"
t_stop=$(date +%s.%N)
docker stop "$cid" >/dev/null
echo "docker stop (SIGTERM): exit code $(docker inspect -f '{{.State.ExitCode}}' "$cid") after $(echo "$(date +%s.%N) - $t_stop" | bc) s"
