#!/bin/sh
# Expert parallelism over MPI: builds the `mpi_parity` example (crate expert-parallel, feature
# `mpi`: needs an MPI installation and libclang) and runs it with 2 and 3 ranks on the f32
# fixtures (top-1 with 16 experts: 8/8 and 5/5/6; top-2 with 8 experts: 4/4 and 2/3/3). Each run
# checks the logits against one process (1e-6 relative) and the greedy ids, and prints every
# rank's resident expert bytes and rank 0's communication time per decode step. Then the same
# on a checkpoint written here with MB-sized experts (`make_checkpoint --preset ep-resident`,
# 53 MB, removed at exit), where each rank must hold no more than its share of the expert bytes
# and 64 KiB at each edge of it. Run from the repository root; any failed check makes the
# script fail.
set -eu
cargo build --release -p expert-parallel --features mpi --example mpi_parity
cargo build --release --example make_checkpoint
BIN=target/release/examples/mpi_parity
# Running as root (CI containers) needs the flag; several ranks per core need --oversubscribe.
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
# One thread per rank: the ranks share the machine's cores.
export RAYON_NUM_THREADS=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama4-mpi.XXXXXX")
cleanup() {
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
