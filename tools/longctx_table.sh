#!/bin/sh
# The length-generalisation table of the README: examples/needle.rs over every model and context,
# one JSON line per run appended to $OUT (default longctx_table.jsonl). Run from the repository
# root; pass the rows to run as arguments (default: all), e.g. `tools/longctx_table.sh 1x 4x`.
# The 256x rows take about an hour each on one core of the development machine.
set -eu
OUT=${OUT:-longctx_table.jsonl}
cargo build --release --example needle
NEEDLE=target/release/examples/needle

run() { # label model flags context samples
    echo "== $1: $2 $3 --context $4 --samples $5" >&2
    $NEEDLE --model "models/$2" $3 --context "$4" --samples "$5" | tail -n 1 >> "$OUT"
}

row() { # label context samples samples-for-the-all-RoPE-control
    run "$1" longctx-demo "" "$2" "$3"
    run "$1" longctx-demo --no-temperature "$2" "$3"
    run "$1" longctx-demo-notemp "" "$2" "$3"
    if [ "$4" -gt 0 ]; then run "$1" longctx-demo-allrope "" "$2" "$4"; fi
}

ROWS=${*:-1x 4x 16x 64x 256x}
for r in $ROWS; do
    case $r in
        1x) row 1x 1024 256 256 ;;
        4x) row 4x 4096 256 256 ;;
        16x) row 16x 16384 128 128 ;;
        64x) row 64x 65536 64 16 ;;
        # The all-RoPE control attends globally in all four layers: 256K would take hours per context.
        256x) row 256x 262144 16 0 ;;
        *) echo "unknown row $r (1x 4x 16x 64x 256x)" >&2; exit 1 ;;
    esac
done
