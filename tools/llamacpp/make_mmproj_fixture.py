# Converts the repository's tiny multimodal checkpoint (fixtures/models/multimodal, random
# weights from tools/) into a Llama 4 multimodal projector GGUF with llama.cpp's own converter
# (`convert_hf_to_gguf.py --mmproj`), for the loader's parity test: the GGUF-loaded tower must
# equal the safetensors-loaded one.
#
#   python make_mmproj_fixture.py LLAMA_CPP_DIR [OUT.gguf]
#
# LLAMA_CPP_DIR: a llama.cpp source tree (the copy in the llama-cpp-python 0.3.36 sdist), run
# with the reference venv (torch, numpy). Deterministic: no randomness beyond the committed
# checkpoint's weights; --outtype f32 keeps every value.
#
# One adjustment: the converter builds its tensor-name map for as many blocks as the tower has
# layers and uses that block range for the adapter's `vision_adapter.mlp.fc{1,2}` as well
# (→ `mm.model.mlp.{1,2}`). Real towers have 34 layers; the fixture's 2 would leave `fc2`
# unmapped, so the map is built for at least 3 blocks. Names and values are otherwise the
# converter's own.
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..', '..')
llama_cpp = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, 'fixtures', 'gguf', 'mmproj-multimodal-F32.gguf')
src = os.path.join(ROOT, 'fixtures', 'models', 'multimodal')

sys.path.insert(0, os.path.join(llama_cpp, 'gguf-py'))
sys.path.insert(0, llama_cpp)
import gguf  # noqa: E402
import conversion.base as base  # noqa: E402

name_map = gguf.get_tensor_name_map
base.gguf.get_tensor_name_map = lambda arch, n_blocks: name_map(arch, max(n_blocks, 3))
import convert_hf_to_gguf  # noqa: E402

with tempfile.TemporaryDirectory() as work:
    # The converter reads config.json, preprocessor_config.json and the safetensors.
    for name in ['config.json', 'preprocessor_config.json', 'model.safetensors']:
        shutil.copy(os.path.join(src, name), work)
    sys.argv = ['convert_hf_to_gguf.py', work, '--mmproj', '--outtype', 'f32', '--outfile', out]
    convert_hf_to_gguf.main()
print('wrote', out, os.path.getsize(out), 'bytes')
