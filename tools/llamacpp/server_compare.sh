#!/bin/bash
# Serving throughput against llama.cpp's llama-server on the same machine and weights: the same
# load client (crates/llama4-server/examples/load.rs: N concurrent streamed completions of
# 128-id prompts and 128 new tokens with ignore_eos) against our server and against
# `llama-server -np N -t 2` on the BF16 GGUF of the same checkpoint, interleaved per round.
#
#   BUILD=/work/llamacpp/build MODEL=/work/bench/bench-mid GGUF=/tmp/bench-mid-bf16.gguf \
#     ROUNDS=2 STREAMS=1,4,8,16 tools/llamacpp/server_compare.sh
#
# Needs `cargo build --release -p llama4-server --bin llama4-server --example load` first. Each
# server gets as many slots as the largest N and is started once per round, then stopped.
# OURS_ARGS adds flags to our server (e.g. `--prefill-chunk 2048`, llama-server's logical
# batch); when OURS_ARGS2 or OURS2 (another build of the server) is set, a second configuration
# of ours runs in each round too.
# LLAMA_ARGS adds flags to llama-server (e.g. `--load-mode none`, to read its weights from
# memory it allocated rather than from the file's map).
set -u
B=${BUILD:?}/bin
LOAD=${LOAD:-target/release/examples/load}
OURS=${OURS:-target/release/llama4-server}
STREAMS=${STREAMS:-1,4,8,16}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-18089}
slots=$(echo "$STREAMS" | tr ',' '\n' | sort -n | tail -1)

wait_up() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
    kill -0 "$1" 2>/dev/null || break  # the server exited (a refused flag, say)
    sleep 0.5
  done
  echo "server did not come up" >&2; return 1
}

run() {
  local name=$1; shift
  "$@" >/tmp/server_compare.$name.log 2>&1 &
  local pid=$!
  wait_up $pid || { kill $pid 2>/dev/null; tail /tmp/server_compare.$name.log; return 1; }
  echo "== $name: $* (round $round) $(uptime | sed 's/.*load/load/')"
  "$LOAD" --url "http://127.0.0.1:$PORT" --streams "$STREAMS" 2>&1 | grep -v '^$'
  kill $pid; wait $pid 2>/dev/null
}

for round in $(seq 1 "$ROUNDS"); do
  run ours "$OURS" --model "${MODEL:?}" --port "$PORT" --parallel "$slots" ${OURS_ARGS:-}
  if [ -n "${OURS_ARGS2:-}${OURS2:-}" ]; then
    run ours2 "${OURS2:-$OURS}" --model "${MODEL:?}" --port "$PORT" --parallel "$slots" ${OURS_ARGS2:-}
  fi
  run llama.cpp "$B/llama-server" -m "${GGUF:?}" --port "$PORT" -np "$slots" -t 2 \
    -c $((slots * 512)) --no-webui ${LLAMA_ARGS:-}
done
