//! Nesting guard for field tables and arrays, run before amq-protocol parses them.
//!
//! amq-protocol's table parser recurses once per nested table/array, and one level costs
//! the sender only 6 bytes (`key-len 0, 'F', u32 len`) and the parser 2-10 KiB of stack
//! (measured, release/debug). About 1 000 levels (a 6 KiB frame) overflow a 2 MiB tokio
//! worker stack, which aborts the whole process: catch_unwind cannot help. This walker skips over the encoded values without
//! allocating, counts depth, and stops at [`MAX_FIELD_NESTING`]. It only reports depth:
//! anything else malformed is left for the real parser to reject, so both never disagree
//! about what is valid.

/// Deepest table/array nesting accepted: x-death headers need 4; one level costs amq-protocol ~10 KiB of stack unoptimised, ~2 KiB optimised.
pub const MAX_FIELD_NESTING: usize = 16;

/// The field table (with its 4-byte length) was nested deeper than [`MAX_FIELD_NESTING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooDeep;

/// Reads forward over a byte slice; `None` means "ran out", which ends the walk.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<usize> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn short_str(&mut self) -> Option<()> {
        let n = self.u8()? as usize;
        self.take(n).map(|_| ())
    }

    fn long_str(&mut self) -> Option<()> {
        let n = self.u32()?;
        self.take(n).map(|_| ())
    }

    /// Skip a length-prefixed table at `depth` (1 = top level).
    fn table(&mut self, depth: usize) -> Result<Option<()>, TooDeep> {
        if depth > MAX_FIELD_NESTING {
            return Err(TooDeep);
        }
        let Some(n) = self.u32() else { return Ok(None) };
        let Some(body) = self.take(n) else {
            return Ok(None);
        };
        let mut inner = Cursor { bytes: body };
        while !inner.bytes.is_empty() {
            if inner.short_str().is_none() {
                return Ok(None);
            }
            if inner.value(depth)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    fn array(&mut self, depth: usize) -> Result<Option<()>, TooDeep> {
        if depth > MAX_FIELD_NESTING {
            return Err(TooDeep);
        }
        let Some(n) = self.u32() else { return Ok(None) };
        let Some(body) = self.take(n) else {
            return Ok(None);
        };
        let mut inner = Cursor { bytes: body };
        while !inner.bytes.is_empty() {
            if inner.value(depth)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    /// Skip one typed value inside a container at `depth`; the type tags mirror amq-protocol's.
    fn value(&mut self, depth: usize) -> Result<Option<()>, TooDeep> {
        let Some(tag) = self.u8() else {
            return Ok(None);
        };
        let fixed = match tag {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' => return Ok(self.long_str()),
            b'F' => return self.table(depth + 1),
            b'A' => return self.array(depth + 1),
            _ => return Ok(None),
        };
        Ok(self.take(fixed).map(|_| ()))
    }
}

/// One field of a method's argument list, as far as the walker needs to skip it.
#[derive(Clone, Copy)]
enum Field {
    Octet,
    Short,
    ShortStr,
    LongStr,
    Table,
}

/// The argument lists of the methods that carry field tables (the only recursive part).
fn layout(class_id: u16, method_id: u16) -> &'static [Field] {
    use Field::*;
    match (class_id, method_id) {
        (10, 10) => &[Octet, Octet, Table, LongStr, LongStr], // connection.start
        (10, 11) => &[Table],                                 // connection.start-ok
        (40, 10) => &[Short, ShortStr, ShortStr, Octet, Table], // exchange.declare
        (40, 30) | (40, 40) => &[Short, ShortStr, ShortStr, ShortStr, Octet, Table], // exchange.bind/unbind
        (50, 10) => &[Short, ShortStr, Octet, Table],         // queue.declare
        (50, 20) => &[Short, ShortStr, ShortStr, ShortStr, Octet, Table], // queue.bind
        (50, 50) => &[Short, ShortStr, ShortStr, ShortStr, Table], // queue.unbind (no bits)
        (60, 20) => &[Short, ShortStr, ShortStr, Octet, Table], // basic.consume
        _ => &[],
    }
}

/// Check the tables in a method's arguments (the bytes after class and method id).
pub(super) fn check_method(class_id: u16, method_id: u16, args: &[u8]) -> Result<(), TooDeep> {
    let mut c = Cursor { bytes: args };
    for field in layout(class_id, method_id) {
        let ok = match field {
            Field::Octet => c.take(1).map(|_| ()),
            Field::Short => c.take(2).map(|_| ()),
            Field::ShortStr => c.short_str(),
            Field::LongStr => c.long_str(),
            Field::Table => c.table(1)?,
        };
        if ok.is_none() {
            return Ok(());
        }
    }
    Ok(())
}

/// Check the `headers` table of basic properties (property flags first).
pub(super) fn check_properties(props: &[u8]) -> Result<(), TooDeep> {
    let mut c = Cursor { bytes: props };
    let Some(f) = c.take(2) else { return Ok(()) };
    let flags = u16::from_be_bytes([f[0], f[1]]);
    // content-type and content-encoding come before headers.
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 && c.short_str().is_none() {
            return Ok(());
        }
    }
    if flags & (1 << 13) != 0 {
        c.table(1)?;
    }
    Ok(())
}

/// Check a bare sequence of table entries (AMQPLAIN's response: a table minus its length).
pub(super) fn check_table_entries(entries: &[u8]) -> Result<(), TooDeep> {
    let mut c = Cursor { bytes: entries };
    while !c.bytes.is_empty() {
        if c.short_str().is_none() || c.value(1)?.is_none() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `levels` tables nested inside each other, as the bytes of the outermost (with length).
    pub(crate) fn nested_tables(levels: usize) -> Vec<u8> {
        // Innermost first: an empty table.
        let mut v = 0u32.to_be_bytes().to_vec();
        for _ in 1..levels {
            let mut outer = Vec::with_capacity(v.len() + 6);
            outer.extend_from_slice(&((v.len() + 2) as u32).to_be_bytes());
            outer.push(0); // empty key
            outer.push(b'F');
            outer.extend_from_slice(&v);
            v = outer;
        }
        v
    }

    #[test]
    fn depth_limit_is_exact() {
        assert_eq!(check_table_entries(&nested_tables(MAX_FIELD_NESTING)[4..]), Ok(()));
        assert_eq!(check_table_entries(&nested_tables(MAX_FIELD_NESTING + 1)[4..]), Err(TooDeep));
        let mut props = vec![0x20, 0x00];
        props.extend(nested_tables(MAX_FIELD_NESTING));
        assert_eq!(check_properties(&props), Ok(()));
        let mut props = vec![0x20, 0x00];
        props.extend(nested_tables(MAX_FIELD_NESTING + 1));
        assert_eq!(check_properties(&props), Err(TooDeep));
    }

    #[test]
    fn arrays_count_too() {
        // 'A' arrays nested: [ [ [ ... ] ] ]
        let mut v = 0u32.to_be_bytes().to_vec();
        for _ in 0..MAX_FIELD_NESTING {
            let mut outer = ((v.len() + 1) as u32).to_be_bytes().to_vec();
            outer.push(b'A');
            outer.extend_from_slice(&v);
            v = outer;
        }
        // A table holding that array: depth = 1 + MAX_FIELD_NESTING.
        let mut entries = vec![1, b'k', b'A'];
        entries.extend(v);
        assert_eq!(check_table_entries(&entries), Err(TooDeep));
    }
}
