//! Random but valid ggml blocks (also included by the workspace benches).

use half::f16;
use llama4_core::ggml::GgmlType;

/// Random but valid blocks of `ty`: random bits, with every f16 scale field set to a finite
/// value of either sign (F32 / F16 / BF16: random finite values).
pub fn random_blocks(ty: GgmlType, elements: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let value = |r: u64, scale: f32| ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale;
    match ty {
        GgmlType::F32 => {
            return (0..elements)
                .flat_map(|_| value(next(), 2.0).to_le_bytes())
                .collect()
        }
        GgmlType::F16 => {
            return (0..elements)
                .flat_map(|_| f16::from_f32(value(next(), 2.0)).to_le_bytes())
                .collect()
        }
        GgmlType::BF16 => {
            return (0..elements)
                .flat_map(|_| half::bf16::from_f32(value(next(), 2.0)).to_le_bytes())
                .collect()
        }
        _ => {}
    }
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => unreachable!(),
    };
    let blocks = elements / ty.block_size();
    let mut bytes: Vec<u8> = (0..blocks * ty.type_size())
        .map(|_| (next() >> 24) as u8)
        .collect();
    for b in bytes.chunks_exact_mut(ty.type_size()) {
        for &f in fields {
            let v = f16::from_f32(value(next(), 0.05));
            b[f..f + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}
