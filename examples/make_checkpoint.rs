//! Writes a random-weight Llama 4 text checkpoint in Hugging Face layout (config.json plus
//! model.safetensors), so that benchmarks need no Python and no download.
//!
//! ```text
//! cargo run --release --example make_checkpoint -- --out /tmp/bench-mid [--preset bench-mid] [--dtype bf16|f32] [--seed 0]
//! ```
//! Presets: `bench-mid` (hidden 1024, 12 MoE layers of 16 experts + shared expert, 739M parameters,
//! 140M read per decode token), `tiny` (a few MB, for trying the tools) and `ep-resident` (2 MoE
//! layers of 16 experts of hidden 256, intermediate 1024: each expert 1.5 MiB in bf16, far larger
//! than the kernel's 64 KiB fault-around, so that `tools/mpi_tests.sh` can measure that a rank of
//! an expert-parallel run holds only its share; 48 MiB in bf16).

use std::path::PathBuf;

use half::bf16;
use serde_json::{json, Value};

type Error = Box<dyn std::error::Error>;

fn preset(name: &str) -> Result<Value, Error> {
    let rope = json!({
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    Ok(match name {
        "bench-mid" => json!({
            "model_type": "llama4_text", "hidden_size": 1024, "num_hidden_layers": 12,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
            "intermediate_size": 1024, "intermediate_size_mlp": 2048, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 32000,
            "attention_chunk_size": 8192, "use_qk_norm": true, "attn_temperature_tuning": true,
            "floor_scale": 8192, "attn_scale": 0.1, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "max_position_embeddings": 1048576, "rope_parameters": rope, "bos_token_id": 1,
            "eos_token_id": 2
        }),
        "tiny" => json!({
            "model_type": "llama4_text", "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 128, "intermediate_size_mlp": 256, "num_local_experts": 8,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "vocab_size": 1000,
            "attention_chunk_size": 64, "use_qk_norm": true, "attn_temperature_tuning": true,
            "floor_scale": 64, "attn_scale": 0.1, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "max_position_embeddings": 65536, "rope_parameters": rope, "bos_token_id": 1,
            "eos_token_id": 2
        }),
        "ep-resident" => json!({
            "model_type": "llama4_text", "hidden_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "intermediate_size": 1024, "intermediate_size_mlp": 1024, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 1000,
            "attention_chunk_size": 64, "use_qk_norm": true, "attn_temperature_tuning": true,
            "floor_scale": 64, "attn_scale": 0.1, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "max_position_embeddings": 65536, "rope_parameters": rope, "bos_token_id": 1,
            "eos_token_id": 2
        }),
        other => return Err(format!("unknown preset `{other}` (bench-mid, tiny, ep-resident)").into()),
    })
}

/// Values for one tensor: norms near 1, everything else uniform with the variance of
/// N(0, 1/fan_in) (embeddings: N(0, 1)), from a seeded xorshift stream.
fn values(name: &str, shape: &[usize], state: &mut u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5 // uniform in [-0.5, 0.5)
    };
    if name.contains("norm") {
        return (0..n).map(|_| 1.0 + 0.2 * next()).collect();
    }
    let fan_in = match (name.contains("embed"), shape.len()) {
        (true, _) => 1,
        (_, 3) => shape[1], // [E, in, out]
        _ => shape[shape.len() - 1],
    };
    // Uniform on [-0.5, 0.5) has variance 1/12.
    let scale = (12.0 / fan_in as f32).sqrt();
    (0..n).map(|_| scale * next()).collect()
}

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let (mut out, mut preset_name, mut bf16_weights, mut seed) = (None, "bench-mid".to_string(), true, 0u64);
    let mut args = llama4_examples::utf8_args()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(args.next().ok_or("--out needs a directory")?)),
            "--preset" => preset_name = args.next().ok_or("--preset needs a name")?,
            "--dtype" => {
                bf16_weights = match args.next().as_deref() {
                    Some("bf16") => true,
                    Some("f32") => false,
                    _ => return Err("--dtype takes bf16 or f32".into()),
                }
            }
            "--seed" => seed = args.next().ok_or("--seed needs a value")?.parse()?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    let mut config = preset(&preset_name)?;
    config["torch_dtype"] = json!(if bf16_weights { "bfloat16" } else { "float32" });
    let text = llama4_model::TextConfig::from_json_bytes(config.to_string().as_bytes())?;

    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut params = 0usize;
    for (name, shape) in text.tensor_shapes() {
        let v = values(&name, &shape, &mut state);
        params += v.len();
        let bytes: Vec<u8> = if bf16_weights {
            v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
        } else {
            v.iter().flat_map(|&x| x.to_le_bytes()).collect()
        };
        data.push((name, shape, bytes));
    }
    let dtype = if bf16_weights {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views = data
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors"))?;
    println!(
        "wrote {} ({preset_name}, {} parameters, {} weights)",
        out.display(),
        params,
        if bf16_weights { "bf16" } else { "f32" }
    );
    Ok(())
}
