# Reference data for the ggml kernels, from llama.cpp's own CPU library (ggml-base + ggml-cpu,
# called through ctypes; nothing of llama.cpp is copied). For every supported type: a random
# matrix quantised by `ggml_quantize_chunk`, its dequantisation (`to_float`), random activations,
# ggml-cpu's conversion of them to the type's `vec_dot_type` (`from_float`), and ggml-cpu's
# `vec_dot` of every row with every token.
#
#   python ggml_kernel_fixtures.py LIBDIR OUT.safetensors
#
# LIBDIR holds libggml-base.so and libggml-cpu.so of a llama.cpp build for this CPU (see
# compare.sh: the copy vendored in the llama-cpp-python 0.3.36 sdist, AVX2 without AVX-512 or
# AVX-VNNI on the Zen 3 machine the committed fixture comes from). Seeded: the same build gives
# the same file.
import ctypes as C
import os
import sys

import numpy as np
from safetensors.numpy import save_file

libdir, out = sys.argv[1:3]
base = C.CDLL(os.path.join(libdir, 'libggml-base.so'))
cpu = C.CDLL(os.path.join(libdir, 'libggml-cpu.so'))

TO_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)
FROM_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)
VEC_DOT = C.CFUNCTYPE(None, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.c_void_p,
                      C.c_size_t, C.c_int)


class Traits(C.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [('type_name', C.c_char_p), ('blck_size', C.c_int64),
                ('blck_size_interleave', C.c_int64), ('type_size', C.c_size_t),
                ('is_quantized', C.c_bool), ('to_float', C.c_void_p),
                ('from_float_ref', C.c_void_p)]


class CpuTraits(C.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [('from_float', C.c_void_p), ('vec_dot', C.c_void_p), ('vec_dot_type', C.c_int),
                ('nrows', C.c_int64)]


base.ggml_get_type_traits.restype = C.POINTER(Traits)
base.ggml_get_type_traits.argtypes = [C.c_int]
cpu.ggml_get_type_traits_cpu.restype = C.POINTER(CpuTraits)
cpu.ggml_get_type_traits_cpu.argtypes = [C.c_int]
base.ggml_quantize_chunk.restype = C.c_size_t
base.ggml_quantize_chunk.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64,
                                     C.c_int64, C.c_void_p]
cpu.ggml_cpu_init()

TYPES = {'F32': 0, 'F16': 1, 'Q4_0': 2, 'Q4_1': 3, 'Q5_0': 6, 'Q5_1': 7, 'Q8_0': 8, 'Q2_K': 10,
         'Q3_K': 11, 'Q4_K': 12, 'Q5_K': 13, 'Q6_K': 14, 'BF16': 30}
K, N, T = 512, 4, 3  # two k-quant super-blocks, sixteen 32-value blocks per row

rng = np.random.default_rng(20260522)
tensors = {}
for name, ty in TYPES.items():
    tr = base.ggml_get_type_traits(ty).contents
    ct = cpu.ggml_get_type_traits_cpu(ty).contents
    dt = ct.vec_dot_type
    dtr = base.ggml_get_type_traits(dt).contents
    # Rows of different scales; one block of zeros and one with a lone outlier.
    w = rng.standard_normal((N, K)).astype(np.float32) * np.float32([[0.02], [0.1], [1.0], [7.5]])
    w[1, 64:96] = 0.0
    w[2, 300] = 40.0
    row_bytes = K // tr.blck_size * tr.type_size
    wq = np.zeros(N * row_bytes, np.uint8)
    n = base.ggml_quantize_chunk(ty, w.ctypes.data, wq.ctypes.data, 0, N, K, None)
    assert n == wq.size, (name, n, wq.size)
    deq = np.zeros((N, K), np.float32)
    if tr.to_float:
        TO_FLOAT(tr.to_float)(wq.ctypes.data, deq.ctypes.data, N * K)
    else:  # F32 has no conversion: its bytes are the values
        deq[:] = wq.view(np.float32).reshape(N, K)
    # Activations: mixed magnitudes, a zero block, exact halves to exercise rounding ties.
    x = (rng.standard_normal((T, K)) * np.float32([[0.5], [3.0], [1e-3]])).astype(np.float32)
    x[0, 32:64] = 0.0
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5
    act_bytes = K // dtr.blck_size * dtr.type_size
    xq = np.zeros((T, act_bytes), np.uint8)
    for r in range(T):
        FROM_FLOAT(cpu.ggml_get_type_traits_cpu(dt).contents.from_float)(
            x[r].ctypes.data, xq[r].ctypes.data, K)
    y = np.zeros((T, N), np.float32)
    s = C.c_float()
    for r in range(T):
        for o in range(N):
            VEC_DOT(ct.vec_dot)(K, C.addressof(s), 0, wq.ctypes.data + o * row_bytes, 0,
                                xq[r].ctypes.data, 0, 1)
            y[r, o] = s.value
    tensors[f'{name}.weight'] = wq
    tensors[f'{name}.dequant'] = deq
    tensors[f'{name}.x'] = x
    tensors[f'{name}.x_dot'] = xq.reshape(-1)
    tensors[f'{name}.y'] = y
    print(name, 'dot type', dt, 'row bytes', row_bytes, 'act bytes', act_bytes)

save_file(tensors, out, metadata={'k': str(K), 'n': str(N), 't': str(T)})
print('wrote', out, os.path.getsize(out), 'bytes')
