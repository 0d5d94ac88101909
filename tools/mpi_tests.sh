#!/bin/sh
# Expert parallelism over MPI: builds the `mpi_parity` example (crate expert-parallel, feature
# `mpi`: needs an MPI installation and libclang) and runs it with 2 and 3 ranks on the f32
# fixtures (top-1 with 16 experts: 8/8 and 5/5/6; top-2 with 8 experts: 4/4 and 2/3/3). Each run
# checks the logits against one process (1e-6 relative) and the greedy ids, and prints every
# rank's resident expert bytes and rank 0's communication time per decode step. Run from the
# repository root; any failed check makes the script fail.
set -eu
cargo build --release -p expert-parallel --features mpi --example mpi_parity
BIN=target/release/examples/mpi_parity
# Running as root (CI containers) needs the flag; several ranks per core need --oversubscribe.
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
# One thread per rank: the ranks share the machine's cores.
export RAYON_NUM_THREADS=1
for model in scout top2_tied; do
    for np in 2 3; do
        echo "== mpirun -np $np mpi_parity --model fixtures/models/$model"
        $MPIRUN -np "$np" "$BIN" --model "fixtures/models/$model"
    done
done
