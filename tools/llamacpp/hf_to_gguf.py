# Runs llama.cpp's own `convert_hf_to_gguf.py` (from a llama.cpp source tree given by the caller)
# on a Hugging Face directory. A vocabulary cut from Llama 4's (as the fixtures use) cannot match
# the converter's hash of the full one, so it is declared `llama4` when the hash is not known;
# the full vocabulary must still be recognised by its hash.
import os
import sys


def convert(llama_cpp, model_dir, outfile, outtype='f32', vocab_only=False, allow_cut_vocab=True):
    sys.path.insert(0, os.path.join(llama_cpp, 'gguf-py'))
    sys.path.insert(0, llama_cpp)
    import conversion.base as base
    detect = getattr(base.TextModel, '_detect_pre', None) or base.TextModel.get_vocab_base_pre
    base.TextModel._detect_pre = detect

    def pre(self, tokenizer):
        try:
            return detect(self, tokenizer)
        except NotImplementedError:
            assert allow_cut_vocab, 'the Llama 4 vocabulary was not recognised as llama4'
            return 'llama4'

    base.TextModel.get_vocab_base_pre = pre
    import convert_hf_to_gguf
    argv = ['convert_hf_to_gguf.py', model_dir, '--outtype', outtype, '--outfile', outfile]
    if vocab_only:
        argv.append('--vocab-only')
    saved, sys.argv = sys.argv, argv
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = saved


def convert_mmproj(llama_cpp, model_dir, outfile, outtype='f32'):
    """`convert_hf_to_gguf.py --mmproj`: the vision tower and projector of a multimodal
    checkpoint. The converter builds its tensor-name map for as many blocks as the tower has
    layers and uses that block range for the adapter's `vision_adapter.mlp.fc{1,2}` as well
    (-> `mm.model.mlp.{1,2}`); real towers have 34 layers, a 2-layer test tower would leave `fc2`
    unmapped, so the map is built for at least 3 blocks. Names and values are otherwise the
    converter's own."""
    sys.path.insert(0, os.path.join(llama_cpp, 'gguf-py'))
    sys.path.insert(0, llama_cpp)
    import gguf
    import conversion.base as base
    name_map = getattr(gguf, '_unwidened_name_map', gguf.get_tensor_name_map)
    gguf._unwidened_name_map = name_map
    base.gguf.get_tensor_name_map = lambda arch, n_blocks: name_map(arch, max(n_blocks, 3))
    import convert_hf_to_gguf
    argv = ['convert_hf_to_gguf.py', model_dir, '--mmproj', '--outtype', outtype, '--outfile', outfile]
    saved, sys.argv = sys.argv, argv
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = saved
