//! Byte buffers that outlive the request that filled them: aligned for O_DIRECT, and shared
//! by the local write and the replicas' frames of one replicated write, so that every copy
//! is written from the same bytes even if the guest changes its buffer meanwhile.

use std::sync::Arc;

/// A zeroed buffer of `len` bytes whose start is aligned to [`AlignedBuf::ALIGN`]. Its bytes
/// do not move when the value moves (they live in a heap block it owns).
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn zeroed(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + Self::ALIGN];
        let start = buf.as_ptr().align_offset(Self::ALIGN);
        AlignedBuf { buf, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.as_ref().as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Read-only bytes shared by everything that sends or writes them.
#[derive(Clone)]
pub struct Payload(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl Payload {
    pub fn new<T: AsRef<[u8]> + Send + Sync + 'static>(bytes: T) -> Payload {
        Payload(Arc::new(bytes))
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_stable_when_moved_into_a_payload() {
        let mut b = AlignedBuf::zeroed(8192);
        assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0);
        b.as_mut_slice()[..4].copy_from_slice(b"abcd");
        let at = b.as_ptr();
        let p = Payload::new(b);
        assert_eq!(p.as_ptr(), at, "the bytes did not move");
        assert_eq!(&p[..4], b"abcd");
        assert_eq!(p.len(), 8192);
        assert_eq!(p, Payload::new(p.to_vec()));
    }
}
