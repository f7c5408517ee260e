//! A cookie-factory sink that appends straight to a `BytesMut`.
//!
//! amq-protocol's generators need `Write + BackToTheBuffer` (length prefixes are written
//! after their contents). cookie-factory's own `Vec<u8>` impl allocates a temporary `Vec`
//! for every length prefix (every field table); this one reserves the 4 bytes in place and
//! patches them, like lapin's ring buffer does.

use std::io;

use amq_protocol::frame::{BackToTheBuffer, GenError, GenResult, WriteContext};
use bytes::{BufMut, BytesMut};

/// Appends to `buf`, or, while a reserved prefix is being filled in, overwrites `buf[pos..end]`.
pub(super) struct BufWriter<'a> {
    buf: &'a mut BytesMut,
    /// `Some((pos, end))` while `before` writes into the reserved hole.
    patch: Option<(usize, usize)>,
}

impl io::Write for BufWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.patch.as_mut() {
            None => {
                self.buf.extend_from_slice(data);
                Ok(data.len())
            }
            Some((pos, end)) => {
                // Writing past the hole would overwrite what the generator already wrote.
                let n = data.len().min(*end - *pos);
                self.buf[*pos..*pos + n].copy_from_slice(&data[..n]);
                *pos += n;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BackToTheBuffer for BufWriter<'_> {
    fn reserve_write_use<
        Tmp,
        Gen: Fn(WriteContext<Self>) -> Result<(WriteContext<Self>, Tmp), GenError>,
        Before: Fn(WriteContext<Self>, Tmp) -> GenResult<Self>,
    >(
        s: WriteContext<Self>,
        reserved: usize,
        gen: &Gen,
        before: &Before,
    ) -> Result<WriteContext<Self>, GenError> {
        let WriteContext { write: w, position } = s;
        if w.patch.is_some() {
            // A length prefix is a plain integer: no generator nests a reservation inside one.
            return Err(GenError::NotYetImplemented);
        }
        let start = w.buf.len();
        w.buf.put_bytes(0, reserved);
        let (after, tmp) = gen(WriteContext { write: w, position: position + reserved as u64 })?;
        let WriteContext { write: mut w, position: end_position } = after;
        w.patch = Some((start, start + reserved));
        let filled = before(WriteContext { write: w, position }, tmp)?;
        let mut w = filled.write;
        let (pos, end) = w.patch.take().unwrap_or((0, 0));
        if pos != end {
            return Err(GenError::BufferTooBig(end - pos));
        }
        Ok(WriteContext { write: w, position: end_position })
    }
}

/// Run `gen` (an amq-protocol generator) appending to `out`; on error `out` is restored.
///
/// A macro because the generators are `impl SerializeFn<W>` for one concrete `W`, which a
/// higher-ranked closure bound cannot express.
macro_rules! gen_into {
    ($out:expr, $gen:expr) => {{
        let out: &mut ::bytes::BytesMut = $out;
        let start = out.len();
        let res = ($gen)($crate::codec::writer::BufWriter::context(out)).map(|_| ());
        if res.is_err() {
            out.truncate(start);
        }
        res
    }};
}
pub(super) use gen_into;

impl<'a> BufWriter<'a> {
    /// A write context appending to `buf`.
    pub(super) fn context(buf: &'a mut BytesMut) -> WriteContext<Self> {
        WriteContext::from(BufWriter { buf, patch: None })
    }
}
