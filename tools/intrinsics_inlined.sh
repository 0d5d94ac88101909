#!/usr/bin/env bash
# Fails when a release binary calls an x86 intrinsic as a function. An intrinsic is inlined only
# into code compiled with its target feature; a closure inside a kernel does not take the kernel's
# `#[target_feature]`, so an intrinsic in a closure the optimiser does not inline becomes a call
# (once a quarter of a Q4_K_M prefill). Run after a release build of the binaries named below.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for bin in target/release/examples/generate target/release/llama4-server; do
    if [ ! -x "$bin" ]; then
        echo "intrinsics_inlined: $bin is not built" >&2
        status=1
        continue
    fi
    # _xgetbv is called once, to detect the CPU's features.
    calls=$(nm -C "$bin" | grep -oE 'core::core_arch::x86::[a-z0-9_]+::_[a-z0-9_]+' | grep -v '_xgetbv$' | sort -u || true)
    if [ -n "$calls" ]; then
        echo "intrinsics_inlined: $bin has intrinsics compiled as functions:" >&2
        echo "$calls" >&2
        status=1
    fi
done
exit $status
