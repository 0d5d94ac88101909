#!/usr/bin/env bash
# Runs the example binaries on hostile inputs (issue 18) under `ulimit -v 8000000` and
# `timeout 20`. Every case must end in a clean, named error: exit status 1 with an `error:` line
# on stderr, no panic (101), no abort or signal (>= 128), no timeout (124). The one exception,
# a temperature under the greedy floor, must succeed with the greedy answer.
#
#   cargo build --release --examples && tools/hostile_inputs.sh
#
# Needs python3 (standard library only) to edit JSON and safetensors headers exactly.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/examples}
GEN=$BIN/generate
DEMO=$ROOT/models/demo
VDEMO=$ROOT/models/vision-demo
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PASS=0
FAIL=0

# A copy of checkpoint $2 named $1: every file symlinked except those listed after it, copied.
ckpt() {
    local name=$1 src=$2
    shift 2
    mkdir -p "$WORK/$name"
    for f in "$src"/*; do ln -s "$f" "$WORK/$name/"; done
    for f in "$@"; do
        rm -f "$WORK/$name/$f"
        cp "$src/$f" "$WORK/$name/$f"
    done
    echo "$WORK/$name"
}

# Sets JSON keys of file $1 exactly: `edit FILE key=VALUE ...`; VALUE is JSON text (big
# integers stay exact), `key=` deletes; dotted keys reach into objects.
edit() {
    python3 - "$@" <<'EOF'
import json, sys
path, edits = sys.argv[1], sys.argv[2:]
doc = json.load(open(path))
for e in edits:
    key, _, value = e.partition("=")
    *outer, last = key.split(".")
    obj = doc
    for k in outer:
        obj = obj[k]
    if value == "":
        obj.pop(last, None)
    else:
        obj[last] = json.loads(value)
json.dump(doc, open(path, "w"), indent=1)
EOF
}

# Overwrites the first element of tensor $2 in safetensors file $1 with the float $3.
poison() {
    python3 - "$@" <<'EOF'
import json, struct, sys
path, name, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
b = bytearray(open(path, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
t = h[name]
at = 8 + n + t["data_offsets"][0]
f32 = struct.pack("<f", value)
raw = {"F32": f32, "BF16": f32[2:], "F16": struct.pack("<e", value)}[t["dtype"]]
b[at:at + len(raw)] = raw
open(path, "wb").write(b)
EOF
}

# run NAME EXPECT -- COMMAND...: EXPECT is `error:TEXT` (exit 1 with an `error:` line, TEXT
# somewhere in stderr: what the message must name) or `ok:TEXT` (exit 0 with TEXT on stdout).
run() {
    local name=$1 expect=$2
    shift 3
    local out err rc
    out=$(
        ulimit -v 8000000
        timeout 20 "$@" 2>"$WORK/stderr" </dev/null
    )
    rc=$?
    err=$(grep -m1 -e '^error' -e 'panicked' -e 'memory allocation' "$WORK/stderr" | cut -c1-170)
    local verdict=FAIL
    case $expect in
        error:*) [ $rc -eq 1 ] && grep -q '^error: ' "$WORK/stderr" &&
            grep -qF -- "${expect#error:}" "$WORK/stderr" && verdict=ok ;;
        ok:*) [ $rc -eq 0 ] && grep -qF -- "${expect#ok:}" <<<"$out" && verdict=ok &&
            err=$(grep -m1 '^answer' <<<"$out") ;;
    esac
    case $rc in
        124) err="TIMEOUT $err" ;;
        101) err="PANIC $err" ;;
    esac
    [ $rc -ge 128 ] && [ $rc -ne 124 ] && err="SIGNAL $((rc - 128)) $err"
    if [ $verdict = ok ]; then PASS=$((PASS + 1)); else FAIL=$((FAIL + 1)); fi
    printf '%-4s %-30s rc=%-3s %s\n' "$verdict" "$name" "$rc" "$err"
}

big63=9223372036854775824 # 2^63 + 16
big62=4611686018427387908 # 2^62 + 4

echo "== integer overflow in sizes from config.json"
d=$(ckpt head_dim_2e63 "$DEMO" config.json) && edit "$d/config.json" head_dim=$big63
run head_dim=2^63+16 'error:MAX_HEAD_DIM' -- "$GEN" --model "$d"
d=$(ckpt heads_2e62 "$DEMO" config.json) && edit "$d/config.json" num_attention_heads=$big62
run num_attention_heads=2^62+4 'error:MAX_HEADS' -- "$GEN" --model "$d"
d=$(ckpt head_dim_wrap "$DEMO" config.json) && edit "$d/config.json" head_dim=4611686018427387904
run "head_dim=2^62 (q width wraps)" 'error:MAX_HEAD_DIM' -- "$GEN" --model "$d"
d=$(ckpt experts_huge "$DEMO" config.json) && edit "$d/config.json" num_local_experts=$big62
run num_local_experts=2^62+4 'error:MAX_EXPERTS' -- "$GEN" --model "$d"
d=$(ckpt interm_huge "$DEMO" config.json) && edit "$d/config.json" intermediate_size=$big63
run intermediate_size=2^63+16 'error:overflow' -- "$GEN" --model "$d"
d=$(ckpt vision_grid "$VDEMO" config.json) &&
    edit "$d/config.json" vision_config.image_size=4294967296 vision_config.patch_size=1
run "vision image_size=2^32" 'error:MAX_GRID' -- "$GEN" --model "$d" --prompt "a<|image|>" --image "$VDEMO/heldout/000.png"

echo "== work or memory proportional to a number in a file"
d=$(ckpt layers_2e62 "$DEMO" config.json) &&
    edit "$d/config.json" num_hidden_layers=4611686018427387904 no_rope_layers= layer_types= moe_layers=
run "layers=2^62, no layer lists" 'error:MAX_LAYERS' -- "$GEN" --model "$d"
d=$(ckpt layers_1e6 "$DEMO" config.json) &&
    edit "$d/config.json" num_hidden_layers=1000000 no_rope_layers= layer_types= moe_layers=
run "layers=10^6, no layer lists" 'error:MAX_LAYERS' -- "$GEN" --model "$d"
for n in 100000 1000000000 $big63; do
    d=$(ckpt "patches_$n" "$VDEMO" preprocessor_config.json) &&
        edit "$d/preprocessor_config.json" max_patches=$n
    run "max_patches=$n" 'error:MAX_PATCHES' -- "$GEN" --model "$d" --prompt "a<|image|>" --image "$VDEMO/heldout/000.png"
done
d=$(ckpt tile_huge "$VDEMO" preprocessor_config.json) &&
    edit "$d/preprocessor_config.json" 'size={"height": 1400000, "width": 1400000}'
run "tile size=1400000" 'error:MAX_TILE_SIZE' -- "$GEN" --model "$d" --prompt "a<|image|>" --image "$VDEMO/heldout/000.png"

echo "== files that are not regular files"
d=$(ckpt cfg_fifo "$DEMO") && rm "$d/config.json" && mkfifo "$d/config.json"
run "config.json FIFO" 'error:FIFO' -- "$GEN" --model "$d"
d=$(ckpt cfg_zero "$DEMO") && ln -sf /dev/zero "$d/config.json"
run "config.json -> /dev/zero" 'error:character device' -- "$GEN" --model "$d"
d=$(ckpt cfg_dir "$DEMO") && rm "$d/config.json" && mkdir "$d/config.json"
run "config.json directory" 'error:directory' -- "$GEN" --model "$d"
ln -s /dev/zero "$WORK/zero.png"
run "image -> /dev/zero" 'error:character device' -- "$GEN" --model "$VDEMO" --prompt "a<|image|>" --image "$WORK/zero.png"
mkfifo "$WORK/fifo.png"
run "image FIFO" 'error:FIFO' -- "$GEN" --model "$VDEMO" --prompt "a<|image|>" --image "$WORK/fifo.png"
for f in model.safetensors tokenizer.json generation_config.json; do
    d=$(ckpt "fifo_$f" "$DEMO") && rm "$d/$f" && mkfifo "$d/$f"
    run "$f FIFO" 'error:FIFO' -- "$GEN" --model "$d"
    d=$(ckpt "dir_$f" "$DEMO") && rm "$d/$f" && mkdir "$d/$f"
    run "$f directory" 'error:directory' -- "$GEN" --model "$d"
    d=$(ckpt "loop_$f" "$DEMO") && rm "$d/$f" && ln -s "$d/$f.b" "$d/$f" && ln -s "$d/$f" "$d/$f.b"
    run "$f link loop" 'error:symbolic link' -- "$GEN" --model "$d"
done
d=$(ckpt shard_fifo "$ROOT/fixtures/models/maverick") && rm "$d/model-00002-of-00003.safetensors" &&
    mkfifo "$d/model-00002-of-00003.safetensors"
run "shard FIFO" 'error:FIFO' -- "$GEN" --model "$d" --prompt-ids 1,2
d=$(ckpt index_zero "$ROOT/fixtures/models/maverick") && ln -sf /dev/zero "$d/model.safetensors.index.json"
run "index -> /dev/zero" 'error:character device' -- "$GEN" --model "$d" --prompt-ids 1,2
d=$(ckpt pre_fifo "$VDEMO") && rm "$d/preprocessor_config.json" && mkfifo "$d/preprocessor_config.json"
run "preprocessor_config FIFO" 'error:FIFO' -- "$GEN" --model "$d" --prompt "a<|image|>" --image "$VDEMO/heldout/000.png"

echo "== command line"
run "non-UTF-8 --prompt" 'error:UTF-8' -- "$GEN" --prompt $'\xff\xfe'
run "non-UTF-8 flag" 'error:UTF-8' -- "$GEN" $'--\xff'
run "non-UTF-8 --model path" 'error:UTF-8' -- "$GEN" --model "$WORK/"$'\xff'
for ex in bench_generate long_context make_checkpoint quant_accuracy swap_router; do
    run "$ex non-UTF-8" 'error:UTF-8' -- "$BIN/$ex" $'\xff'
done

echo "== non-finite numbers"
d=$(ckpt nan_norm "$DEMO" model.safetensors) && poison "$d/model.safetensors" model.norm.weight nan
run "NaN weight, greedy" 'error:--check-weights' -- "$GEN" --model "$d"
run "NaN weight, sampling" 'error:--check-weights' -- "$GEN" --model "$d" --temperature 0.8
run "NaN weight, --check-weights" 'error:model.norm.weight' -- "$GEN" --model "$d" --check-weights
d=$(ckpt inf_embed "$DEMO" model.safetensors) && poison "$d/model.safetensors" model.embed_tokens.weight inf
run "Inf weight, --check-weights" 'error:model.embed_tokens.weight' -- "$GEN" --model "$d" --check-weights
"$GEN" --quantize q8 --quantize-all --save-quantized "$WORK/q8" >/dev/null 2>&1
poison "$WORK/q8/model.safetensors" lm_head.weight.qscale inf
run "Inf quantisation scale" 'error:--check-weights' -- "$GEN" --model "$WORK/q8"
greedy=$("$GEN" 2>/dev/null | grep '^answer')
run "temperature 1e-40 = greedy" "ok:$greedy" -- "$GEN" --temperature 1e-40

echo "== silent acceptance"
jpg=$ROOT/fixtures/vision/images/photo_like.jpg
head -c $(($(stat -c %s "$jpg") * 2 / 3)) "$jpg" >"$WORK/cut.jpg"
run "truncated JPEG" 'error:truncated' -- "$GEN" --model "$VDEMO" --prompt "a<|image|>" --image "$WORK/cut.jpg"
png=$VDEMO/heldout/000.png
head -c $(($(stat -c %s "$png") - 12)) "$png" >"$WORK/cut.png"
run "PNG without IEND" 'error:truncated' -- "$GEN" --model "$VDEMO" --prompt "a<|image|>" --image "$WORK/cut.png"
run "<|image|> without --image" 'error:--image' -- "$GEN" --model "$VDEMO" --prompt "<|begin_of_text|>what is this?<|image|> ="
d=$(ckpt no_header "$DEMO" tokenizer.json) && python3 - "$d/tokenizer.json" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<|header_start|>"]
t["model"]["vocab"].pop("<|header_start|>", None)
json.dump(t, open(sys.argv[1], "w"))
EOF
run "--chat without <|header_start|>" 'error:<|header_start|>' -- "$GEN" --model "$d" --chat --prompt "sort 1 2 ="
run "--max-new-tokens usize::MAX" 'error:--max-new-tokens' -- "$GEN" --max-new-tokens 18446744073709551615
run "--max-new-tokens over context" 'error:--max-new-tokens' -- "$GEN" --max-new-tokens 1000
run "--dump-logits a directory" 'error:--dump-logits' -- "$GEN" --dump-logits "$WORK"
run "--dump-logits no parent" 'error:--dump-logits' -- "$GEN" --dump-logits "$WORK/no/such/dir/l.safetensors"
run "--save-quantized a file" 'error:--save-quantized' -- "$GEN" --quantize q8 --save-quantized "$jpg"

run "stdout closed early" 'error:stdout' -- bash -c '"$0" | head -c 1 >/dev/null; exit ${PIPESTATUS[0]}' "$GEN"

echo "$PASS passed, $FAIL failed"
[ $FAIL -eq 0 ]
