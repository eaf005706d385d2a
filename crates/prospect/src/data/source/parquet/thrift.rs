//! A walk over Thrift compact-protocol bytes (Parquet's footer and page headers) that builds nothing:
//! it checks that every list, map and string fits in the bytes that are left, and that nesting stays
//! shallow, *before* the parquet crate decodes the same bytes and sizes its allocations from them. It
//! also reports a struct's top-level integer fields, which is all the page-header check needs.
//!
//! Wire format (Thrift's compact protocol spec): a field header byte holds the field-id delta (high
//! nibble, 0 = a zigzag varint id follows) and the type (low nibble, 0 = end of struct); integers are
//! zigzag ULEB128 varints; binary is a varint length then bytes; a list header holds the size (high
//! nibble, 15 = a varint size follows) and the element type.

/// Deeper nesting than this is not a Parquet footer (the real one nests 5 levels).
const MAX_DEPTH: usize = 32;

/// Compact-protocol type codes.
const BOOL_TRUE: u8 = 1;
const BOOL_FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;
const UUID: u8 = 13;

pub(super) struct Skim<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

/// The integer fields (ids 1..=8) at the top level of a struct; nested structs are checked, not read.
pub(super) type TopInts = [Option<i64>; 9];

impl<'a> Skim<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Skim { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.pos).ok_or("Thrift data ends inside a value")?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<(), String> {
        if n > self.left() {
            return Err(format!("a Thrift value claims {n} bytes where {} are left", self.left()));
        }
        self.pos += n;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a Thrift varint is longer than 10 bytes".into())
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// A count (list size, map size, string length) that must fit in what is left, at least
    /// `min_each` bytes per item.
    fn count(&mut self, raw: u64, min_each: usize) -> Result<usize, String> {
        let n = usize::try_from(raw).unwrap_or(usize::MAX);
        if n.saturating_mul(min_each) > self.left() {
            return Err(format!("a Thrift list or string claims {raw} items where {} bytes are left", self.left()));
        }
        Ok(n)
    }

    /// One struct: fields until the stop byte. Returns its top-level integer fields with ids 1..=8.
    pub(super) fn structure(&mut self, depth: usize) -> Result<TopInts, String> {
        if depth > MAX_DEPTH {
            return Err(format!("Thrift structs nest deeper than {MAX_DEPTH}"));
        }
        let mut ints: TopInts = [None; 9];
        let mut id: i64 = 0;
        loop {
            let header = self.byte()?;
            let kind = header & 0x0f;
            if kind == 0 {
                return Ok(ints);
            }
            id = match header >> 4 {
                0 => self.zigzag()?,
                delta => id + i64::from(delta),
            };
            if matches!(kind, I16 | I32 | I64) {
                let v = self.zigzag()?;
                if let Some(slot) = usize::try_from(id).ok().and_then(|i| ints.get_mut(i)) {
                    *slot = Some(v);
                }
            } else {
                self.value(kind, depth)?;
            }
        }
    }

    fn value(&mut self, kind: u8, depth: usize) -> Result<(), String> {
        match kind {
            BOOL_TRUE | BOOL_FALSE => Ok(()),
            BYTE => self.take(1),
            I16 | I32 | I64 => self.zigzag().map(drop),
            DOUBLE => self.take(8),
            UUID => self.take(16),
            BINARY => {
                let raw = self.varint()?;
                let n = self.count(raw, 1)?;
                self.take(n)
            }
            LIST | SET => {
                let header = self.byte()?;
                let raw = match header >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                let n = self.count(raw, 1)?;
                // Booleans in a list take one byte each, unlike in a struct.
                let elem = match header & 0x0f {
                    BOOL_TRUE | BOOL_FALSE => BYTE,
                    e => e,
                };
                (0..n).try_for_each(|_| self.value(elem, depth + 1))
            }
            MAP => {
                let raw = self.varint()?;
                let n = self.count(raw, 2)?;
                if n == 0 {
                    return Ok(());
                }
                let types = self.byte()?;
                (0..n).try_for_each(|_| {
                    self.value(types >> 4, depth + 1)?;
                    self.value(types & 0x0f, depth + 1)
                })
            }
            STRUCT => self.structure(depth + 1).map(drop),
            other => Err(format!("unknown Thrift type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_top_level_ints_and_checks_sizes() {
        // Field 1: i32 zigzag(3) = 6; field 2 (delta 1): i32 zigzag(-1) = 1; field 3: binary "ab"; stop.
        let bytes = [0x15, 6, 0x15, 1, 0x18, 2, b'a', b'b', 0];
        let ints = Skim::new(&bytes).structure(0).unwrap();
        assert_eq!((ints[1], ints[2], ints[3]), (Some(3), Some(-1), None));
        // A string of 100 bytes with 2 left.
        let err = Skim::new(&[0x18, 100, b'a', b'b', 0]).structure(0).unwrap_err();
        assert_eq!(err, "a Thrift list or string claims 100 items where 3 bytes are left");
        // A list of 2^31 structs (size as a varint after a 0xF nibble) in a 7-byte buffer.
        let err = Skim::new(&[0x19, 0xfc, 0x80, 0x80, 0x80, 0x80, 0x08]).structure(0).unwrap_err();
        assert_eq!(err, "a Thrift list or string claims 2147483648 items where 0 bytes are left");
        // 40 nested structs.
        let mut deep = vec![0x1c; 40];
        deep.extend([0; 41]);
        assert_eq!(Skim::new(&deep).structure(0).unwrap_err(), "Thrift structs nest deeper than 32");
        assert_eq!(Skim::new(&[0x15]).structure(0).unwrap_err(), "Thrift data ends inside a value");
    }
}
