//! The happy paths: one file, shards, every stored dtype, aligned and misaligned data.

use super::*;

#[test]
fn single_file_every_dtype_and_accessor() {
    let tensors = [
        tensor("model.embed_tokens.weight", DType::F32, &[5, 3], 1),
        tensor("model.layers.0.self_attn.q_proj.weight", DType::BF16, &[4, 6], 2),
        tensor("model.layers.0.input_layernorm.weight", DType::BF16, &[6], 3),
        tensor(
            "model.layers.0.feed_forward.experts.down_proj",
            DType::BF16,
            &[3, 4, 6],
            4,
        ),
        tensor(
            "model.layers.0.feed_forward.router.weight",
            DType::F16,
            &[3, 6],
            5,
        ),
        tensor("model.layers.0.extra.w_in_out", DType::F16, &[6, 2], 6),
        tensor("model.norm.weight", DType::F32, &[3], 7),
    ];
    let (dir, file) = single(&serialize(&tensors));

    // Through the directory and through the file itself.
    for location in [dir.path(), file.as_path()] {
        let ckpt = Checkpoint::open(location).unwrap();
        assert_eq!(ckpt.location(), location);
        assert_eq!(ckpt.tensor_names().count(), tensors.len());
        let model = ckpt.scope("model");
        let layer = model.scope("layers.0");
        assert!(layer.contains("input_layernorm.weight"));
        assert!(!layer.contains("post_attention_layernorm.weight"));

        let embed = model.weight("embed_tokens.weight", [5, 3]).unwrap();
        assert_eq!((embed.out_features(), embed.in_features()), (5, 3));
        assert_eq!((embed.dtype(), embed.layout()), (Some(DType::F32), Layout::OutIn));
        assert!(embed.data().is_mapped());
        assert_out_in(&embed, &tensors[0].values);

        let q = layer.scope("self_attn").weight("q_proj.weight", [4, 6]).unwrap();
        assert_eq!(q.dtype(), Some(DType::BF16));
        assert!(q.data().is_mapped());
        assert_out_in(&q, &tensors[1].values);

        let norm = layer.vector("input_layernorm.weight", 6).unwrap();
        assert_bits_eq(norm.as_slice().unwrap(), &tensors[2].values);

        // `[E, in, out]`: matrix e holds elements e·in·out.., row-major `[in, out]`.
        let experts = layer
            .batched_in_out("feed_forward.experts.down_proj", [3, 4, 6])
            .unwrap();
        assert_eq!(experts.batch(), 3);
        assert_eq!((experts.in_features(), experts.out_features()), (4, 6));
        assert_eq!(experts.layout(), Layout::InOut);
        for e in 0..3 {
            let w = experts.get(e);
            assert!(w.data().is_mapped(), "expert {e} was copied");
            let in_out = &tensors[3].values[e * 24..(e + 1) * 24];
            assert_out_in(&w, &transpose(in_out, 4, 6));
        }

        let router = layer.weight("feed_forward.router.weight", [3, 6]).unwrap();
        assert_eq!(router.dtype(), Some(DType::F16));
        assert!(router.data().is_mapped());
        assert_out_in(&router, &tensors[4].values);

        let w = layer.weight_in_out("extra.w_in_out", [6, 2]).unwrap();
        assert_eq!(
            (w.in_features(), w.out_features(), w.layout()),
            (6, 2, Layout::InOut)
        );
        assert_out_in(&w, &transpose(&tensors[5].values, 6, 2));

        let accepted = layer
            .weight_of("feed_forward.router.weight", [3, 6], &[DType::F16, DType::BF16])
            .unwrap();
        assert_eq!(accepted.dtype(), Some(DType::F16));

        let arr = model.array("norm.weight", &[3]).unwrap();
        assert_bits_eq(arr.as_slice().unwrap(), &tensors[6].values);
        assert_eq!(ckpt.shape("model.layers.0.extra.w_in_out").unwrap(), &[6, 2]);
    }
}

#[test]
fn sharded_checkpoint() {
    let dir = TempDir::new().unwrap();
    let first = [
        tensor("model.embed_tokens.weight", DType::BF16, &[7, 4], 11),
        tensor("model.layers.0.input_layernorm.weight", DType::F32, &[4], 12),
    ];
    let second = [
        tensor(
            "model.layers.0.feed_forward.experts.gate_up_proj",
            DType::BF16,
            &[2, 4, 6],
            13,
        ),
        tensor("model.layers.0.self_attn.o_proj.weight", DType::F16, &[4, 5], 14),
    ];
    // The second shard goes through `serialize_to_file`, the first through `serialize`.
    write(dir.path(), "model-00001-of-00002.safetensors", &serialize(&first));
    let second_views = second.iter().map(|t| {
        let view = TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes).unwrap();
        (t.name.clone(), view)
    });
    safetensors::serialize_to_file(
        second_views,
        None,
        &dir.path().join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let mut weight_map = serde_json::Map::new();
    for t in &first {
        weight_map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in &second {
        weight_map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": weight_map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.tensor_names().count(), 4);
    let model = ckpt.scope("model");
    let embed = model.weight("embed_tokens.weight", [7, 4]).unwrap();
    assert!(embed.data().is_mapped());
    assert_out_in(&embed, &first[0].values);
    let layer = model.scope("layers.0");
    let norm = layer.vector("input_layernorm.weight", 4).unwrap();
    assert_bits_eq(norm.as_slice().unwrap(), &first[1].values);
    let experts = layer
        .scope("feed_forward.experts")
        .batched_in_out("gate_up_proj", [2, 4, 6])
        .unwrap();
    for e in 0..2 {
        let w = experts.get(e);
        assert!(w.data().is_mapped());
        assert_out_in(&w, &transpose(&second[0].values[e * 24..(e + 1) * 24], 4, 6));
    }
    let o = layer.weight("self_attn.o_proj.weight", [4, 5]).unwrap();
    assert_eq!(o.dtype(), Some(DType::F16));
    assert_out_in(&o, &second[1].values);
}

#[test]
fn misaligned_data_is_copied_once_and_read_right() {
    // A BF16 tensor at an odd file offset: the data section itself starts odd.
    let (bytes, bf) = values(6, 21, DType::BF16);
    let header = format!("{{{}}}", entry("w", "BF16", "[2,3]", "[0,12]"));
    let (_dir, path) = single(&raw_file_at(&header, 1, &bytes));
    let ckpt = Checkpoint::open(&path).unwrap();
    let w = ckpt.root().weight("w", [2, 3]).unwrap();
    assert!(!w.data().is_mapped());
    assert_out_in(&w, &bf);

    // An F32 tensor 2 bytes into an 8-aligned data section, after a BF16 that stays mapped; an
    // F16 at an odd offset after a one-byte gap (the format allows gaps).
    let (b_bytes, b_vals) = values(1, 22, DType::BF16);
    let (f_bytes, f_vals) = values(6, 23, DType::F32);
    let (h_bytes, h_vals) = values(4, 24, DType::F16);
    let (g_bytes, g_vals) = values(4, 25, DType::F32);
    let mut data = b_bytes.clone();
    data.extend(&f_bytes); // 2..26
    data.push(0xAB); // 26: unused
    data.extend(&h_bytes); // 27..35
    data.extend(&g_bytes); // 35..51
    let header = format!(
        "{{{},{},{},{}}}",
        entry("b", "BF16", "[1]", "[0,2]"),
        entry("f", "F32", "[3,2]", "[2,26]"),
        entry("h", "F16", "[2,2]", "[27,35]"),
        entry("g", "F32", "[2,1,2]", "[35,51]")
    );
    let (dir, _) = single(&raw_file_at(&header, 0, &data));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let root = ckpt.root();
    let b = root.vector("b", 1).unwrap();
    assert_bits_eq(b.as_slice().unwrap(), &b_vals);
    assert!(ckpt.data("b", &[1]).unwrap().is_mapped());
    let f = root.weight("f", [3, 2]).unwrap();
    assert!(!f.data().is_mapped());
    assert_out_in(&f, &f_vals);
    let h = root.weight_in_out("h", [2, 2]).unwrap();
    assert!(!h.data().is_mapped());
    assert_out_in(&h, &transpose(&h_vals, 2, 2));
    // A misaligned batch is copied once; its matrices then share the copy.
    let g = root.batched_in_out("g", [2, 1, 2]).unwrap();
    assert!(!g.get(1).data().is_mapped());
    // `[in, out] = [1, 2]` transposed to `[out, in] = [2, 1]` keeps the element order.
    assert_out_in(&g.get(1), &g_vals[2..4]);

    // The same layout at an aligned start is zero-copy for every tensor that is aligned.
    let header = format!("{{{}}}", entry("w", "F32", "[3,2]", "[8,32]"));
    let mut data = vec![0u8; 8];
    data.extend(&f_bytes);
    let (dir, _) = single(&raw_file_at(&header, 0, &data));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let w = ckpt.root().weight("w", [3, 2]).unwrap();
    assert!(w.data().is_mapped());
    assert_out_in(&w, &f_vals);
}

#[test]
fn empty_tensors_and_metadata_are_accepted() {
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},{},{}}}"#,
        entry("empty", "F32", "[0,3]", "[4,4]"),
        entry("v", "F32", "[1]", "[0,4]")
    );
    let (dir, _) = single(&raw_file_at(&header, 0, &1.5f32.to_le_bytes()));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let root = ckpt.root();
    assert_eq!(root.weight("empty", [0, 3]).unwrap().data().len(), 0);
    assert_eq!(root.vector("v", 1).unwrap()[0], 1.5);
    assert_eq!(
        ckpt.metadata_of("v")
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
}

/// A checkpoint copied into huge pages hands out the same tensors, still borrowed rather than
/// owned. It is copied exactly when the kernel offers transparent huge pages (a file this small
/// fits in half of any memory), and never when it is quantised at load.
#[test]
fn a_copy_into_huge_pages_reads_the_same_tensors() {
    let tensors = [
        tensor("model.embed_tokens.weight", DType::F32, &[5, 3], 1),
        tensor("model.layers.0.self_attn.q_proj.weight", DType::BF16, &[4, 6], 2),
        tensor("model.norm.weight", DType::F16, &[3], 3),
    ];
    let (dir, _) = single(&serialize(&tensors));
    let offered = std::env::var("LLAMA4_WEIGHTS").is_err()
        && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"));

    let mut ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(!ckpt.in_huge_pages());
    assert_eq!(ckpt.copy_to_huge_pages(), offered);
    assert_eq!(ckpt.in_huge_pages(), offered);
    let model = ckpt.scope("model");
    let embed = model.weight("embed_tokens.weight", [5, 3]).unwrap();
    assert!(embed.data().is_mapped());
    assert_out_in(&embed, &tensors[0].values);
    let q = model.weight("layers.0.self_attn.q_proj.weight", [4, 6]).unwrap();
    assert!(q.data().is_mapped());
    assert_out_in(&q, &tensors[1].values);
    let norm = model.vector("norm.weight", 3).unwrap();
    assert_bits_eq(norm.as_slice().unwrap(), &tensors[2].values);
    // Releasing the pages of a copy would zero them: it is not done.
    ckpt.release_resident_pages();
    assert_out_in(&q, &tensors[1].values);
    // A second call keeps the copy (copying the copy would release its pages).
    assert_eq!(ckpt.copy_to_huge_pages(), offered);
    assert_out_in(&embed, &tensors[0].values);

    let spec = QuantSpec::new(QuantFormat::Q8, 32);
    let policy = QuantPolicy::new(spec, QuantScope::AllLinear, |_| TensorRole::Projection);
    let mut quantised = Checkpoint::open(dir.path())
        .unwrap()
        .with_quantization(Some(policy));
    assert!(!quantised.copy_to_huge_pages());
    assert!(!quantised.in_huge_pages());
}
