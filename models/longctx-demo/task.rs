//! The key-value retrieval task of the length-generalisation demo: its id scheme and its held-out
//! set, read from a model directory's `task.json`. `tools/train_longctx_demo.py` implements the
//! same rule in Python (`heldout_context`), so both languages draw the same samples; this file is
//! included by `examples/needle.rs` and by the tests of `llama4-model`.
//!
//! A prompt of `n` tokens (`n` even): `<bos>` at 0, one filler token at 1, then `n/2 − 2`
//! two-token slots (slot `s` at positions `2s`, `2s + 1`), then `<query> key` at `n − 2`, `n − 1`.
//! `pairs` slots hold a key and its value, the others two haystack tokens; the answer is the asked
//! key's value. The haystack is filler and, when `decoys` > 0, that many decoy values (values no
//! pair has): half of the haystack, so a diluted attention leans towards a wrong answer.
//!
//! Context `c` of length `n` is drawn by SplitMix64 seeded with `heldout_seed ^ (n << 32) ^ c`,
//! one output discarded, `below(m) = next() % m`: the pair slots (`1 + below(n/2 − 2)`, redrawn
//! when taken), the keys (`below(keys)`, redrawn when taken), the values (likewise), the decoys
//! (`below(values)`, redrawn when taken or a pair's value), then one haystack token per remaining
//! position in increasing order: `t = below(filler)` without decoys, else `t = below(2 · filler)`;
//! filler `t` if `t < filler`, else decoy `(t − filler) % decoys`. Sample `j` is context
//! `j / pairs` asked for its pair `j % pairs` (in draw order).

use std::path::Path;

use serde_json::Value;

/// SplitMix64 (Steele, Lea and Flood 2014): the held-out set's generator.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator in state `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..m` (`m > 0`; the modulo's bias is below `m / 2⁶⁴`).
    pub fn below(&mut self, m: u64) -> u64 {
        self.next_u64() % m
    }

    /// `count` distinct numbers of `offset..offset + m`, none in `taken`, in draw order
    /// (`count + taken.len() <= m`).
    fn distinct(&mut self, m: u64, count: usize, offset: u64, taken: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let x = offset + self.below(m);
            if !out.contains(&x) && !taken.contains(&x) {
                out.push(x);
            }
        }
        out
    }
}

/// The id scheme and held-out parameters of `task.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// `<bos>`.
    pub bos: u32,
    /// `<query>`: the next token is the asked key.
    pub query: u32,
    /// First filler id; filler ids are `filler_base .. filler_base + filler`.
    pub filler_base: u32,
    /// Number of filler ids.
    pub filler: u32,
    /// First key id.
    pub key_base: u32,
    /// Number of key ids.
    pub keys: u32,
    /// First value id.
    pub value_base: u32,
    /// Number of value ids.
    pub values: u32,
    /// Seed of the held-out set.
    pub heldout_seed: u64,
    /// Key-value pairs per held-out context.
    pub pairs: usize,
    /// Decoy values in the haystack (0: filler only).
    pub decoys: usize,
    /// Longest context of training.
    pub train_context: usize,
}

/// One held-out context: its first `n − 2` tokens and its pairs `(key id, value id)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// Everything before `<query> key`.
    pub tokens: Vec<u32>,
    /// The pairs, in draw order.
    pub pairs: Vec<(u32, u32)>,
}

impl Task {
    /// Reads `task.json` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("task.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let int = |field: &str| {
            v[field]
                .as_u64()
                .ok_or_else(|| format!("{}: `{field}` must be a non-negative integer", path.display()))
        };
        let id = |field: &str| {
            int(field).and_then(|x| u32::try_from(x).map_err(|_| format!("`{field}` {x} is not a token id")))
        };
        let task = Task {
            bos: id("bos")?,
            query: id("query")?,
            filler_base: id("filler_base")?,
            filler: id("filler")?,
            key_base: id("key_base")?,
            keys: id("keys")?,
            value_base: id("value_base")?,
            values: id("values")?,
            heldout_seed: int("heldout_seed")?,
            pairs: int("pairs")? as usize,
            decoys: int("decoys")? as usize,
            train_context: int("train_context")? as usize,
        };
        if task.pairs == 0
            || task.pairs > task.keys as usize
            || task.pairs + task.decoys > task.values as usize
        {
            return Err(format!(
                "{}: {} pairs and {} decoys need as many distinct keys ({}) and values ({})",
                path.display(),
                task.pairs,
                task.decoys,
                task.keys,
                task.values
            ));
        }
        if task.filler == 0 {
            return Err(format!("{}: no filler ids", path.display()));
        }
        Ok(task)
    }

    /// The shortest valid context (room for every pair) and whether `n` is one.
    pub fn check_length(&self, n: usize) -> Result<(), String> {
        if !n.is_multiple_of(2) || n < 2 * self.pairs + 4 {
            return Err(format!(
                "context {n}: must be even and at least {} tokens for {} pairs",
                2 * self.pairs + 4,
                self.pairs
            ));
        }
        Ok(())
    }

    /// Held-out context `c` of length `n`.
    pub fn context(&self, n: usize, c: u64) -> Result<Context, String> {
        self.check_length(n)?;
        let mut rng = SplitMix64::new(self.heldout_seed ^ ((n as u64) << 32) ^ c);
        rng.next_u64();
        let slots = rng.distinct((n / 2 - 2) as u64, self.pairs, 1, &[]);
        let keys = rng.distinct(u64::from(self.keys), self.pairs, 0, &[]);
        let values = rng.distinct(u64::from(self.values), self.pairs, 0, &[]);
        let decoys = rng.distinct(u64::from(self.values), self.decoys, 0, &values);
        let filler = u64::from(self.filler);
        let draws = if decoys.is_empty() { filler } else { 2 * filler };
        let haystack = |rng: &mut SplitMix64| match rng.below(draws) {
            t if t < filler => self.filler_base + t as u32,
            t => self.value_base + decoys[((t - filler) % decoys.len() as u64) as usize] as u32,
        };
        let mut tokens: Vec<Option<u32>> = vec![None; n - 2];
        tokens[0] = Some(self.bos);
        let mut pairs = Vec::with_capacity(self.pairs);
        for ((&s, &k), &v) in slots.iter().zip(&keys).zip(&values) {
            let (key, value) = (self.key_base + k as u32, self.value_base + v as u32);
            tokens[2 * s as usize] = Some(key);
            tokens[2 * s as usize + 1] = Some(value);
            pairs.push((key, value));
        }
        let tokens = tokens
            .into_iter()
            .map(|t| t.unwrap_or_else(|| haystack(&mut rng)))
            .collect();
        Ok(Context { tokens, pairs })
    }
}

impl Context {
    /// The two tokens that ask for pair `q`: `<query> key`, and the answer.
    pub fn query(&self, task: &Task, q: usize) -> ([u32; 2], u32) {
        let (key, value) = self.pairs[q];
        ([task.query, key], value)
    }
}
