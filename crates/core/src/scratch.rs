//! Reusing buffers across calls, so that a decode step allocates nothing.

use ndarray::{Array, Dimension, IntoDimension};

/// Makes `a` a standard-layout array of `shape`, reusing its allocation: once it has held as
/// many elements, this allocates nothing. The contents are unspecified (callers overwrite).
pub fn reshape_reusing<A: Clone + Default, D: Dimension>(
    a: &mut Array<A, D>,
    shape: impl IntoDimension<Dim = D>,
) {
    let shape = shape.into_dimension();
    if a.raw_dim() == shape && a.is_standard_layout() {
        return;
    }
    let (mut data, _) = std::mem::take(a).into_raw_vec_and_offset();
    data.clear();
    data.resize(shape.size(), A::default());
    *a = Array::from_shape_vec(shape, data).expect("the length is the shape's size");
}

/// The first `n` entries of `buf`, growing it if needed: contents are stale, for callers that
/// overwrite them.
pub fn prefix<T: Clone + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// `buf` as `n` copies of `x`, as `vec![x; n]` would be, reusing its allocation.
pub fn refill<T: Clone>(buf: &mut Vec<T>, n: usize, x: T) -> &mut [T] {
    buf.clear();
    buf.resize(n, x);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    #[test]
    fn reshapes_in_place_without_growing_again() {
        let mut a = Array3::<f32>::zeros((4, 2, 3));
        let ptr = a.as_ptr();
        reshape_reusing(&mut a, (2, 2, 2));
        assert_eq!(a.dim(), (2, 2, 2));
        assert_eq!(a.as_ptr(), ptr, "a smaller shape keeps the allocation");
        reshape_reusing(&mut a, (3, 2, 4));
        assert_eq!(a.dim(), (3, 2, 4));
        assert_eq!(a.as_ptr(), ptr);
        // A transposed view of the right shape is not standard layout: rebuilt.
        let mut t = Array2::<f32>::zeros((3, 2)).reversed_axes();
        reshape_reusing(&mut t, (2, 3));
        assert!(t.is_standard_layout());
    }

    #[test]
    fn prefix_keeps_stale_values_and_refill_overwrites_them() {
        let mut v = vec![1.0f32, 2.0, 3.0];
        assert_eq!(prefix(&mut v, 2), &[1.0, 2.0]);
        assert_eq!(prefix(&mut v, 4), &[1.0, 2.0, 3.0, 0.0]);
        assert_eq!(refill(&mut v, 2, 5.0), &[5.0, 5.0]);
        assert!(v.capacity() >= 4);
    }
}
