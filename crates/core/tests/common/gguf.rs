//! Writing small GGUF files, field by field (so tests can also write wrong ones).

/// Value type ids of the format.
pub const U8: u32 = 0;
pub const I8: u32 = 1;
pub const U16: u32 = 2;
pub const I16: u32 = 3;
pub const U32: u32 = 4;
pub const I32: u32 = 5;
pub const F32: u32 = 6;
pub const BOOL: u32 = 7;
pub const STRING: u32 = 8;
pub const ARRAY: u32 = 9;
pub const U64: u32 = 10;
pub const I64: u32 = 11;
pub const F64: u32 = 12;

/// A GGUF string: u64 length, bytes.
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// An array value body: element type, count, the elements' bytes.
pub fn array(elem: u32, n: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = elem.to_le_bytes().to_vec();
    v.extend(n.to_le_bytes());
    v.extend_from_slice(elems);
    v
}

/// A tensor to write.
pub struct Tensor {
    pub name: Vec<u8>,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Written instead of the computed offset when set.
    pub offset: Option<u64>,
}

pub fn tensor(name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Tensor {
    Tensor {
        name: name.as_bytes().to_vec(),
        ne: ne.to_vec(),
        ty,
        data,
        offset: None,
    }
}

/// A file under construction.
pub struct Gguf {
    pub version: u32,
    pub kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    pub tensors: Vec<Tensor>,
    /// Alignment used to place the data (the `general.alignment` entry is up to the caller).
    pub alignment: u64,
}

impl Gguf {
    pub fn new(version: u32) -> Self {
        Gguf {
            version,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    pub fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        self.kvs.push((key.as_bytes().to_vec(), ty, value));
        self
    }

    pub fn tensor(mut self, t: Tensor) -> Self {
        self.tensors.push(t);
        self
    }

    /// The file's bytes; tensors are placed one after another at aligned offsets.
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kvs {
            out.extend(string(k));
            out.extend(t.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            out.extend(string(&t.name));
            out.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        if !self.tensors.is_empty() {
            out.resize((out.len() as u64).next_multiple_of(self.alignment) as usize, 0);
        }
        let start = out.len();
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            out.resize(start + o as usize, 0);
            out.extend(&t.data);
        }
        out
    }
}
