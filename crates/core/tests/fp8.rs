//! fp8 (float8 e4m3fn, one scale per output row): decoding and rounding against PyTorch, the
//! kernels on every instruction set against `quant::linear_reference`, and Meta's FP8 checkpoint
//! layout (`X.weight` + `X.weight_scale`, expert tensors `[E, in, out]`), hostile files included.

use std::collections::HashMap;
use std::path::PathBuf;

use llama4_core::kernels::{self, Isa};
use llama4_core::quant::{self, fp8_e4m3_from_f32, fp8_e4m3_value, linear_reference, FP8_E4M3_TABLE};
use llama4_core::{
    bf16, f16, Buffer, Checkpoint, Error, Layout, QuantData, QuantFormat, QuantPolicy, QuantScope, QuantSpec,
    ScaleType, Scales, TensorRole, Weight, WeightData,
};
use ndarray::Array2;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tempfile::TempDir;

use llama4_testkit::{f32_bytes, tensor as t, values, write_safetensors as write, Tensor as T};

fn fixture() -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/components/fp8_e4m3.safetensors");
    std::fs::read(path).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn decoding_matches_torch_bit_for_bit() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let torch = f32s(st.tensor("decoded").unwrap().data());
    assert_eq!(torch.len(), 256);
    for c in 0..=255u8 {
        let ours = fp8_e4m3_value(c);
        assert_eq!(
            ours.to_bits(),
            torch[c as usize].to_bits(),
            "code {c:#04x}: {ours} vs torch {}",
            torch[c as usize]
        );
        assert_eq!(FP8_E4M3_TABLE[c as usize].to_bits(), ours.to_bits());
    }
    assert!(fp8_e4m3_value(0x7f).is_nan() && fp8_e4m3_value(0xff).is_nan());
    assert_eq!(fp8_e4m3_value(0x7e), 448.0);
    assert_eq!(fp8_e4m3_value(0x01), 2f32.powi(-9));
}

#[test]
fn rounding_matches_torch() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = f32s(st.tensor("encode_in").unwrap().data());
    let torch = st.tensor("encode_out").unwrap().data().to_vec();
    assert!(input.len() > 1000);
    for (v, want) in input.iter().zip(&torch) {
        assert_eq!(fp8_e4m3_from_f32(*v), *want, "{v:e}");
    }
    // Every finite code round-trips; NaN stays NaN.
    for c in (0..=255u8).filter(|c| c & 0x7f != 0x7f) {
        assert_eq!(fp8_e4m3_from_f32(fp8_e4m3_value(c)), c);
    }
    assert_eq!(fp8_e4m3_from_f32(f32::NAN) & 0x7f, 0x7f);
}

#[test]
fn quantize_keeps_one_scale_per_row_of_any_width() {
    for scales in [ScaleType::F32, ScaleType::F16] {
        let (rows, k) = (5, 37);
        let mut w = values(rows * k, 3);
        w[k..2 * k].fill(0.0); // an all-zero row: scale 0, codes 0
        let q = quant::quantize(&w, k, QuantSpec::fp8().with_scales(scales)).unwrap();
        assert_eq!(q.format(), QuantFormat::F8E4M3);
        assert_eq!(
            (q.group(), q.scales().len(), q.values().len()),
            (k, rows, rows * k)
        );
        assert_eq!(
            q.spec(),
            QuantSpec::new(QuantFormat::F8E4M3, k).with_scales(scales)
        );
        let back = q.to_f32_vec();
        for o in 0..rows {
            let s = q.scales().get(o);
            let amax = w[o * k..(o + 1) * k].iter().fold(0f32, |m, v| m.max(v.abs()));
            if scales == ScaleType::F32 {
                assert_eq!(s, amax / 448.0, "row {o}");
            }
            for i in o * k..(o + 1) * k {
                // e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative (2^-9 · s absolute
                // for the subnormals).
                let err = (back[i] - w[i]).abs();
                assert!(
                    err <= w[i].abs() / 16.0 + s * 2f32.powi(-10),
                    "{i}: {} vs {}",
                    back[i],
                    w[i]
                );
                assert_eq!(back[i], q.value(i) * s);
                assert_eq!(q.q(i), q.values()[i] as i32);
            }
        }
        // The largest magnitude of each (F32-scaled) row is stored as ±448 exactly.
        if scales == ScaleType::F32 {
            assert!(q.values()[..k].iter().any(|&c| c & 0x7f == 0x7e));
        }
    }
}

#[test]
fn fp8_spec_rules() {
    assert!(QuantSpec::fp8().check(37).is_ok());
    assert!(QuantSpec::new(QuantFormat::F8E4M3, 37).check(37).is_ok());
    assert_eq!(QuantSpec::fp8().group_for(37), 37);
    let bad = |r: llama4_core::Result<QuantData>| assert!(matches!(r, Err(Error::Quant(_))), "{r:?}");
    bad(quant::quantize(
        &[1.0; 64],
        64,
        QuantSpec::new(QuantFormat::F8E4M3, 32),
    ));
    bad(quant::quantize(&[], 0, QuantSpec::fp8()));
    bad(quant::quantize(&[1.0, f32::INFINITY], 2, QuantSpec::fp8()));
    bad(quant::quantize(&[1.0, f32::NAN], 2, QuantSpec::fp8()));
    // Integer formats keep their rules.
    assert!(QuantSpec::new(QuantFormat::Q8, 0).check(64).is_err());
    assert!(QuantSpec::new(QuantFormat::Q8, 37).check(37).is_err());
    // Data needs a positive group; metadata round-trips, group 0 included.
    let empty = || Scales::F32(Buffer::from_vec(vec![]));
    assert!(matches!(
        QuantData::new(QuantFormat::F8E4M3, 0, Buffer::from_vec(vec![]), empty()),
        Err(Error::Quant(_))
    ));
    for spec in [QuantSpec::fp8(), QuantSpec::fp8().with_scales(ScaleType::F16)] {
        assert_eq!(QuantSpec::from_metadata(&spec.to_metadata()).unwrap(), spec);
    }
    assert_eq!(QuantFormat::parse("fp8"), Some(QuantFormat::F8E4M3));
    // A weight whose fp8 rows are not its input width is refused.
    let q = quant::quantize(&values(64, 1), 32, QuantSpec::fp8()).unwrap();
    let w = Weight::new(WeightData::Quant(Box::new(q)), Layout::OutIn, 1, 64);
    assert!(matches!(w, Err(Error::Quant(_))), "{w:?}");
}

/// An fp8 matrix `[n, k]` of arbitrary codes (NaN codes only when `nan`) and positive scales.
fn random_fp8(n: usize, k: usize, seed: u64, scales: ScaleType, nan: bool) -> QuantData {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let codes: Vec<u8> = (0..n * k)
        .map(|_| {
            let c = next() as u8;
            if !nan && c & 0x7f == 0x7f {
                c ^ 1
            } else {
                c
            }
        })
        .collect();
    let sc: Vec<f32> = (0..n).map(|_| ((next() % 1000) as f32 + 1.0) * 1e-5).collect();
    let scales = match scales {
        ScaleType::F32 => Scales::F32(Buffer::from_vec(sc)),
        ScaleType::F16 => Scales::F16(Buffer::from_vec(sc.iter().map(|&v| f16::from_f32(v)).collect())),
    };
    QuantData::new(QuantFormat::F8E4M3, k, Buffer::from_vec(codes), scales).unwrap()
}

/// Checks every available kernel path against the scalar definition: agreement to f32
/// rounding of the sum of |x · w| (the order of the additions differs), NaN exactly where the
/// definition has it.
fn check_kernels(t: usize, k: usize, n: usize, q: &QuantData, seed: u64) {
    let x = values(t * k, seed);
    let mut want = vec![0f32; t * n];
    linear_reference(&x, t, k, n, q, &mut want);
    let deq = q.to_f32_vec();
    let w = Weight::new(WeightData::Quant(Box::new(q.clone())), Layout::OutIn, n, k).unwrap();
    let xa = Array2::from_shape_vec((t, k), x.clone()).unwrap();
    for isa in kernels::available_isas() {
        for tasks in [Some(1), Some(3), None] {
            let mut y = Array2::from_elem((t, n), f32::NAN);
            kernels::forced::linear_into(isa, tasks, xa.view(), &w, y.view_mut()).unwrap();
            for r in 0..t {
                for o in 0..n {
                    let (got, exp) = (y[[r, o]], want[r * n + o]);
                    if exp.is_nan() {
                        assert!(
                            got.is_nan(),
                            "{isa:?} {tasks:?} t{t} k{k} n{n} [{r},{o}]: {got}, want NaN"
                        );
                        continue;
                    }
                    let mag: f32 = (0..k).map(|i| (x[r * k + i] * deq[o * k + i]).abs()).sum();
                    assert!(
                        (got - exp).abs() <= 1e-5 * mag + 1e-30,
                        "{isa:?} {tasks:?} t{t} k{k} n{n} [{r},{o}]: {got} vs {exp} (Σ|xw| {mag})"
                    );
                }
            }
        }
    }
}

#[test]
fn kernels_match_reference_on_fixed_shapes() {
    // Decode and prefill, widths with and without ragged tails, one row to many chunks.
    for (t, k, n) in [
        (1, 64, 40),
        (3, 37, 9),
        (4, 128, 33),
        (17, 5, 70),
        (40, 200, 257),
        (2, 1, 1),
        (7, 600, 45),
        (4, 1030, 64),
    ] {
        for scales in [ScaleType::F32, ScaleType::F16] {
            check_kernels(t, k, n, &random_fp8(n, k, (t * k * n) as u64, scales, false), 9);
        }
    }
    // Large enough to split across tasks and prefill chunks (rows of 5 KB).
    check_kernels(2, 5120, 70, &random_fp8(70, 5120, 1, ScaleType::F32, false), 1);
    check_kernels(5, 5120, 150, &random_fp8(150, 5120, 2, ScaleType::F32, false), 2);
}

#[test]
fn nan_codes_give_nan_on_every_path() {
    for (t, k) in [(1, 48), (2, 21), (9, 48)] {
        let n = 6;
        let mut q = random_fp8(n, k, 5, ScaleType::F32, false).values().to_vec();
        q[k + 3] = 0x7f; // row 1, in the vector part
        q[3 * k + k - 1] = 0xff; // row 3, last element (a tail when k is ragged)
        let scales = Scales::F32(Buffer::from_vec(vec![0.5; n]));
        let q = QuantData::new(QuantFormat::F8E4M3, k, Buffer::from_vec(q), scales).unwrap();
        check_kernels(t, k, n, &q, 4);
        let mut y = vec![0f32; t * n];
        linear_reference(&values(t * k, 4), t, k, n, &q, &mut y);
        assert!(y[1].is_nan() && y[3].is_nan() && !y[0].is_nan());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn kernels_match_reference(
        t in prop_oneof![1usize..=3, 4usize..=40],
        k in 1usize..=300,
        n in 1usize..=80,
        f16_scales in any::<bool>(),
        nan in proptest::bool::weighted(0.2),
        seed in any::<u64>(),
    ) {
        let scales = if f16_scales { ScaleType::F16 } else { ScaleType::F32 };
        check_kernels(t, k, n, &random_fp8(n, k, seed, scales, nan), seed ^ 7);
    }
}

#[test]
fn the_portable_path_is_always_available() {
    assert!(kernels::available_isas().contains(&Isa::Portable));
}

// ---------------------------------------------------------------------------------------------
// Checkpoints in Meta's FP8 layout.

/// Arbitrary finite codes.
fn codes(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let c = ((i * 2654435761 + seed * 97) >> 3) as u8;
            if c & 0x7f == 0x7f {
                0x12
            } else {
                c
            }
        })
        .collect()
}

const LINEAR: &str = "model.layers.0.feed_forward.shared_expert.down_proj.weight";
const GU: &str = "model.layers.0.feed_forward.experts.gate_up_proj";
const DOWN: &str = "model.layers.0.feed_forward.experts.down_proj";
const IN_OUT: &str = "extra.w_in_out";
// E experts, hidden H, expert width I (ragged on purpose).
const E: usize = 3;
const H: usize = 20;
const I: usize = 7;

struct Fp8Checkpoint {
    _dir: TempDir,
    ckpt: Checkpoint,
    /// Name → (codes as stored, scales in output order).
    stored: HashMap<&'static str, (Vec<u8>, Vec<f32>)>,
}

/// A checkpoint as fbgemm writes it; `edit` may change the tensors before writing.
fn fp8_checkpoint(edit: impl FnOnce(&mut Vec<T>)) -> Fp8Checkpoint {
    let dir = TempDir::new().unwrap();
    let mut stored = HashMap::new();
    let mut tensors = Vec::new();
    // name, weight shape, scale shape, outputs (scales)
    let specs: [(&'static str, Vec<usize>, Vec<usize>, usize); 4] = [
        (LINEAR, vec![H, I], vec![H, 1], H),
        (GU, vec![E, H, 2 * I], vec![E, 1, 2 * I], E * 2 * I),
        (DOWN, vec![E, I, H], vec![E, H, 1], E * H),
        (IN_OUT, vec![5, 3], vec![1, 3], 3),
    ];
    for (seed, (name, shape, sshape, outs)) in specs.into_iter().enumerate() {
        let c = codes(shape.iter().product(), seed as u64);
        let s: Vec<f32> = (0..outs).map(|i| 0.001 * (i + 1 + seed) as f32).collect();
        tensors.push(t(name, Dtype::F8_E4M3, &shape, c.clone()));
        tensors.push(t(&format!("{name}_scale"), Dtype::F32, &sshape, f32_bytes(&s)));
        stored.insert(name, (c, s));
    }
    tensors.push(t("model.norm.weight", Dtype::F32, &[H], f32_bytes(&[1.0; H])));
    edit(&mut tensors);
    write(dir.path(), &tensors, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    Fp8Checkpoint {
        _dir: dir,
        ckpt,
        stored,
    }
}

fn fp8_of(data: &WeightData) -> &QuantData {
    match data {
        WeightData::Quant(q) if q.format() == QuantFormat::F8E4M3 => q,
        other => panic!("not fp8: {:?}", other.quant()),
    }
}

#[test]
fn linear_weights_load_in_place() {
    let c = fp8_checkpoint(|_| {});
    let w = c.ckpt.root().weight(LINEAR, [H, I]).unwrap();
    let q = fp8_of(w.data());
    assert_eq!((w.layout(), q.group()), (Layout::OutIn, I));
    assert!(q.is_mapped(), "an [out, in] fp8 weight is read in place");
    let (codes, scales) = &c.stored[LINEAR];
    let want: Vec<f32> = (0..H * I)
        .map(|j| fp8_e4m3_value(codes[j]) * scales[j / I])
        .collect();
    assert_eq!(w.to_f32_out_in().iter().copied().collect::<Vec<_>>(), want);
    assert_eq!(c.ckpt.quantized_weights(), 1);
    assert_eq!(c.ckpt.weight_bytes(), H * I + 4 * H);
}

#[test]
fn expert_tensors_are_transposed_once() {
    let c = fp8_checkpoint(|_| {});
    let root = c.ckpt.root();
    for (name, inp, out) in [(GU, H, 2 * I), (DOWN, I, H)] {
        let w = root.batched_in_out(name, [E, inp, out]).unwrap();
        assert_eq!(
            (w.layout(), w.in_features(), w.out_features()),
            (Layout::OutIn, inp, out)
        );
        assert!(!fp8_of(w.data()).is_mapped());
        let (codes, scales) = &c.stored[name];
        for e in 0..E {
            let m = w.get(e).to_f32_out_in();
            for o in 0..out {
                for i in 0..inp {
                    let want = fp8_e4m3_value(codes[(e * inp + i) * out + o]) * scales[e * out + o];
                    assert_eq!(m[[o, i]], want, "{name} expert {e} [{o}, {i}]");
                }
            }
        }
    }
    let w = root.weight_in_out(IN_OUT, [5, 3]).unwrap();
    let (codes, scales) = &c.stored[IN_OUT];
    let m = w.to_f32_out_in();
    assert_eq!(m[[2, 4]], fp8_e4m3_value(codes[4 * 3 + 2]) * scales[2]);
}

#[test]
fn a_policy_never_requantises_fp8() {
    let c = fp8_checkpoint(|_| {});
    // Every tensor a projection: the policy would quantise anything it could.
    let policy = QuantPolicy::new(QuantSpec::new(QuantFormat::Q8, 32), QuantScope::AllLinear, |_| {
        TensorRole::Projection
    });
    let mut ckpt = c.ckpt;
    ckpt.set_quantization(Some(policy));
    let w = ckpt.root().batched_in_out(GU, [E, H, 2 * I]).unwrap();
    assert_eq!(fp8_of(w.data()).format(), QuantFormat::F8E4M3);
}

#[test]
fn bf16_and_f16_scales_are_accepted() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let c = fp8_checkpoint(|ts| {
            let s = ts
                .iter_mut()
                .find(|t| t.name == format!("{LINEAR}_scale"))
                .unwrap();
            let vals = f32s(&s.bytes);
            s.dtype = dtype;
            s.bytes = vals
                .iter()
                .flat_map(|&v| match dtype {
                    Dtype::BF16 => bf16::from_f32(v).to_le_bytes(),
                    _ => f16::from_f32(v).to_le_bytes(),
                })
                .collect();
        });
        let w = c.ckpt.root().weight(LINEAR, [H, I]).unwrap();
        let (codes, scales) = &c.stored[LINEAR];
        let s = match dtype {
            Dtype::BF16 => bf16::from_f32(scales[0]).to_f32(),
            _ => f16::from_f32(scales[0]).to_f32(),
        };
        assert_eq!(
            w.to_f32_out_in()[[0, 1]],
            fp8_e4m3_value(codes[1]) * s,
            "{dtype:?}"
        );
    }
}

/// Loads every weight of the edited checkpoint, returning the first error.
fn load_error(edit: impl FnOnce(&mut Vec<T>)) -> Error {
    let c = fp8_checkpoint(edit);
    let root = c.ckpt.root();
    root.weight(LINEAR, [H, I])
        .map(drop)
        .and_then(|()| root.batched_in_out(GU, [E, H, 2 * I]).map(drop))
        .and_then(|()| root.batched_in_out(DOWN, [E, I, H]).map(drop))
        .and_then(|()| root.weight_in_out(IN_OUT, [5, 3]).map(drop))
        .unwrap_err()
}

fn set(ts: &mut [T], name: &str, f: impl FnOnce(&mut T)) {
    f(ts.iter_mut().find(|t| t.name == name).unwrap())
}

#[test]
fn hostile_fp8_tensors_are_clear_errors() {
    let scale = |n: &str| format!("{n}_scale");
    // No scales at all.
    let e = load_error(|ts| ts.retain(|t| t.name != scale(GU)));
    assert!(
        matches!(&e, Error::QuantTensor { name, reason, .. } if name == GU && reason.contains("_scale")),
        "{e}"
    );
    // Scales of the wrong shape: one per input instead of one per output.
    let e = load_error(|ts| {
        set(ts, &scale(DOWN), |t| {
            t.shape = vec![E, I, 1];
            t.bytes = f32_bytes(&[1.0; E * I]);
        })
    });
    assert!(
        matches!(&e, Error::ShapeMismatch { name, expected, .. } if *name == scale(DOWN) && expected == &[E, H, 1]),
        "{e}"
    );
    // One scale per tensor (a per-tensor layout this format does not have).
    let e = load_error(|ts| {
        set(ts, &scale(LINEAR), |t| {
            t.shape = vec![1];
            t.bytes = f32_bytes(&[1.0]);
        })
    });
    assert!(
        matches!(&e, Error::ShapeMismatch { name, .. } if *name == scale(LINEAR)),
        "{e}"
    );
    // Scales of a dtype that is not a float.
    let e = load_error(|ts| set(ts, &scale(LINEAR), |t| t.dtype = Dtype::I32));
    assert!(
        matches!(&e, Error::QuantTensor { name, reason, .. } if name == LINEAR && reason.contains("I32")),
        "{e}"
    );
    // The fp8 tensor itself mis-shaped.
    let e = load_error(|ts| set(ts, GU, |t| t.shape = vec![E, 2 * I, H]));
    assert!(
        matches!(&e, Error::ShapeMismatch { name, .. } if name == GU),
        "{e}"
    );
    // Rows of width 0: no row to scale (an error, not a division by zero).
    let c = fp8_checkpoint(|ts| {
        ts.push(t("empty.weight", Dtype::F8_E4M3, &[4, 0], vec![]));
        ts.push(t("empty.weight_scale", Dtype::F32, &[4, 1], f32_bytes(&[1.0; 4])));
    });
    let e = c.ckpt.root().weight("empty.weight", [4, 0]).unwrap_err();
    assert!(
        matches!(&e, Error::QuantTensor { name, .. } if name == "empty.weight"),
        "{e}"
    );
    // Another float8 variant is not silently read as e4m3.
    let e = load_error(|ts| set(ts, LINEAR, |t| t.dtype = Dtype::F8_E5M2));
    assert!(
        matches!(&e, Error::UnsupportedDtype { name, .. } if name == LINEAR),
        "{e}"
    );
}

#[test]
fn stored_fp8_qweight_round_trips() {
    // Rust's own fp8 (`N.qweight` F8_E4M3 + `N.qscale`, group 0 in the metadata) reads back
    // bit for bit, for weights of any width.
    let dir = TempDir::new().unwrap();
    let spec = QuantSpec::fp8();
    let q = quant::quantize(&values(H * I, 8), I, spec).unwrap();
    let scales = match q.scales() {
        Scales::F32(b) => f32_bytes(b),
        Scales::F16(_) => unreachable!(),
    };
    let tensors = [
        t(
            &format!("{LINEAR}.qweight"),
            Dtype::F8_E4M3,
            &[H, I],
            q.values().to_vec(),
        ),
        t(&format!("{LINEAR}.qscale"), Dtype::F32, &[H, 1], scales),
    ];
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
        )
    });
    let meta = HashMap::from([(quant::METADATA_KEY.to_string(), spec.to_metadata())]);
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, Some(meta)).unwrap(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let w = ckpt.root().weight(LINEAR, [H, I]).unwrap();
    let back = fp8_of(w.data());
    assert_eq!(&back.values()[..], &q.values()[..]);
    assert_eq!(back.to_f32_vec(), q.to_f32_vec());
    // A width the stored tensor does not have is refused.
    assert!(ckpt.stored_quant(LINEAR, &[], H, I + 1).is_err());
}
