//! Quantised weights in checkpoints: load-time quantisation through a [`QuantPolicy`], stored
//! `N.qweight` + `N.qscale` pairs read back bit for bit, and hostile stored pairs (each a
//! distinct error variant naming the tensor).

use std::collections::HashMap;
use std::path::Path;

use llama4_core::quant::{self, METADATA_KEY};
use llama4_core::safetensors::SafetensorsFile;
use llama4_core::{
    bf16, Checkpoint, DType, Error, Layout, QuantData, QuantFormat, QuantPolicy, QuantScope, QuantSpec,
    QuantTarget, ScaleType, Scales, TensorRole, Weight, WeightData,
};
use safetensors::Dtype;
use tempfile::TempDir;

use llama4_testkit::{tensor as t, write_safetensors as write, Tensor as T};

/// `n` bf16 values with many distinct magnitudes (and an exact zero row when `n` allows).
fn bf16_values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i * 37 + seed * 101) % 211) as f32 / 13.0 - 7.5;
            bf16::from_f32(v * (1.0 + (i % 7) as f32)).to_f32()
        })
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}

fn meta(spec: &QuantSpec) -> Option<HashMap<String, String>> {
    Some(HashMap::from([(METADATA_KEY.to_string(), spec.to_metadata())]))
}

/// The stored tensors of quantised `q` under `name`, with `lead` batch dimensions.
fn stored(name: &str, q: &QuantData, lead: &[usize], out: usize, inp: usize) -> [T; 2] {
    let vb = q.format().value_bytes(inp);
    let wdtype = match q.format() {
        QuantFormat::Q8 => Dtype::I8,
        QuantFormat::Q4 => Dtype::U8,
        QuantFormat::F8E4M3 => Dtype::F8_E4M3,
    };
    let (sdtype, sbytes) = match q.scales() {
        Scales::F32(b) => (Dtype::F32, b.iter().flat_map(|s| s.to_le_bytes()).collect()),
        Scales::F16(b) => (Dtype::F16, b.iter().flat_map(|s| s.to_le_bytes()).collect()),
    };
    let shape = |last| lead.iter().copied().chain([out, last]).collect::<Vec<_>>();
    [
        t(
            &format!("{name}.qweight"),
            wdtype,
            &shape(vb),
            q.values().to_vec(),
        ),
        t(&format!("{name}.qscale"), sdtype, &shape(inp / q.group()), sbytes),
    ]
}

fn assert_same_quant(a: &QuantData, b: &QuantData) {
    assert_eq!(a.spec(), b.spec());
    assert_eq!(&a.values()[..], &b.values()[..], "values differ");
    assert_eq!(a.scales().len(), b.scales().len());
    for i in 0..a.scales().len() {
        assert_eq!(
            a.scales().get(i).to_bits(),
            b.scales().get(i).to_bits(),
            "scale {i}"
        );
    }
}

fn quant_of(data: &WeightData) -> &QuantData {
    match data {
        WeightData::Quant(q) => q,
        other => panic!("not quantised: {:?}", other.dtype()),
    }
}

// Shapes of a small MoE layer: H = 64, I = 32 (expert down_proj input), 2 experts.
const H: usize = 64;
const I: usize = 32;
const E: usize = 2;
const EXPERTS_GU: &str = "model.layers.0.feed_forward.experts.gate_up_proj";
const EXPERTS_DOWN: &str = "model.layers.0.feed_forward.experts.down_proj";
const Q_PROJ: &str = "model.layers.0.self_attn.q_proj.weight";
const ROUTER: &str = "model.layers.0.feed_forward.router.weight";
const EMBED: &str = "model.embed_tokens.weight";

/// A float checkpoint with experts, one attention projection, the router and an embedding.
fn float_checkpoint(dir: &Path) -> HashMap<&'static str, Vec<f32>> {
    let tensors = [
        (EXPERTS_GU, vec![E, H, 2 * I], 1),
        (EXPERTS_DOWN, vec![E, I, H], 2),
        (Q_PROJ, vec![H, H], 3),
        (ROUTER, vec![E, H], 4),
        (EMBED, vec![10, H], 5),
    ];
    let mut values = HashMap::new();
    let mut out = Vec::new();
    for (name, shape, seed) in tensors {
        let v = bf16_values(shape.iter().product(), seed);
        out.push(t(name, Dtype::BF16, &shape, bf16_bytes(&v)));
        values.insert(name, v);
    }
    write(dir, &out, None);
    values
}

/// What the model crate tells a policy about this file's tensors (its real rule is
/// `llama4_model::tensor_role`): enough for the names these tests use.
fn role(name: &str) -> TensorRole {
    if name.ends_with("experts.gate_up_proj") || name.ends_with("experts.down_proj") {
        TensorRole::Experts
    } else if name.ends_with("_proj.weight") || name == "lm_head.weight" {
        TensorRole::Projection
    } else {
        TensorRole::Other
    }
}

#[test]
fn scopes_select_by_role() {
    let spec = QuantSpec::new(QuantFormat::Q8, 32);
    let experts = QuantPolicy::new(spec, QuantScope::Experts, role);
    let all = QuantPolicy::new(spec, QuantScope::AllLinear, role);
    for (name, e, a) in [
        (EXPERTS_GU, Some(QuantTarget::Experts), Some(QuantTarget::Experts)),
        (Q_PROJ, None, Some(QuantTarget::Linear)),
        (ROUTER, None, None),
        (EMBED, None, None),
    ] {
        assert_eq!(experts.selects(name), e, "{name} (experts)");
        assert_eq!(all.selects(name), a, "{name} (all-linear)");
    }
}

#[test]
fn metadata_round_trips_and_rejects_bad_values() {
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        for scales in [ScaleType::F32, ScaleType::F16] {
            for group in [32, 128] {
                let spec = QuantSpec::new(format, group).with_scales(scales);
                assert_eq!(QuantSpec::from_metadata(&spec.to_metadata()).unwrap(), spec);
            }
        }
    }
    assert_eq!(
        QuantSpec::new(QuantFormat::Q4, 128).to_metadata(),
        r#"{"format":"q4","group":128,"scales":"f32"}"#
    );
    for bad in [
        "",
        "[]",
        r#"{"format":"q3","group":32,"scales":"f32"}"#,
        r#"{"format":"q8","group":48,"scales":"f32"}"#,
        r#"{"format":"q8","group":0,"scales":"f32"}"#,
        r#"{"format":"q8","group":-32,"scales":"f32"}"#,
        r#"{"format":"q8","group":32,"scales":"bf16"}"#,
        r#"{"format":"q8","scales":"f32"}"#,
        r#"{"format":"q8","group":"32","scales":"f32"}"#,
    ] {
        assert!(
            matches!(QuantSpec::from_metadata(bad), Err(Error::Quant(_))),
            "accepted {bad}"
        );
    }
}

#[test]
fn load_time_quantisation_follows_the_policy() {
    let dir = TempDir::new().unwrap();
    let values = float_checkpoint(dir.path());
    let spec = QuantSpec::new(QuantFormat::Q4, 32).with_scales(ScaleType::F16);
    for scope in [QuantScope::Experts, QuantScope::AllLinear] {
        let ckpt = Checkpoint::open(dir.path())
            .unwrap()
            .with_quantization(Some(QuantPolicy::new(spec, scope, role)));
        let root = ckpt.root();
        let gu = root.batched_in_out(EXPERTS_GU, [E, H, 2 * I]).unwrap();
        assert_eq!((gu.quant(), gu.layout()), (Some(spec), Layout::OutIn));
        let down = root.batched_in_out(EXPERTS_DOWN, [E, I, H]).unwrap();
        assert_eq!(down.quant(), Some(spec));
        // Same bytes as quantising each expert's [out, in] matrix directly.
        let direct: Vec<f32> = (0..E)
            .flat_map(|e| {
                let m = &values[EXPERTS_GU][e * H * 2 * I..(e + 1) * H * 2 * I];
                let w = ndarray::ArrayView2::from_shape((H, 2 * I), m).unwrap();
                w.t().iter().copied().collect::<Vec<_>>()
            })
            .collect();
        assert_same_quant(quant_of(gu.data()), &quant::quantize(&direct, H, spec).unwrap());

        let q = root.weight(Q_PROJ, [H, H]).unwrap();
        let want = if scope == QuantScope::AllLinear {
            Some(spec)
        } else {
            None
        };
        assert_eq!(q.quant(), want, "{scope:?}");
        // Never quantised: the router and the embedding.
        assert_eq!(root.weight(ROUTER, [E, H]).unwrap().dtype(), Some(DType::BF16));
        assert_eq!(root.weight(EMBED, [10, H]).unwrap().dtype(), Some(DType::BF16));
        let n = if scope == QuantScope::AllLinear { 3 } else { 2 };
        assert_eq!(ckpt.quantized_weights(), n);
        // weight_of refuses quantised weights as before.
        if scope == QuantScope::AllLinear {
            let err = root.weight_of(Q_PROJ, [H, H], &[DType::BF16]).unwrap_err();
            assert!(matches!(&err, Error::Quant(m) if m.contains(Q_PROJ)), "{err}");
        }
    }
    // Without a policy nothing is quantised.
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let gu = ckpt.root().batched_in_out(EXPERTS_GU, [E, H, 2 * I]).unwrap();
    assert_eq!((gu.dtype(), gu.layout()), (Some(DType::BF16), Layout::InOut));
}

#[test]
fn group_not_dividing_the_input_width_is_an_error_naming_the_tensor() {
    let dir = TempDir::new().unwrap();
    float_checkpoint(dir.path());
    // down_proj has input width I = 32; groups of 64 do not fit.
    let spec = QuantSpec::new(QuantFormat::Q8, 64);
    let ckpt = Checkpoint::open(dir.path())
        .unwrap()
        .with_quantization(Some(QuantPolicy::new(spec, QuantScope::Experts, role)));
    let err = ckpt.root().batched_in_out(EXPERTS_DOWN, [E, I, H]).unwrap_err();
    assert!(
        matches!(&err, Error::Quant(m) if m.contains(EXPERTS_DOWN) && m.contains("group size 64")),
        "{err}"
    );
    // gate_up_proj (input width 64) fits.
    assert!(ckpt.root().batched_in_out(EXPERTS_GU, [E, H, 2 * I]).is_ok());
}

/// A checkpoint with `q_proj` and the experts stored quantised with `spec`, plus the router as
/// floats; returns the expected quantised data.
fn quantised_checkpoint(dir: &Path, spec: QuantSpec) -> (QuantData, QuantData) {
    let wq = bf16_values(H * H, 3);
    let q = quant::quantize(&wq, H, spec).unwrap();
    let we = bf16_values(E * H * H, 4);
    let qe = quant::quantize(&we, H, spec).unwrap();
    let mut tensors: Vec<T> = stored(Q_PROJ, &q, &[], H, H).into_iter().collect();
    tensors.extend(stored(EXPERTS_DOWN, &qe, &[E], H, H));
    tensors.push(t(
        ROUTER,
        Dtype::BF16,
        &[E, H],
        bf16_bytes(&bf16_values(E * H, 5)),
    ));
    write(dir, &tensors, meta(&spec));
    (q, qe)
}

#[test]
fn stored_quantised_tensors_load_bit_for_bit_from_the_map() {
    for spec in [
        QuantSpec::new(QuantFormat::Q8, 32),
        QuantSpec::new(QuantFormat::Q4, 64).with_scales(ScaleType::F16),
    ] {
        let dir = TempDir::new().unwrap();
        let (q, qe) = quantised_checkpoint(dir.path(), spec);
        // A policy with another spec does not requantise stored tensors.
        let other = QuantPolicy::new(QuantSpec::new(QuantFormat::Q8, 64), QuantScope::AllLinear, role);
        for policy in [None, Some(other)] {
            let ckpt = Checkpoint::open(dir.path()).unwrap().with_quantization(policy);
            assert!(ckpt.is_stored_quantized(Q_PROJ));
            assert!(ckpt.root().contains(Q_PROJ));
            let w = ckpt.root().weight(Q_PROJ, [H, H]).unwrap();
            assert_eq!((w.quant(), w.layout()), (Some(spec), Layout::OutIn));
            assert!(w.data().is_mapped(), "stored integers are borrowed from the map");
            assert_same_quant(quant_of(w.data()), &q);
            // Asked for as [in, out]: the same stored [out, in] matrix.
            let w2 = ckpt.root().weight_in_out(Q_PROJ, [H, H]).unwrap();
            assert_same_quant(quant_of(w2.data()), &q);
            let b = ckpt.root().batched_in_out(EXPERTS_DOWN, [E, H, H]).unwrap();
            assert_eq!(b.quant(), Some(spec));
            assert_same_quant(quant_of(b.data()), &qe);
            assert_same_quant(quant_of(b.get(1).data()), &qe.slice(H * H, H * H));
            let err = ckpt.root().weight_of(Q_PROJ, [H, H], &[DType::BF16]).unwrap_err();
            assert!(matches!(&err, Error::Quant(m) if m.contains(Q_PROJ)), "{err}");
        }
    }
}

/// Opens a checkpoint written from `tensors` and `metadata` and asks for `q_proj` `[H, H]`.
fn load_err(tensors: &[T], metadata: Option<HashMap<String, String>>) -> Error {
    let dir = TempDir::new().unwrap();
    write(dir.path(), tensors, metadata);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    ckpt.root().weight(Q_PROJ, [H, H]).unwrap_err()
}

#[test]
fn hostile_stored_quantised_tensors() {
    let spec = QuantSpec::new(QuantFormat::Q4, 32);
    let q = quant::quantize(&bf16_values(H * H, 3), H, spec).unwrap();
    let [qw, qs] = stored(Q_PROJ, &q, &[], H, H);
    let clone = |x: &T| t(&x.name, x.dtype, &x.shape, x.bytes.clone());

    // qweight without qscale.
    let err = load_err(&[clone(&qw)], meta(&spec));
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == &format!("{Q_PROJ}.qscale")),
        "{err}"
    );

    // No metadata, or metadata that does not parse.
    let err = load_err(&[clone(&qw), clone(&qs)], None);
    assert!(
        matches!(&err, Error::QuantTensor { name, reason, .. } if name == Q_PROJ && reason.contains(METADATA_KEY)),
        "{err}"
    );
    for bad in [
        "q4",
        r#"{"format":"q4","group":33,"scales":"f32"}"#,
        r#"{"format":"q5","group":32,"scales":"f32"}"#,
    ] {
        let m = Some(HashMap::from([(METADATA_KEY.to_string(), bad.to_string())]));
        let err = load_err(&[clone(&qw), clone(&qs)], m);
        assert!(
            matches!(&err, Error::QuantTensor { name, .. } if name == Q_PROJ),
            "{bad}: {err}"
        );
    }

    // Metadata that disagrees with the stored dtypes: q8 needs I8 values, f16 scales F16.
    for other in [
        QuantSpec::new(QuantFormat::Q8, 32),
        QuantSpec::new(QuantFormat::Q4, 32).with_scales(ScaleType::F16),
    ] {
        let err = load_err(&[clone(&qw), clone(&qs)], meta(&other));
        assert!(
            matches!(&err, Error::QuantTensor { reason, .. } if reason.contains("needs")),
            "{err}"
        );
    }
    // ... or with the stored shapes: a group of 64 means half as many scales.
    let err = load_err(
        &[clone(&qw), clone(&qs)],
        meta(&QuantSpec::new(QuantFormat::Q4, 64)),
    );
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name.ends_with(".qscale")),
        "{err}"
    );

    // Shapes that do not match the weight asked for, or each other.
    let wrong_w = t(&qw.name, qw.dtype, &[H / 2, H], qw.bytes.clone());
    let err = load_err(&[wrong_w, clone(&qs)], meta(&spec));
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, .. } if name.ends_with(".qweight") && expected == &[H, H / 2]),
        "{err}"
    );
    let wrong_s = t(&qs.name, qs.dtype, &[H / 2, 4], qs.bytes.clone());
    let err = load_err(&[clone(&qw), wrong_s], meta(&spec));
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name.ends_with(".qscale")),
        "{err}"
    );

    // A name stored both as floats and quantised.
    let float = t(Q_PROJ, Dtype::BF16, &[H, H], bf16_bytes(&bf16_values(H * H, 1)));
    let err = load_err(&[float, clone(&qw), clone(&qs)], meta(&spec));
    assert!(
        matches!(&err, Error::QuantTensor { reason, .. } if reason.contains("both")),
        "{err}"
    );

    // The quantised pair is not readable as floats, and floats not as bytes.
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), &[clone(&qw), clone(&qs)], meta(&spec));
    let file = SafetensorsFile::open(&path).unwrap();
    assert!(matches!(file.data(&qw.name), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(
        file.byte_data(&qs.name),
        Err(Error::UnsupportedDtype { .. })
    ));
    assert_eq!(&file.byte_data(&qw.name).unwrap()[..], &qw.bytes[..]);
    assert_eq!(file.raw_bytes(&qs.name).unwrap(), &qs.bytes[..]);
}

#[test]
fn int8_headers_get_the_usual_checks() {
    // An I8 tensor whose byte range does not match its shape.
    let header = r#"{"a.qweight":{"dtype":"I8","shape":[4,8],"data_offsets":[0,30]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 30]);
    let err = llama4_core::safetensors::parse_header(Path::new("x"), &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ByteLength {
                expected: 32,
                got: 30,
                ..
            }
        ),
        "{err}"
    );
    // ... and one past the data section.
    let header = r#"{"a.qweight":{"dtype":"U8","shape":[64],"data_offsets":[0,64]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 32]);
    let err = llama4_core::safetensors::parse_header(Path::new("x"), &bytes).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
}

#[test]
fn quantised_weights_compute_like_their_dequantised_values() {
    // A stored quantised weight runs through kernels::linear like the reference definition.
    let spec = QuantSpec::new(QuantFormat::Q8, 32);
    let dir = TempDir::new().unwrap();
    let (q, _) = quantised_checkpoint(dir.path(), spec);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let w: Weight = ckpt.root().weight(Q_PROJ, [H, H]).unwrap();
    let x = ndarray::Array2::from_shape_fn((3, H), |(r, c)| ((r * 7 + c) % 11) as f32 / 5.0 - 1.0);
    let y = llama4_core::kernels::linear(x.view(), &w).unwrap();
    let mut want = vec![0f32; 3 * H];
    quant::linear_reference(x.as_slice().unwrap(), 3, H, H, &q, &mut want);
    for (a, b) in y.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn load_time_quantisation_equals_the_weight_methods_bit_for_bit() {
    // Large enough that the loader quantises in several parallel blocks (ragged last block).
    let (rows, e) = (10_007, 3);
    let dir = TempDir::new().unwrap();
    let lin = bf16_values(rows * H, 7);
    let exp = bf16_values(e * H * 96, 8);
    write(
        dir.path(),
        &[
            t("lm_head.weight", Dtype::BF16, &[rows, H], bf16_bytes(&lin)),
            t(EXPERTS_GU, Dtype::BF16, &[e, H, 96], bf16_bytes(&exp)),
        ],
        None,
    );
    let plain = Checkpoint::open(dir.path()).unwrap();
    for spec in [
        QuantSpec::new(QuantFormat::Q8, 32),
        QuantSpec::new(QuantFormat::Q4, 64).with_scales(ScaleType::F16),
    ] {
        let ckpt = Checkpoint::open(dir.path())
            .unwrap()
            .with_quantization(Some(QuantPolicy::new(spec, QuantScope::AllLinear, role)));
        let got = ckpt.root().weight("lm_head.weight", [rows, H]).unwrap();
        let want = plain
            .root()
            .weight("lm_head.weight", [rows, H])
            .unwrap()
            .quantized(spec)
            .unwrap();
        assert_same_quant(quant_of(got.data()), quant_of(want.data()));
        let got = ckpt.root().batched_in_out(EXPERTS_GU, [e, H, 96]).unwrap();
        let want = plain
            .root()
            .batched_in_out(EXPERTS_GU, [e, H, 96])
            .unwrap()
            .quantized(spec)
            .unwrap();
        assert_same_quant(quant_of(got.data()), quant_of(want.data()));
        assert_eq!((got.batch(), got.in_features(), got.out_features()), (e, H, 96));
    }
}
