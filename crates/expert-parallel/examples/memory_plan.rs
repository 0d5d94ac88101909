//! The weights each rank of an expert-parallel run holds, for Llama 4 Scout and Maverick stored
//! bf16, q8 and q4 (experts only, groups of 32, f32 scales), from [`memory_plan`] (the estimate
//! loading follows), and the bytes one decode token moves per MoE layer ([`exchange_bytes`]).
//!
//! ```text
//! cargo run --release -p expert-parallel --example memory_plan
//! ```

use expert_parallel::{exchange_bytes, memory_plan};
use llama4_core::{DType, QuantFormat, QuantScope, QuantSpec};
use llama4_model::{quant_policy, TextConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gb = |b: u64| b as f64 / 1e9;
    println!("| model | experts stored | ranks | rank 0 (GB) | each other rank (GB) | all ranks (GB) |");
    println!("|---|---|---|---|---|---|");
    for (name, cfg) in [
        ("Scout", TextConfig::scout()),
        ("Maverick", TextConfig::maverick()),
    ] {
        for (label, format) in [
            ("bf16", None),
            ("q8", Some(QuantFormat::Q8)),
            ("q4", Some(QuantFormat::Q4)),
        ] {
            let policy = format.map(|f| quant_policy(QuantSpec::new(f, 32), QuantScope::Experts));
            for ranks in [1, 2, 4, 8] {
                let plan = memory_plan(&cfg, DType::BF16, policy, ranks)?;
                let total: u64 = plan.iter().map(|r| r.total()).sum();
                // The largest share among ranks 1..: uneven splits give the last ranks one more.
                let other = plan[1..].iter().map(|r| r.total()).max();
                println!(
                    "| {name} | {label} | {ranks} | {:.1} | {} | {:.1} |",
                    gb(plan[0].total()),
                    other.map_or("-".into(), |b| format!("{:.1}", gb(b))),
                    gb(total)
                );
            }
        }
    }
    println!();
    println!(
        "| model | ranks | broadcast B/token/layer | reduced B/token/layer/rank | MoE layers | \
         rank 0 sends, receives KB/token | decode tokens/s the link allows at 25 Gbit/s | at 100 Gbit/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cfg) in [
        ("Scout", TextConfig::scout()),
        ("Maverick", TextConfig::maverick()),
    ] {
        let layers = cfg.moe_layers().count() as u64;
        for ranks in [2u64, 4, 8] {
            let x = exchange_bytes(&cfg, 1, ranks as usize);
            let per_rank_reduce = x.reduce / ranks;
            // On rank 0's link (full duplex): the payload goes out to N-1 ranks (a flat
            // broadcast; a tree spreads it over other links) and N-1 contributions come in (its
            // own stays on the host).
            let (out, inn) = (
                (ranks - 1) * x.broadcast * layers,
                (ranks - 1) * per_rank_reduce * layers,
            );
            let rate = |gbit: f64| gbit * 1e9 / 8.0 / out.max(inn) as f64;
            println!(
                "| {name} | {ranks} | {} | {per_rank_reduce} | {layers} | {:.0}, {:.0} | {:.0} | {:.0} |",
                x.broadcast,
                out as f64 / 1e3,
                inn as f64 / 1e3,
                rate(25.0),
                rate(100.0)
            );
        }
    }
    Ok(())
}
