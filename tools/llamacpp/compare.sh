#!/bin/bash
# Same-machine comparison with llama.cpp (the copy vendored in the llama-cpp-python 0.3.36 sdist).
#
#   compare.sh build LLAMA_CPP BUILD_DIR   configure and build llama.cpp for this CPU
#   compare.sh flags                       print the GGML_* flags `build` would use
#   compare.sh bench                       bench-mid: llama-bench vs our bench_generate (below)
#
# The build enables exactly the instruction sets /proc/cpuinfo reports: never AVX-512 or VEX
# AVX-VNNI on a CPU without them (with GGML_AVX_VNNI on Zen 4, which lacks it, llama.cpp's Q8_0
# path dies with an illegal instruction; -march=native SIGILLs on VMs that report AMX without
# enabling it). GGML_NATIVE stays off so the flags are the ones printed.
#
# Setup:
#   pip download --no-binary llama-cpp-python --no-deps llama-cpp-python==0.3.36; tar xzf llama_cpp_python-0.3.36.tar.gz
#   compare.sh build llama_cpp_python-0.3.36/vendor/llama.cpp /work/llamacpp/build    (cmake and ninja: pip install cmake ninja)
#   python to_gguf.py $PWD /tmp/bench-mid $WORK/hf $WORK/bench-mid-bf16.gguf bf16
#   BUILD/bin/llama-quantize $WORK/bench-mid-bf16.gguf $WORK/bench-mid-Q8_0.gguf Q8_0  (and Q4_0, Q4_K_M, F32)
# llama-cpp-python for the reference venv, from the same sdist with the same flags:
#   CMAKE_ARGS="$(compare.sh flags)" .venv-ref/bin/python -m pip install --no-deps llama_cpp_python-0.3.36.tar.gz
#
# bench usage: BUILD=.../build WORK=dir-with-ggufs OURS=target/release/examples/bench_generate compare.sh bench
# llama-bench: pp512 from an empty context; tg128 after a 512-token context (-d 512), as
# bench_generate decodes after its 512-token prompt; interleaved over two rounds (this machine's
# speed drifts; interleaving keeps the two comparable).
set -u

has() { grep -qw "$1" /proc/cpuinfo; }
on_off() { if has "$1"; then echo ON; else echo OFF; fi; }

flags() {
  local avx512=OFF
  if has avx512f && has avx512bw && has avx512dq && has avx512vl; then avx512=ON; fi
  echo -n "-DGGML_NATIVE=OFF -DGGML_AVX=$(on_off avx) -DGGML_AVX2=$(on_off avx2) -DGGML_FMA=$(on_off fma)"
  echo -n " -DGGML_F16C=$(on_off f16c) -DGGML_BMI2=$(on_off bmi2) -DGGML_AVX_VNNI=$(on_off avx_vnni)"
  echo -n " -DGGML_AVX512=$avx512"
  if [ $avx512 = ON ]; then
    echo -n " -DGGML_AVX512_VBMI=$(on_off avx512vbmi) -DGGML_AVX512_VNNI=$(on_off avx512_vnni)"
    echo -n " -DGGML_AVX512_BF16=$(on_off avx512_bf16)"
  fi
  echo " -DLLAMA_CURL=OFF"
}

case "${1:-}" in
  flags) flags ;;
  build)
    src=$2; out=$3
    # shellcheck disable=SC2046
    cmake -S "$src" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=ON $(flags)
    nice -n 10 cmake --build "$out" -j2 --target llama-bench llama-quantize test-backend-ops
    ;;
  bench)
    B=$BUILD/bin
    cd "$WORK"
    for round in 1 2; do
      for f in bf16 F32 Q8_0 Q4_0; do
        echo "== llama.cpp $f (round $round) $(uptime | sed 's/.*load/load/')"
        $B/llama-bench -m bench-mid-$f.gguf -t 2 -r 3 -p 512 -n 0 2>&1 | grep -E "pp512"
        $B/llama-bench -m bench-mid-$f.gguf -t 2 -r 3 -p 0 -n 128 -d 512 2>&1 | grep -E "tg128"
      done
      for q in "--model /tmp/bench-mid" "--model /tmp/bench-mid-f32" "--model /tmp/bench-mid --quantize q8 --quantize-all" "--model /tmp/bench-mid --quantize q4 --quantize-all" ; do
        echo "== ours $q (round $round) $(uptime | sed 's/.*load/load/')"
        # shellcheck disable=SC2086
        $OURS $q --contexts "" 2>&1 | grep -E "median|peak"
      done
    done
    ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
