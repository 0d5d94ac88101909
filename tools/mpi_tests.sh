#!/bin/sh
# Expert parallelism over MPI: builds the `mpi_parity` example (crate expert-parallel, feature
# `mpi`: needs an MPI installation and libclang) and runs it with 2 and 3 ranks on the f32
# fixtures (top-1 with 16 experts: 8/8 and 5/5/6; top-2 with 8 experts: 4/4 and 2/3/3). Each run
# checks the logits against one process (1e-6 relative) and the greedy ids, and prints every
# rank's resident expert bytes and rank 0's communication time per decode step. Then the same
# on a checkpoint written here with MB-sized experts (`make_checkpoint --preset ep-resident`,
# 53 MB, removed at exit), where each rank must hold no more than its share of the expert bytes
# and 64 KiB at each edge of it. Last, `llama4-server --expert-parallel` under `mpirun -np 2`
# answers completions as one server process does (curl over a socket), and every rank exits when
# mpirun is interrupted. Run from the repository root; any failed check makes the script fail.
set -eu
cargo build --release -p expert-parallel --features mpi --example mpi_parity
cargo build --release --example make_checkpoint
cargo build --release -p llama4-server --features mpi
BIN=target/release/examples/mpi_parity
# Running as root (CI containers) needs the flag; several ranks per core need --oversubscribe.
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
# One thread per rank: the ranks share the machine's cores.
export RAYON_NUM_THREADS=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama4-mpi.XXXXXX")
# Background processes this script started (servers, mpirun), stopped at exit whatever happens.
PIDS=""
cleanup() {
    for pid in $PIDS; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

for model in scout top2_tied; do
    for np in 2 3; do
        echo "== mpirun -np $np mpi_parity --model fixtures/models/$model"
        $MPIRUN -np "$np" "$BIN" --model "fixtures/models/$model"
    done
done

# Resident expert bytes per rank. The fixtures' experts are smaller than the kernel's
# fault-around window, so every rank maps nearly all of them; these are 1 MiB and 0.5 MiB per
# expert and tensor (bf16). The file's cached pages are dropped before each run: the kernel maps
# whole cached folios (up to 2 MiB) around a fault, and the writer left the file cached in large
# ones; dropped, the page cache holds only what the ranks read, as on hosts of their own.
# A 64-token prompt routes rows to nearly every expert.
target/release/examples/make_checkpoint --preset ep-resident --out "$WORK/ep-resident"
for np in 2 3; do
    sync "$WORK/ep-resident/model.safetensors"
    dd if="$WORK/ep-resident/model.safetensors" iflag=nocache count=0 status=none
    echo "== mpirun -np $np mpi_parity --model ep-resident --prompt-len 64"
    $MPIRUN -np "$np" "$BIN" --model "$WORK/ep-resident" --prompt-len 64
done

# llama4-server --expert-parallel: rank 0 serves HTTP with its share of the experts, rank 1 runs
# the other share. Answers must equal one server process's on the same checkpoint.
SERVER=target/release/llama4-server

# start_server LOG COMMAND...: runs COMMAND in the background (SPID), waits until GET /health
# answers 200 at the address it prints (URL; it binds port 0, a free port).
start_server() {
    log=$1
    shift
    : >"$log"
    "$@" >"$log" 2>&1 &
    SPID=$!
    PIDS="$PIDS $SPID"
    URL=""
    tries=0
    while [ "$tries" -lt 600 ]; do
        # The address alone, not the text around it: under mpirun another rank's output may
        # share the line.
        [ -n "$URL" ] || URL=$(grep -o 'listening on .*' "$log" | grep -o '[0-9]\{1,3\}\(\.[0-9]\{1,3\}\)\{3\}:[0-9]\{1,5\}' | head -n 1 | sed 's|^|http://|')
        if [ -n "$URL" ] && curl -sf "$URL/health" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$SPID" 2>/dev/null; then
            cat "$log"
            echo "error: the server exited before answering /health" >&2
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    cat "$log"
    echo "error: the server did not answer /health within 60 s" >&2
    return 1
}

# await_exit PID...: waits up to 30 s for every PID to end; fails if one still runs.
await_exit() {
    tries=0
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 300 ]; do
            tries=$((tries + 1))
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "error: process $pid still runs 30 s after the signal" >&2
            return 1
        fi
    done
}

# stop_server SIGNAL PID: sends SIGNAL to PID (the server, or one rank of it), waits for SPID
# and sets STATUS to its exit status.
stop_server() {
    kill "-$1" "$2"
    await_exit "$SPID"
    STATUS=0
    wait "$SPID" || STATUS=$?
}

# children PID: the processes whose parent is PID (from /proc: no procps needed).
children() {
    for stat in /proc/[0-9]*/stat; do
        read -r pid _comm _state ppid _rest <"$stat" 2>/dev/null || continue
        [ "$ppid" = "$1" ] && echo "$pid"
    done
    return 0
}

# completions OUT: greedy completions of two prompts (token ids: the fixture has no
# tokenizer, so the text is the generated ids) from URL, their choices written to OUT.
completions() {
    : >"$1"
    for prompt in "1, 2, 3, 4, 5, 6, 7, 8" "40, 7, 300, 12"; do
        body="{\"prompt\": [$prompt], \"temperature\": 0, \"max_tokens\": 8}"
        reply=$(curl -sf -X POST "$URL/v1/completions" -H 'Content-Type: application/json' -d "$body")
        choices=$(printf '%s' "$reply" | sed -n 's/.*"choices":\(\[.*\]\),"usage":.*/\1/p')
        if [ -z "$choices" ]; then
            echo "error: no choices in $reply" >&2
            return 1
        fi
        echo "$choices" >>"$1"
    done
}

MODEL=fixtures/models/scout
echo "== llama4-server --model $MODEL (one process)"
start_server "$WORK/alone.log" "$SERVER" --model "$MODEL" --port 0
completions "$WORK/alone.txt"
stop_server INT "$SPID"
[ "$STATUS" -eq 0 ] || { cat "$WORK/alone.log"; echo "error: exit status $STATUS" >&2; exit 1; }
cat "$WORK/alone.txt"

# ranks_of_server: the rank processes under mpirun SPID (RANKS) and rank 0's (RANK0).
ranks_of_server() {
    RANKS=$(children "$SPID")
    RANK0=""
    for pid in $RANKS; do
        if tr '\0' '\n' <"/proc/$pid/environ" | grep -qx 'OMPI_COMM_WORLD_RANK=0'; then
            RANK0=$pid
        fi
    done
    if [ "$(echo "$RANKS" | wc -w)" -ne 2 ] || [ -z "$RANK0" ]; then
        echo "error: expected 2 ranks under mpirun, found: $RANKS (rank 0: $RANK0)" >&2
        return 1
    fi
}

echo "== mpirun -np 2 llama4-server --model $MODEL --expert-parallel"
start_server "$WORK/ep.log" $MPIRUN -np 2 "$SERVER" --model "$MODEL" --port 0 --expert-parallel
ranks_of_server
completions "$WORK/ep.txt"
cat "$WORK/ep.txt"
if ! cmp -s "$WORK/alone.txt" "$WORK/ep.txt"; then
    echo "error: --expert-parallel answers differ from one process's" >&2
    exit 1
fi
# Rank 0 shut down (SIGTERM, as a service manager sends): it drops the model, which tells
# rank 1 to stop; both exit cleanly, and so does mpirun.
stop_server TERM "$RANK0"
cat "$WORK/ep.log"
[ "$STATUS" -eq 0 ] || { echo "error: mpirun exited with status $STATUS" >&2; exit 1; }
grep -q 'rank 1: rank 0 stopped; exiting' "$WORK/ep.log" || { echo "error: rank 1 did not stop" >&2; exit 1; }
await_exit $RANKS

# SIGINT to mpirun (Ctrl-C): mpirun stops the job (SIGTERM to every rank, exit status 1);
# every rank must be gone.
echo "== mpirun -np 2 llama4-server --expert-parallel, interrupted"
start_server "$WORK/ep2.log" $MPIRUN -np 2 "$SERVER" --model "$MODEL" --port 0 --expert-parallel
ranks_of_server
stop_server INT "$SPID"
await_exit $RANKS
echo "llama4-server --expert-parallel: answers equal one process's; all ranks exit on SIGTERM to rank 0 \
and on SIGINT to mpirun (its status $STATUS)"
