#!/usr/bin/env bash
# Build the server image, start it, wait for /ready, classify one text, then a burst; print the
# image size, the seconds from `docker run` to ready, the server's memory (RSS after the first
# prediction, and its peak after the burst) and how it shuts down (docker stop).
#
#   bash deploy/smoke.sh                  # a tiny random checkpoint: checks the image works
#   bash deploy/smoke.sh minilm-l6        # all-MiniLM-L6-v2 (needs the `offline` extra here)
#   bash deploy/smoke.sh distilbert       # DistilBERT's size: a default DistilBertConfig, random weights
#   bash deploy/smoke.sh runs/compare/scratch/checkpoint   # bake a trained checkpoint in
#   SERVER_ARGS="--max-batch-tokens 2048 --max-batch-size 16" bash deploy/smoke.sh minilm-l6   # server options
#   TORCH_WHEEL_FILE=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl bash deploy/smoke.sh
#       (a local torch wheel instead of PyTorch's CPU index, for machines that cannot reach it;
#        it is linked into deploy/wheels/ for the build's first stage and removed afterwards)
#   ONNX=1 DOCKER_RUN_ARGS="--memory=512m --cpus=0.1" bash deploy/smoke.sh distilbert
#       the torch-free image (deploy/Dockerfile.onnx): the checkpoint is exported first
#       (python -m experiments.export, int8), the server runs with the image's SERVER_ARGS (the
#       settings for a tenth of a CPU) unless SERVER_ARGS is given; DOCKER_RUN_ARGS go to docker run
#
# Needs docker (on this project's machines: bash ../shared/tools/docker-python-base.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-distrinews-server}
PORT=${PORT:-7860}
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
WHAT=${1:-tiny}

find deploy/checkpoint -mindepth 1 ! -name README -exec rm -rf {} +  # README: the placeholder git keeps
if [ -d "$WHAT" ]; then
  cp -r "$WHAT"/. deploy/checkpoint/
else  # built here: tiny and distilbert with random weights (meaningless answers, the real sizes and code paths)
  tmp=$(mktemp -d) && "$PY" - "$WHAT" "$tmp/checkpoint" <<'PYEOF'
import sys
import torch
from transformers import AutoModelForSequenceClassification, DistilBertConfig
from experiments.checkpoint import save_checkpoint
from experiments.model import ID2LABEL, LABELS, build_model, build_tokenizer
what = sys.argv[1]
torch.manual_seed(0)
if what == "tiny":
    tok = build_tokenizer("tiny")
    model = build_model("tiny", vocab_size=len(tok))
elif what == "minilm-l6":  # the pre-trained weights of the `offline` package, untrained head
    tok, model = build_tokenizer("minilm-l6"), build_model("minilm-l6")
elif what == "distilbert":  # distilbert-base-uncased's shape (66M parameters); BERT's uncased vocabulary
    tok = build_tokenizer("minilm-l6")  # the same 30,522 tokens; the hub is not reachable from here
    config = DistilBertConfig(num_labels=len(LABELS), id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    model = AutoModelForSequenceClassification.from_config(config)
else:
    sys.exit(f"error: {what!r} is neither a checkpoint directory nor one of tiny, minilm-l6, distilbert")
save_checkpoint(model, tok, sys.argv[2], {"model": what, "max_length": 128 if what != "tiny" else 64})
print(f"checkpoint: {what}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
PYEOF
  cp -r "$tmp/checkpoint"/. deploy/checkpoint/ && rm -rf "$tmp"
fi
DOCKERFILE=deploy/Dockerfile
if [ -n "${ONNX:-}" ]; then
  IMAGE=${IMAGE_ONNX:-distrinews-onnx}
  DOCKERFILE=deploy/Dockerfile.onnx
  [ -f deploy/checkpoint/onnx/model_quantized.onnx ] || "$PY" -m experiments.export deploy/checkpoint --no-check
fi
build_args=()
if [ -n "${TORCH_WHEEL_FILE:-}" ] && [ -z "${ONNX:-}" ]; then
  wheel="deploy/wheels/$(basename "$TORCH_WHEEL_FILE")"
  ln -f "$TORCH_WHEEL_FILE" "$wheel" 2>/dev/null || cp "$TORCH_WHEEL_FILE" "$wheel"
  trap 'rm -f "$wheel"' EXIT
  build_args+=(--build-arg "TORCH_WHEEL=$(basename "$TORCH_WHEEL_FILE")")
fi
t_build=$(date +%s)
docker build --network host -t "$IMAGE" -f "$DOCKERFILE" "${build_args[@]}" . >/tmp/distrinews-build.log 2>&1 \
  || { tail -30 /tmp/distrinews-build.log; exit 1; }
echo "built $IMAGE in $(( $(date +%s) - t_build )) s; image size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

t0=$(date +%s.%N)
# SERVER_ARGS, when given, replaces the image's own (deploy/Dockerfile.onnx sets them; deploy/Dockerfile has none)
run_env=(-e PORT="$PORT")
[ -n "${SERVER_ARGS+set}" ] && run_env+=(-e SERVER_ARGS="$SERVER_ARGS")
# shellcheck disable=SC2086  # DOCKER_RUN_ARGS: several options
cid=$(docker run -d --network host "${run_env[@]}" ${DOCKER_RUN_ARGS:-} "$IMAGE" \
  sh -c 'exec python -m server --checkpoint /checkpoint --host 0.0.0.0 --port "$PORT" ${SERVER_ARGS:-}')
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true; rm -f "${wheel:-}"' EXIT
for _ in $(seq 1200); do
  if curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; then break; fi
  if [ "$(docker inspect -f '{{.State.Running}}' "$cid")" != true ]; then docker logs "$cid"; exit 1; fi
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { docker logs "$cid"; echo "not ready after 120 s"; exit 1; }
echo "ready $(echo "$(date +%s.%N) - $t0" | bc) s after docker run"
echo "predict: $(curl -s -X POST "http://127.0.0.1:$PORT/predict" -H 'content-type: application/json' \
  -d '{"text": "Stocks fell sharply after the central bank raised interest rates."}')"
# PID 1 is the server. RSS = anonymous memory (weights, activations, Python) + mapped files (libtorch):
# the anonymous part is what a memory limit cannot reclaim.
mem() { docker exec "$cid" cat /proc/1/status | awk '/^(VmRSS|RssAnon|RssFile|VmHWM)/ {m[$1] = $2 / 1024}
  END {printf "RSS %.0f MiB (anonymous %.0f, files %.0f), peak RSS %.0f MiB", m["VmRSS:"], m["RssAnon:"], m["RssFile:"], m["VmHWM:"]}'; }
echo "memory after the first prediction: $(mem); docker stats: $(docker stats --no-stream --format '{{.MemUsage}}' "$cid")"
# A burst: 64 concurrent requests of 128 tokens each, so the batcher runs full batches (64 texts x 128 tokens)
long=$("$PY" -c 'import json; print(json.dumps({"text": " ".join(["markets rallied as rates fell"] * 40)}))')
t_burst=$(date +%s.%N)
codes=$(seq 64 | xargs -P 64 -I{} curl -s -o /dev/null -w '%{http_code}\n' --max-time 1800 -X POST \
  "http://127.0.0.1:$PORT/predict" -H 'content-type: application/json' -d "$long" | sort | uniq -c | xargs)
echo "burst of 64 concurrent 128-token requests: answered in $(echo "$(date +%s.%N) - $t_burst" | bc) s, status counts: $codes"
if [ "$(docker inspect -f '{{.State.Running}} {{.State.OOMKilled}}' "$cid")" != "true false" ]; then
  echo "the container did not survive the burst: $(docker inspect -f 'running {{.State.Running}}, OOM-killed {{.State.OOMKilled}}, exit {{.State.ExitCode}}' "$cid")"
  docker logs "$cid" 2>&1 | tail -20; exit 1
fi
echo "memory after the burst: $(mem); docker stats: $(docker stats --no-stream --format '{{.MemUsage}}' "$cid")"
t_stop=$(date +%s.%N)
docker stop "$cid" >/dev/null
echo "docker stop (SIGTERM): exit code $(docker inspect -f '{{.State.ExitCode}}' "$cid") after $(echo "$(date +%s.%N) - $t_stop" | bc) s"
