# Converts the repository's tiny multimodal checkpoint (fixtures/models/multimodal, random
# weights from tools/make_multimodal_fixture.py) into a Llama 4 multimodal projector GGUF with
# llama.cpp's own converter (`convert_hf_to_gguf.py --mmproj`, see hf_to_gguf.convert_mmproj),
# for the loader's parity test: the GGUF-loaded tower must equal the safetensors-loaded one.
#
#   python make_mmproj_fixture.py LLAMA_CPP_DIR [OUT.gguf] [f32|f16]
#
# LLAMA_CPP_DIR: a llama.cpp source tree (the copy in the llama-cpp-python 0.3.36 sdist), run
# with the reference venv (torch, numpy). Deterministic: no randomness beyond the committed
# checkpoint's weights; --outtype f32 keeps every value, f16 (the type projector files are
# published in) rounds the matrices and keeps 1-D tensors in f32, as the converter does.
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..', '..')
sys.path.insert(0, HERE)
from hf_to_gguf import convert_mmproj  # noqa: E402

llama_cpp = sys.argv[1]
outtype = sys.argv[3] if len(sys.argv) > 3 else 'f32'
default = 'mmproj-multimodal-%s.gguf' % outtype.upper()
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, 'fixtures', 'gguf', default)
src = os.path.join(ROOT, 'fixtures', 'models', 'multimodal')
with tempfile.TemporaryDirectory() as work:
    # The converter reads config.json, preprocessor_config.json and the safetensors.
    for name in ['config.json', 'preprocessor_config.json', 'model.safetensors']:
        shutil.copy(os.path.join(src, name), work)
    convert_mmproj(llama_cpp, work, out, outtype)
print('wrote', out, os.path.getsize(out), 'bytes')
