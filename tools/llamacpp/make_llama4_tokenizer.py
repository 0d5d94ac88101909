# The Llama 4 tokenizer as Hugging Face publishes it, built from Meta's tiktoken file (shipped in
# the `llama-models` package on PyPI: llama_models/llama4/tokenizer.model), and its GGUF form
# made by llama.cpp's own converter (`convert_hf_to_gguf.py --vocab-only`, from a llama.cpp
# source tree given on the command line). Also writes the ids the Hugging Face tokenizer gives
# on a varied corpus, for the GGUF tokenizer test.
#
#   python make_llama4_tokenizer.py LLAMA_CPP_DIR TOKENIZER_MODEL OUT_DIR [--ranks R] [--specials S]
#
# --ranks R keeps the R lowest-ranked BPE tokens (the first merges); 0 (default) keeps all 200,000.
# --specials S keeps the first S special tokens (default: all 1,134 of the Hugging Face
# conversion); they take the ids after the kept ranks, as in the full vocabulary.
# The Hugging Face structure (tiktoken converter, o200k split regex, byte level, merges ignored
# for whole-word tokens, BOS added by the post-processor) is transformers' own
# `TikTokenConverter`; the special tokens are those of transformers' Llama 4 conversion.
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument('llama_cpp')
ap.add_argument('tokenizer_model')
ap.add_argument('out')
ap.add_argument('--ranks', type=int, default=0)
ap.add_argument('--specials', type=int, default=-1)
ap.add_argument('--corpus', action='store_true', help='also write corpus.json with the HF ids')
args = ap.parse_args()

from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

O200K = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
         r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
         r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def reserved(name, count, start):
    return [f'<|{name}_reserved_special_token_{i}|>' for i in range(start, start + count)]


SPECIALS = (['<|begin_of_text|>', '<|end_of_text|>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>']
            + ['<|header_start|>', '<|header_end|>', '<|eom|>', '<|eot|>', '<|step|>']
            + reserved('text_post_train', 6, 0)
            + ['<|python_start|>', '<|python_end|>', '<|finetune_right_pad|>']
            + reserved('text_post_train', 61, 6)
            + ['<|image_start|>', '<|image_end|>', '<|vision_reserved_special_token_0|>',
               '<|vision_reserved_special_token_1|>', '<|tile_x_separator|>', '<|tile_y_separator|>']
            + reserved('vision', 4, 2) + ['<|image|>', '<|vision_reserved_special_token_6|>', '<|patch|>']
            + reserved('vision', 1041, 7))
assert len(SPECIALS) == 1134
specials = SPECIALS if args.specials < 0 else SPECIALS[:args.specials]

ranks = load_tiktoken_bpe(args.tokenizer_model)
if args.ranks:
    ranks = {t: r for t, r in ranks.items() if r < args.ranks}


class Converter(TikTokenConverter):
    @staticmethod
    def load_tiktoken_bpe(_):
        return ranks


tok = Converter(args.tokenizer_model, pattern=O200K).converted()
tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
bos = tok.token_to_id('<|begin_of_text|>')
tok.post_processor = processors.Sequence([
    processors.ByteLevel(trim_offsets=False),
    processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                  pair='<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1',
                                  special_tokens=[('<|begin_of_text|>', bos)]),
])
# A short chat template of this project's own (the GGUF test only checks it is carried over).
template = ("{{- bos_token }}{%- for m in messages %}{{- '<|header_start|>' + m['role'] + '<|header_end|>\n\n' "
            "+ m['content'] | trim + '<|eot|>' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\n\n' }}{%- endif %}")
hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<|begin_of_text|>', eos_token='<|eot|>',
                             chat_template=template)
os.makedirs(args.out, exist_ok=True)
hf.save_pretrained(args.out)
vocab = len(tok.get_vocab())
print('vocabulary', vocab, 'merges', len(json.load(open(f'{args.out}/tokenizer.json'))['model']['merges']))

# llama.cpp's converter wants a model config; the vocabulary is all it reads with --vocab-only.
cfg = {'architectures': ['Llama4ForCausalLM'], 'model_type': 'llama4_text', 'vocab_size': vocab,
       'hidden_size': 256, 'intermediate_size': 256, 'intermediate_size_mlp': 256,
       'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 1, 'head_dim': 64,
       'rms_norm_eps': 1e-5, 'rope_theta': 500000.0, 'num_local_experts': 2, 'num_experts_per_tok': 1,
       'interleave_moe_layer_step': 2, 'max_position_embeddings': 4096, 'bos_token_id': bos,
       'eos_token_id': tok.token_to_id('<|eot|>')}
json.dump(cfg, open(f'{args.out}/config.json', 'w'), indent=1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_to_gguf import convert
out = os.path.join(args.out, 'vocab.gguf')
convert(args.llama_cpp, args.out, out, vocab_only=True, allow_cut_vocab=bool(args.ranks))
print('wrote', out, os.path.getsize(out), 'bytes')

if args.corpus:
    corpus = [
        'Hello world! The quick brown fox jumps over the lazy dog.',
        "I'm sure they'll say it's fine; we've DONE it. YOU'RE right, isn't it?",
        'Grüße aus Zürich — naïve café, façade, coöperate.',
        'Москва — столица России. Привет, как дела?',
        '東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.',
        'مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।',
        'Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 and text.',
        'def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n\n\nprint(f(10))\n',
        '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }\n',
        'Digits: 1 12 123 1234 12345 3.14159 -0.5e-10 1,000,000 2024-05-22',
        'Whitespace:   three spaces,\ttab,\t\ttwo tabs,\n\nnewlines\r\nCRLF     \n   trailing   ',
        '        indented\n            more\n',
        '<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi!<|eot|><|header_start|>assistant<|header_end|>\n\n',
        'Special-looking but not: <|not_a_token|> <|eot| > <| eot|>',
        'URLs https://example.com/a/b?c=d&e=f#g and emails a.b@c.de',
        "Mixed CASE camelCase snake_case SCREAMING_CASE kebab-case O'Neil McDonald's",
        '',
        ' ',
        '\n',
        'a' * 300,
        '🙂' * 40,
        'ÀÉÎÕÜ àéîõü ĀĒĪŌŪ ǍĚǏǑǓ',
        '¡Hola! ¿Qué tal? Ça va? Ελληνικά: Γειά σου Κόσμε.',
        'Math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6; ∀x∈ℝ, x²≥0.',
    ]
    items = []
    for text in corpus:
        items.append({'text': text,
                      'ids': tok.encode(text, add_special_tokens=True).ids,
                      'ids_plain': tok.encode(text, add_special_tokens=False).ids})
    json.dump({'bos': bos, 'eot': tok.token_to_id('<|eot|>'), 'vocab': vocab, 'items': items},
              open(os.path.join(args.out, 'corpus.json'), 'w'), ensure_ascii=False, indent=0)
    print('wrote corpus.json with', len(items), 'texts')
