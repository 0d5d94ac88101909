# An end-to-end fixture for `generate --model FILE.gguf --mmproj FILE --image PIC`: a random
# multimodal Llama 4 whose text side llama.cpp can represent (its fixed chunk size 8192,
# temperature floor 8192 and scale 0.1, NoPE every 4th layer), with Llama 4's vocabulary cut to
# its 512 first BPE ranks and 96 special tokens (through <|patch|>), converted by llama.cpp's
# own converter to a text GGUF and a projector GGUF (both f32), and transformers' greedy
# generation on a prompt with two images.
#
#   python make_mmproj_e2e_fixture.py LLAMA_CPP_DIR TOKENIZER_MODEL [--work DIR]
#
# LLAMA_CPP_DIR: a llama.cpp source tree (the copy in the llama-cpp-python 0.3.36 sdist);
# TOKENIZER_MODEL: Meta's Llama 4 tiktoken file (llama_models/llama4/tokenizer.model in the
# llama-models package). Run with the reference venv on an AVX2 or AVX-512 CPU (the image
# resize of torchvision depends on it, as for tools/make_multimodal_fixture.py). Seeded.
#
# Writes fixtures/gguf/mm-e2e/: text-F32.gguf, mmproj-F32.gguf and reference.safetensors with
#   prompt_ids     [P]     the prompt tokenised by the Hugging Face tokenizer (BOS, one
#                          <|image|> per image)
#   input_ids      [T]     the prompt as Llama4Processor expands it
#   generated_ids  [N]     transformers' greedy continuation (with its cache)
#   step_logits    [N, V]  the logits that chose them
# and prompt.json (the prompt text, the image files under fixtures/models/multimodal/).
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..', '..')
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..'))
from hf_to_gguf import convert, convert_mmproj  # noqa: E402
from make_fixtures import randomise, text_config  # noqa: E402
from transformers import (Llama4Config, Llama4ForConditionalGeneration,  # noqa: E402
                          Llama4VisionConfig, PreTrainedTokenizerFast)
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor  # noqa: E402
from transformers.models.llama4.processing_llama4 import Llama4Processor  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('llama_cpp')
ap.add_argument('tokenizer_model')
ap.add_argument('--work', default='/tmp/mmproj-e2e')
args = ap.parse_args()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
cap = torch.backends.cpu.get_cpu_capability()
assert cap in ('AVX2', 'AVX512'), f'CPU capability {cap}: the reference resize would differ'

OUT = os.path.join(ROOT, 'fixtures', 'gguf', 'mm-e2e')
IMAGES = ['wide.png', 'small.png']  # under fixtures/models/multimodal: 2×3 tiles + global, 1 tile
PROMPT = 'Describe<|image|> and<|image|> in one line.'
TILE, NEW_TOKENS, SEED = 84, 6, 7001
shutil.rmtree(args.work, ignore_errors=True)
os.makedirs(args.work)
shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)

hf_dir = os.path.join(args.work, 'hf')
subprocess.run([sys.executable, os.path.join(HERE, 'make_llama4_tokenizer.py'), args.llama_cpp,
                args.tokenizer_model, hf_dir, '--ranks', '512', '--specials', '96'], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
vocab = len(tok)
ids = {t: tok.convert_tokens_to_ids(t) for t in ['<|begin_of_text|>', '<|eot|>', '<|image_start|>',
                                                  '<|image_end|>', '<|patch|>']}

# The text side of tools/llamacpp/make_gguf_fixtures.py's `tiny` model, hidden 32.
text = text_config(num_hidden_layers=4, num_experts_per_tok=1, use_qk_norm=True, attention_chunk_size=8192,
                   floor_scale=8192, attn_scale=0.1, attn_temperature_tuning=True, vocab_size=vocab,
                   bos_token_id=ids['<|begin_of_text|>'], eos_token_id=ids['<|eot|>'], pad_token_id=None,
                   max_position_embeddings=16384,
                   rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192),
                   hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                   interleave_moe_layer_step=2)
# The tower of tools/make_multimodal_fixture.py.
vision = Llama4VisionConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=TILE,
    patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=48, projector_output_dim=48,
    vision_output_dim=48, rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
)
cfg = Llama4Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                   boi_token_index=ids['<|image_start|>'], eoi_token_index=ids['<|image_end|>'],
                   image_token_index=ids['<|patch|>'], tie_word_embeddings=False)
cfg._attn_implementation = 'eager'
model = Llama4ForConditionalGeneration(cfg).eval()
randomise(model, seed=SEED)
model.save_pretrained(hf_dir, safe_serialization=True)
conf = json.load(open(os.path.join(hf_dir, 'config.json')))
conf['architectures'] = ['Llama4ForConditionalGeneration']
json.dump(conf, open(os.path.join(hf_dir, 'config.json'), 'w'), indent=1)
# Llama 4's processor defaults (at most 16 tiles), on 84-pixel tiles: what the projector GGUF
# loader assumes, since the file records only the tile size, mean and std.
proc = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5] * 3,
            image_std=[0.5] * 3, rescale_factor=1 / 255, resample=2, resize_to_max_canvas=False,
            size={'height': TILE, 'width': TILE}, max_patches=16)
json.dump({'image_processor_type': 'Llama4ImageProcessor', **proc},
          open(os.path.join(hf_dir, 'preprocessor_config.json'), 'w'), indent=1)

text_gguf, mmproj_gguf = os.path.join(OUT, 'text-F32.gguf'), os.path.join(OUT, 'mmproj-F32.gguf')
convert(args.llama_cpp, hf_dir, text_gguf, 'f32')
convert_mmproj(args.llama_cpp, hf_dir, mmproj_gguf, 'f32')

processor = Llama4Processor(image_processor=Llama4ImageProcessor(**proc), tokenizer=tok, patch_size=14,
                            pixel_shuffle_ratio=0.5)
images = []
for name in IMAGES:
    with Image.open(os.path.join(ROOT, 'fixtures', 'models', 'multimodal', name)) as im:
        im.load()
        images.append(im.convert('RGB'))
inputs = processor(images=images, text=PROMPT, return_tensors='pt')
inputs.pop('attention_mask', None)
inputs['pixel_values'] = inputs['pixel_values'].float()  # bf16 tiles, exact in f32
with torch.no_grad():
    out = model(**inputs, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    gen = [int(logits[-1].argmax())]
    for _ in range(NEW_TOKENS - 1):
        out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0, -1])
        gen.append(int(logits[-1].argmax()))
    text_only = model(input_ids=inputs['input_ids'], use_cache=False).logits[0, -1]
effect = ((text_only - logits[0]).abs().max() / logits[0].abs().max()).item()
assert effect > 1e-2, f'the images barely change the logits ({effect}): pick another seed'
save_file({
    'prompt_ids': np.array(tok(PROMPT)['input_ids'], dtype=np.int64),
    'input_ids': inputs['input_ids'][0].numpy().astype(np.int64),
    'generated_ids': np.array(gen, dtype=np.int64),
    'step_logits': torch.stack(logits).float().numpy(),
}, os.path.join(OUT, 'reference.safetensors'))
json.dump({'prompt': PROMPT, 'images': IMAGES}, open(os.path.join(OUT, 'prompt.json'), 'w'), indent=1)
total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
print('greedy', gen, 'prompt', inputs['input_ids'].shape[1], 'tokens; image effect', f'{effect:.2e}')
print('wrote', OUT, total, 'bytes')
