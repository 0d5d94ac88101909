#!/bin/bash
# Same-machine comparison on bench-mid: llama.cpp's llama-bench and our bench_generate, 2 threads,
# interleaved over two rounds (this machine's speed drifts; interleaving keeps the two comparable).
# llama-bench: pp512 from an empty context; tg128 after a 512-token context (-d 512), as
# bench_generate decodes after its 512-token prompt.
#
# Setup (llama.cpp is vendored in the llama-cpp-python sdist on PyPI):
#   curl -LO <llama_cpp_python-0.3.36.tar.gz from pypi.org>; tar xzf llama_cpp_python-0.3.36.tar.gz
#   cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -S . -B build-noamx -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
#     -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
#     -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DLLAMA_CURL=OFF
#   cmake --build build-noamx -j2 --target llama-bench llama-quantize
#   (a -march=native build SIGILLs in Q8_0 on these VMs: the CPU reports AMX, the VM does not
#   enable it)
#   python to_gguf.py $PWD /tmp/bench-mid $WORK/hf $WORK/bench-mid-bf16.gguf bf16
#   build-noamx/bin/llama-quantize $WORK/bench-mid-bf16.gguf $WORK/bench-mid-Q8_0.gguf Q8_0  (and Q4_0, F32)
#
# Usage: LLAMA_CPP=.../llama.cpp WORK=dir-with-ggufs OURS=target/release/examples/bench_generate compare.sh
set -u
B=$LLAMA_CPP/build-noamx/bin
cd "$WORK"
for round in 1 2; do
  for f in bf16 F32 Q8_0 Q4_0; do
    echo "== llama.cpp $f (round $round) $(uptime | sed 's/.*load/load/')"
    $B/llama-bench -m bench-mid-$f.gguf -t 2 -r 3 -p 512 -n 0 2>&1 | grep -E "pp512"
    $B/llama-bench -m bench-mid-$f.gguf -t 2 -r 3 -p 0 -n 128 -d 512 2>&1 | grep -E "tg128"
  done
  for q in "--model /tmp/bench-mid" "--model /tmp/bench-mid-f32" "--model /tmp/bench-mid --quantize q8 --quantize-all" "--model /tmp/bench-mid --quantize q4 --quantize-all" ; do
    echo "== ours $q (round $round) $(uptime | sed 's/.*load/load/')"
    $OURS $q --contexts "" 2>&1 | grep -E "median|peak"
  done
done
