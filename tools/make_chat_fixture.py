#!/usr/bin/env python3
"""Reference fixture for chat templates: what transformers 5.23.0's `apply_chat_template` renders
and tokenises for a set of conversations (system prompts, several turns, content as parts with an
image, tool definitions, tool calls and tool results, non-ASCII text, numbers of every JSON kind).

Writes fixtures/chat/:

  llama4/tokenizer.json         a small byte-level BPE tokenizer (trained here on a fixed corpus, so
                                any text tokenises) with the Llama 4 special tokens
  llama4/tokenizer_config.json  `bos_token`, `eos_token`, ... and `chat_template`: the Llama 4
                                template transformers ships (`transformers.models.llama4.
                                processing_llama4.chat_template`)
  pycompat/chat_template.jinja  a template written here that uses what Hugging Face templates use
                                beyond plain Jinja: Python string and dict methods, `tojson` with
                                indent / separators / sort_keys, `namespace`, loop controls,
                                `raise_exception`, `strftime_now`
  pycompat/tokenizer.json, tokenizer_config.json   copies of llama4's, without a template
  cases.json                    for every (checkpoint, conversation): the messages, tools, extra
                                template arguments, `add_generation_prompt`, and transformers'
                                rendered `text` and token `ids` (or the template's `error`)

The checkpoints are `models/demo` (the embedded demo model, which has no template: transformers is
given the Llama 4 one, which is what the Rust side falls back to), `fixtures/chat/llama4` and
`fixtures/chat/pycompat`. Everything is deterministic (no random numbers; BPE training on a fixed
corpus); the templates' only clock read (`strftime_now`) is kept out of the output.

Run from the repository root:  .venv-ref/bin/python tools/make_chat_fixture.py
"""

import json
import os
import shutil

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_TEMPLATE

OUT = "fixtures/chat"

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|finetune_right_pad|>",
]

CORPUS = [
    "You are a helpful assistant. Answer briefly and truthfully.",
    "What is the weather like in Paris today? It is sunny, 21 degrees.",
    "The function get_weather takes a location and a unit, celsius or fahrenheit.",
    '{"name": "get_weather", "parameters": {"location": "Paris", "unit": "celsius"}}',
    "Sort these digits: 3 1 4 1 5 9 2 6 5 3. Answer: 1 1 2 3 3 4 5 5 6 9.",
    "Look at this picture and tell me what you see. A red square on a white background.",
    "naïve café, 日本語のテキスト, “quotes” — and emoji 🙂 are text too.",
    "Given the following functions, please respond with a JSON for a function call.",
]

PYCOMPAT_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(turns=0, tools_seen=false) %}
{%- if strftime_now is defined %}{{- '[year:' ~ (strftime_now('%Y') | length) ~ ']' }}{% endif %}
{%- if tools %}
{{- '<|header_start|>tools<|header_end|>\\n' }}
{%- for t in tools %}
{{- t | tojson(indent=2) }}
{{- '\\n' ~ (t | tojson(separators=(',', ':'), sort_keys=true)) ~ '\\n' }}
{%- endfor %}
{%- set ns.tools_seen = true %}
{%- endif %}
{%- for m in messages %}
{%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('unknown role ' ~ m.role) }}
{%- endif %}
{%- if m.role == 'system' and not loop.first %}
{{- raise_exception('a system message must come first') }}
{%- endif %}
{%- if m.content is string and m.content.strip() == 'skip me' %}{% continue %}{% endif %}
{%- set ns.turns = ns.turns + 1 %}
{{- '<|header_start|>' ~ m.role.upper() ~ '<|header_end|>' }}
{%- if m.content is string %}
{%- set words = m.content.strip().split() %}
{{- words | length }}:{{ ' '.join(words) if words else '' }}
{%- if m.content.startswith('Hi') %}{{ ' (greeting)' }}{% endif %}
{%- if m.content.endswith('?') %}{{ ' (question)' }}{% endif %}
{{- ' ' ~ m.content.replace('a', 'A').title() }}
{%- else %}
{%- for part in m.content %}
{%- if part.type == 'text' %}{{ part.text.lower() }}{% elif part.type == 'image' %}{{ '<|image|>' }}{% endif %}
{%- if loop.index == 3 %}{% break %}{% endif %}
{%- endfor %}
{%- endif %}
{%- if m.tool_calls is defined %}
{%- for call in m.tool_calls %}
{%- for k, v in call.function.items() %}{{ '|' ~ k ~ '=' ~ (v | tojson) }}{% endfor %}
{%- endfor %}
{%- endif %}
{{- eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|header_start|>ASSISTANT<|header_end|>' ~ ns.turns }}{{ ns.tools_seen }}{{ none }}{% endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather at a place — with “units”",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 16},
                "threshold": {"type": "number", "default": 0.5, "examples": [1e-07, 2.5e20, -3.0, 100.0]},
                "verbose": {"type": "boolean", "default": False},
                "extra": {"type": ["string", "null"], "default": None},
            },
            "required": ["location"],
        },
    },
}

SUM_TOOL = {"type": "function", "function": {"name": "add", "parameters": {"b": 2, "a": 1}}}

CONVERSATIONS = {
    "system_user": {
        "messages": [
            {"role": "system", "content": "  You are terse.  "},
            {"role": "user", "content": "Hi! Sort 3 1 2?"},
        ],
    },
    "multi_turn": {
        "messages": [
            {"role": "system", "content": "You sort digits."},
            {"role": "user", "content": "sort 3 1 4 1 5 9 2 6 5 3 ="},
            {"role": "assistant", "content": " 1 1 2 3 3 4 5 5 6 9"},
            {"role": "user", "content": "sort 9 8 7 ="},
        ],
    },
    "no_generation_prompt": {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
        ],
        "add_generation_prompt": False,
    },
    "parts_and_image": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": " Describe pictures. "}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look at this "},
                    {"type": "image"},
                    {"type": "text", "text": " and this "},
                    {"type": "image"},
                    {"type": "text", "text": " What Are They?"},
                ],
            },
        ],
    },
    "tools_in_user_message": {
        "messages": [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "  What is the weather in Paris?  "},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"location": "Paris", "unit": "celsius", "days": 2},
                        },
                    }
                ],
            },
            {"role": "tool", "content": "sunny, 21 °C"},
            {"role": "tool", "content": {"temperature": 21.5, "sky": "clear", "wind": None}},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks!"},
        ],
        "tools": [WEATHER_TOOL, SUM_TOOL],
    },
    "tools_in_system_message": {
        "messages": [
            {"role": "system", "content": "You can call functions."},
            {"role": "user", "content": "Add 1 and 2"},
        ],
        "tools": [SUM_TOOL],
        "kwargs": {"tools_in_user_message": False},
    },
    "unicode": {
        "messages": [
            {"role": "user", "content": "naïve café 日本語 “quotes” \\ \"escaped\" \t tab\nnewline 🙂"},
        ],
    },
    "tools_without_user_message": {
        "messages": [{"role": "system", "content": "Tools but nobody asks."}],
        "tools": [SUM_TOOL],
    },
}

PYCOMPAT_CONVERSATIONS = {
    "pycompat_basic": {
        "messages": [
            {"role": "system", "content": "  be   brief  "},
            {"role": "user", "content": "Hi there, what is a banana?"},
            {"role": "assistant", "content": "skip me"},
            {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "text", "text": "B"}, {"type": "text", "text": "C"}]},
        ],
    },
    "pycompat_tools": {
        "messages": [
            {"role": "user", "content": "call it"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"b": 2, "a": 1}}}],
            },
        ],
        "tools": [WEATHER_TOOL],
    },
    "pycompat_raise": {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "system", "content": "late"},
        ],
    },
    "pycompat_unknown_role": {
        "messages": [{"role": "narrator", "content": "once upon a time"}],
    },
}


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")


def build_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(path)


def tokenizer_config(template):
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def record(checkpoint, tokenizer, name, conv, template=None):
    case = {
        "checkpoint": checkpoint,
        "name": name,
        "messages": conv["messages"],
        "tools": conv.get("tools"),
        "kwargs": conv.get("kwargs", {}),
        "add_generation_prompt": conv.get("add_generation_prompt", True),
    }
    args = dict(
        tools=case["tools"],
        add_generation_prompt=case["add_generation_prompt"],
        chat_template=template,
        **case["kwargs"],
    )
    try:
        text = tokenizer.apply_chat_template(conv["messages"], tokenize=False, **args)
        ids = tokenizer.apply_chat_template(conv["messages"], tokenize=True, return_dict=False, **args)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        case["text"] = text
        case["ids"] = ids
    except Exception as e:  # the template's own raise_exception
        case["error"] = str(e)
    return case


def main():
    assert transformers.__version__ == "5.23.0", transformers.__version__
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    for sub in ("llama4", "pycompat"):
        os.makedirs(os.path.join(OUT, sub))
    build_tokenizer(os.path.join(OUT, "llama4", "tokenizer.json"))
    write_json(os.path.join(OUT, "llama4", "tokenizer_config.json"), tokenizer_config(LLAMA4_TEMPLATE))
    shutil.copy(os.path.join(OUT, "llama4", "tokenizer.json"), os.path.join(OUT, "pycompat", "tokenizer.json"))
    write_json(os.path.join(OUT, "pycompat", "tokenizer_config.json"), tokenizer_config(None))
    with open(os.path.join(OUT, "pycompat", "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(PYCOMPAT_TEMPLATE)

    cases = []
    demo = AutoTokenizer.from_pretrained("models/demo")
    assert demo.chat_template is None
    for name, conv in CONVERSATIONS.items():
        cases.append(record("models/demo", demo, name, conv, template=LLAMA4_TEMPLATE))
    llama4 = AutoTokenizer.from_pretrained(os.path.join(OUT, "llama4"))
    assert llama4.chat_template == LLAMA4_TEMPLATE
    for name, conv in CONVERSATIONS.items():
        cases.append(record(f"{OUT}/llama4", llama4, name, conv))
    pycompat = AutoTokenizer.from_pretrained(os.path.join(OUT, "pycompat"))
    assert pycompat.chat_template == PYCOMPAT_TEMPLATE
    for name, conv in PYCOMPAT_CONVERSATIONS.items():
        cases.append(record(f"{OUT}/pycompat", pycompat, name, conv))
    write_json(os.path.join(OUT, "cases.json"), cases)
    errors = sum("error" in c for c in cases)
    print(f"wrote {len(cases)} cases ({errors} template errors) to {OUT}/cases.json")


if __name__ == "__main__":
    main()
