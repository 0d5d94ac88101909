# Converts a random-weight checkpoint from `make_checkpoint` (bench-mid) to GGUF with llama.cpp's
# own converter, for a same-machine comparison (see compare.sh).
#
#   python to_gguf.py LLAMA_CPP_DIR SRC_DIR WORK_DIR OUT.gguf bf16|f32
#
# bench-mid has no tokenizer: a byte-level BPE vocabulary of the right size stands in (llama-bench
# feeds token ids, never text) and the converter's pre-tokenizer check is bypassed.
import json, os, sys
LL = sys.argv.pop(1)
sys.path.insert(0, LL + '/gguf-py'); sys.path.insert(0, LL)
src, dst, out, outtype = sys.argv[1:5]
os.makedirs(dst, exist_ok=True)
cfg = json.load(open(f'{src}/config.json'))
cfg['architectures'] = ['Llama4ForCausalLM']
json.dump(cfg, open(f'{dst}/config.json', 'w'), indent=1)
if not os.path.exists(f'{dst}/model.safetensors'):
    os.symlink(f'{src}/model.safetensors', f'{dst}/model.safetensors')
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
chars = list(bytes_to_unicode().values())
vocab = {c: i for i, c in enumerate(chars)}
merges = []
for a in chars:
    for b in chars:
        if len(vocab) >= cfg['vocab_size']:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(dst)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'default'
import convert_hf_to_gguf
sys.argv = ['convert_hf_to_gguf.py', dst, '--outtype', outtype, '--outfile', out]
convert_hf_to_gguf.main()
