//! A prefill of T tokens equals T one-token steps through a simple cache.

mod common;

use common::{attn_config, fixture, read_json, rel_err};
use half::bf16;
use irope_attn::{Attention, PosEncoding, SelfAttention};
use llama4_core::{Checkpoint, KvData, KvView};
use ndarray::{s, Array2, Ix2};

/// Keys and values of one layer, `[Hkv, capacity, D]`; a chunked layer may restart it at each
/// chunk boundary, as the kv-cache crate does.
struct TestCache<E> {
    k: Vec<E>,
    v: Vec<E>,
    heads: usize,
    dim: usize,
    cap: usize,
    len: usize,
    first_pos: usize,
}

impl<E: Copy + Default> TestCache<E> {
    fn new(heads: usize, dim: usize, cap: usize) -> Self {
        TestCache {
            k: vec![E::default(); heads * cap * dim],
            v: vec![E::default(); heads * cap * dim],
            heads,
            dim,
            cap,
            len: 0,
            first_pos: 0,
        }
    }

    fn push(&mut self, pos: usize, k: &[f32], v: &[f32], restart_every: Option<usize>, conv: fn(f32) -> E) {
        if let Some(c) = restart_every {
            if pos.is_multiple_of(c) {
                self.len = 0;
                self.first_pos = pos;
            }
        }
        assert_eq!(self.first_pos + self.len, pos, "tokens must arrive in order");
        assert!(self.len < self.cap);
        for h in 0..self.heads {
            for i in 0..self.dim {
                let at = (h * self.cap + self.len) * self.dim + i;
                self.k[at] = conv(k[h * self.dim + i]);
                self.v[at] = conv(v[h * self.dim + i]);
            }
        }
        self.len += 1;
    }
}

fn views<'a>(c: &TestCache<impl Copy>, data: (KvData<'a>, KvData<'a>)) -> (KvView<'a>, KvView<'a>) {
    let k = KvView::contiguous(data.0, c.heads, c.len, c.dim, c.cap * c.dim, c.first_pos);
    (
        k,
        KvView::contiguous(data.1, c.heads, c.len, c.dim, c.cap * c.dim, c.first_pos),
    )
}

fn load(name: &str) -> (Attention, Array2<f32>) {
    let (cfg, kind) = attn_config(&read_json(&format!("{name}.json")));
    let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
    let attn = Attention::load(&ckpt.scope("self_attn"), &cfg, kind).unwrap();
    let t = ckpt.shape("hidden").unwrap()[0];
    let x = ckpt.root().array("hidden", &[t, cfg.hidden_size]).unwrap();
    (attn, x.into_dimensionality::<Ix2>().unwrap())
}

/// Runs `x` one token at a time through an f32 cache, restarted at chunk boundaries when
/// `restart` is true.
fn steps_f32(attn: &Attention, x: &Array2<f32>, restart: bool) -> Array2<f32> {
    let c = attn.config();
    let t = x.nrows();
    let restart_every = attn.cache_kind().chunk().filter(|_| restart);
    let mut cache = TestCache::<f32>::new(c.num_key_value_heads, c.head_dim, t);
    let mut out = Array2::zeros((t, c.hidden_size));
    for p in 0..t {
        let pr = attn.project(x.slice(s![p..p + 1, ..]), &[p]).unwrap();
        cache.push(
            p,
            pr.k.as_slice().unwrap(),
            pr.v.as_slice().unwrap(),
            restart_every,
            |x| x,
        );
        let (k, v) = views(&cache, (KvData::F32(&cache.k), KvData::F32(&cache.v)));
        let o = attn.attend(pr.q.view(), &[p], &k, &v).unwrap();
        out.row_mut(p).assign(&o.row(0));
    }
    out
}

fn check(name: &str, kind: PosEncoding) {
    let (attn, x) = load(name);
    assert_eq!(attn.encoding(), kind);
    let prefill = attn.forward_uncached(x.view(), 0).unwrap();
    for restart in [true, false] {
        let steps = steps_f32(&attn, &x, restart);
        let err = rel_err(steps.as_slice().unwrap(), prefill.as_slice().unwrap());
        println!("{name} (cache restarted at chunks: {restart}): steps vs prefill {err:.2e}");
        assert!(err < 1e-5, "{name}: {err:e}");
    }
}

#[test]
fn rope_prefill_equals_steps() {
    check("attn_rope", PosEncoding::Rope);
}

#[test]
fn nope_prefill_equals_steps() {
    check("attn_nope", PosEncoding::NoPe);
}

#[test]
fn prefill_in_two_calls_equals_one() {
    // 13 tokens, then 27 more through a cache: the split falls inside a chunk.
    let (attn, x) = load("attn_rope");
    let c = attn.config().clone();
    let t = x.nrows();
    let mut cache = TestCache::<f32>::new(c.num_key_value_heads, c.head_dim, t);
    let mut out = Array2::zeros((t, c.hidden_size));
    for (s0, s1) in [(0, 13), (13, t)] {
        let positions: Vec<usize> = (s0..s1).collect();
        let pr = attn.project(x.slice(s![s0..s1, ..]), &positions).unwrap();
        for (i, &p) in positions.iter().enumerate() {
            let k: Vec<f32> = pr.k.slice(s![i, .., ..]).iter().copied().collect();
            let v: Vec<f32> = pr.v.slice(s![i, .., ..]).iter().copied().collect();
            cache.push(p, &k, &v, None, |x| x);
        }
        let (k, v) = views(&cache, (KvData::F32(&cache.k), KvData::F32(&cache.v)));
        let o = attn.attend(pr.q.view(), &positions, &k, &v).unwrap();
        out.slice_mut(s![s0..s1, ..]).assign(&o);
    }
    let prefill = attn.forward_uncached(x.view(), 0).unwrap();
    let err = rel_err(out.as_slice().unwrap(), prefill.as_slice().unwrap());
    assert!(err < 1e-5, "{err:e}");
}

#[test]
fn bf16_cache_steps_stay_close() {
    // bf16 storage rounds K and V (8 mantissa bits): the output moves by about 2^-8 at most.
    let (attn, x) = load("attn_nope");
    let c = attn.config().clone();
    let t = x.nrows();
    let mut cache = TestCache::<bf16>::new(c.num_key_value_heads, c.head_dim, t);
    let mut out = Array2::zeros((t, c.hidden_size));
    for p in 0..t {
        let pr = attn.project(x.slice(s![p..p + 1, ..]), &[p]).unwrap();
        cache.push(
            p,
            pr.k.as_slice().unwrap(),
            pr.v.as_slice().unwrap(),
            None,
            bf16::from_f32,
        );
        let (k, v) = views(&cache, (KvData::BF16(&cache.k), KvData::BF16(&cache.v)));
        out.row_mut(p)
            .assign(&attn.attend(pr.q.view(), &[p], &k, &v).unwrap().row(0));
    }
    let prefill = attn.forward_uncached(x.view(), 0).unwrap();
    let err = rel_err(out.as_slice().unwrap(), prefill.as_slice().unwrap());
    println!("bf16 cache vs f32 prefill: {err:.2e}");
    assert!(err > 0.0 && err < 2e-2, "{err:e}");
}
