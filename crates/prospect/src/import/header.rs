//! The GGUF container (llama.cpp's `gguf.md`: magic, version, counts, metadata, tensor infos, aligned
//! data), read so that a hostile file cannot make the import panic or allocate more than the file holds.
//!
//! Every length, count and tensor extent is checked against the bytes left in the file, with checked
//! arithmetic, *before* anything is allocated; a tensor whose data would run past the end of the file,
//! whose element count overflows, or that has a zero dimension is an error naming the tensor. Metadata
//! keys and tensor names must be unique (a repeated key would otherwise silently win).
//!
//! Not responsible for: what the keys and tensors mean (that is `gguf.rs`), or dequantizing
//! (`dequant.rs`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use super::dequant::type_name;

/// At most this many array elements in all the metadata together. Real tokenizers hold a few hundred
/// thousand tokens and merges; each decoded element costs ~32 bytes, so this bounds the metadata's
/// memory at ~0.5 GiB whatever the file declares.
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 24;

/// Arrays of arrays deeper than this are refused (llama.cpp writes none).
const MAX_DEPTH: usize = 4;

/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// One tensor's entry in the header. Its data, `byte_len` bytes at `data_offset + offset`, is known to
/// lie inside the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Hugging Face order (rows first): GGUF's `ne` reversed.
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    /// Offset of the data from the start of the tensor data section.
    pub offset: u64,
    pub byte_len: usize,
}

/// What a GGUF file declares, checked for consistency with its size.
#[derive(Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section (aligned to `general.alignment`).
    pub data_offset: u64,
    pub file_size: u64,
}

impl GgufHeader {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A reader that knows its position and how many bytes are left.
struct Input<'r, R> {
    r: &'r mut R,
    pos: u64,
    size: u64,
    /// Version 1 stores lengths and dimensions as u32, later versions as u64.
    wide: bool,
    /// Array elements decoded so far (bounded by [`MAX_ARRAY_ELEMENTS`]).
    elements: u64,
}

impl<R: Read> Input<'_, R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.r.read_exact(&mut buf).map_err(|e| format!("{what} at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A length or count: u32 in version 1, u64 after.
    fn length(&mut self, what: &str) -> Result<u64, String> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let len = self.length(what)?;
        if len > self.remaining() {
            return Err(format!(
                "{what} at byte {at} declares {len} bytes, but only {} are left in the file",
                self.remaining()
            ));
        }
        let mut buf = vec![0u8; len as usize]; // len <= remaining file bytes
        self.r.read_exact(&mut buf).map_err(|e| format!("{what} at byte {at}: {e}"))?;
        self.pos += len;
        // llama.cpp writes no terminator, but some writers add NULs; the text is UTF-8 by the spec.
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value, String> {
        let what = &format!("value of `{key}`");
        Ok(match type_id {
            0 => Value::U8(self.bytes::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes::<1>(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes::<2>(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes::<2>(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes::<4>(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes::<4>(what)?)),
            7 => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what} is a bool stored as {b}; expected 0 or 1")),
            },
            8 => Value::String(self.string(what)?),
            9 => self.array(key, depth)?,
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes::<8>(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes::<8>(what)?)),
            other => return Err(format!("{what} has value type {other}; GGUF types are 0 to 12")),
        })
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Value, String> {
        if depth >= MAX_DEPTH {
            return Err(format!("`{key}` nests arrays more than {MAX_DEPTH} deep"));
        }
        let item_type = self.u32(&format!("array type of `{key}`"))?;
        let len = self.length(&format!("array length of `{key}`"))?;
        let min_size = min_value_size(item_type, self.wide);
        let needed = len.saturating_mul(min_size);
        if needed > self.remaining() {
            return Err(format!(
                "`{key}` declares {len} array elements (at least {needed} bytes), but only {} bytes are left in the file",
                self.remaining()
            ));
        }
        self.elements = self.elements.saturating_add(len);
        if self.elements > MAX_ARRAY_ELEMENTS {
            return Err(format!(
                "the metadata holds more than {MAX_ARRAY_ELEMENTS} array elements (at `{key}`); no real model needs as many"
            ));
        }
        let mut items = Vec::with_capacity(len as usize); // len * min_size <= remaining bytes
        for _ in 0..len {
            items.push(self.value(item_type, key, depth + 1)?);
        }
        Ok(Value::Array(items))
    }
}

/// The fewest bytes one value of a GGUF type takes in the file (an unknown type fails when read).
fn min_value_size(type_id: u32, wide: bool) -> u64 {
    let length = if wide { 8 } else { 4 };
    match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => length,
        9 => 4 + length,
        _ => 1,
    }
}

/// ggml's type ids (`enum ggml_type`) for the types candle can dequantize.
fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Read and check the header of a GGUF file. The reader must be at the start of the file.
pub fn read_header<R: Read + Seek>(reader: &mut R) -> Result<GgufHeader, String> {
    let size = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut input = Input { r: reader, pos: 0, size, wide: true, elements: 0 };
    let magic = input.bytes::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(format!("the file starts with {magic:02x?}, not the magic `GGUF`"));
    }
    let version = input.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version}; versions 1 to 3 are known"));
    }
    input.wide = version > 1;
    let tensor_count = input.length("tensor count")?;
    let kv_count = input.length("metadata count")?;
    // The smallest metadata entry is a length, a type and one byte; the smallest tensor info a
    // length, a dimension count, one dimension, a type and an offset.
    let length = if input.wide { 8u64 } else { 4 };
    let needed = kv_count
        .checked_mul(length + 5)
        .and_then(|kv| tensor_count.checked_mul(2 * length + 16).and_then(|t| t.checked_add(kv)))
        .unwrap_or(u64::MAX);
    if needed > input.remaining() {
        return Err(format!(
            "the header declares {tensor_count} tensors and {kv_count} metadata entries, which need at least \
             {needed} bytes, but the file has {size}"
        ));
    }
    let metadata = read_metadata(&mut input, kv_count)?;
    let infos = read_tensor_infos(&mut input, tensor_count)?;
    let alignment = alignment(&metadata)?;
    let data_offset = input.pos.div_ceil(alignment).checked_mul(alignment).ok_or("the data offset overflows")?;
    let tensors = infos.into_iter().map(|raw| raw.check(data_offset, size)).collect::<Result<_, _>>()?;
    Ok(GgufHeader { version, metadata, tensors, data_offset, file_size: size })
}

fn read_metadata<R: Read>(input: &mut Input<R>, count: u64) -> Result<HashMap<String, Value>, String> {
    let mut metadata = HashMap::new();
    for i in 0..count {
        let key = input.string(&format!("metadata key #{i}"))?;
        let type_id = input.u32(&format!("value type of `{key}`"))?;
        let value = input.value(type_id, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    Ok(metadata)
}

/// `general.alignment`: a u32 power of two (the spec's rule); 32 when absent.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, String> {
    match metadata.get("general.alignment") {
        None => Ok(32),
        Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some(other) => Err(format!("`general.alignment` must be a u32 power of two, got {other:?}")),
    }
}

/// A tensor info as stored, before its extent is checked.
struct RawTensorInfo {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

fn read_tensor_infos<R: Read>(input: &mut Input<R>, count: u64) -> Result<Vec<RawTensorInfo>, String> {
    let mut infos: Vec<RawTensorInfo> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for i in 0..count {
        let name = input.string(&format!("name of tensor #{i}"))?;
        let n_dims = input.u32(&format!("dimension count of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions; expected 1 to {MAX_DIMS}"));
        }
        let ne =
            (0..n_dims).map(|_| input.length(&format!("dimensions of tensor `{name}`"))).collect::<Result<_, _>>()?;
        let type_id = input.u32(&format!("type of tensor `{name}`"))?;
        let offset = input.u64(&format!("offset of tensor `{name}`"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        infos.push(RawTensorInfo { name, ne, type_id, offset });
    }
    Ok(infos)
}

impl RawTensorInfo {
    /// Check the type, the shape and that the data lies inside the file.
    fn check(self, data_offset: u64, file_size: u64) -> Result<TensorInfo, String> {
        let name = &self.name;
        let dims: Vec<usize> = self.ne.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
        let dtype = ggml_type(self.type_id).ok_or_else(|| {
            format!("tensor `{name}` has ggml type {}, which candle cannot dequantize (IQ* and integer types are not supported)", self.type_id)
        })?;
        let what = format!("tensor `{name}` ({}, shape {dims:?})", type_name(dtype));
        if dims.contains(&0) {
            return Err(format!("{what} has a zero dimension: an empty tensor cannot be a model weight"));
        }
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let Some(elems) = elems else {
            return Err(format!("{what}: the element count overflows"));
        };
        let block = dtype.block_size();
        // Rows are whole ggml blocks: `ne[0]` (the last dimension here) is a multiple of the block size.
        if !self.ne[0].is_multiple_of(block as u64) {
            return Err(format!("{what}: rows of {} values do not split into blocks of {block}", self.ne[0]));
        }
        let byte_len = (elems / block).checked_mul(dtype.type_size());
        let start = data_offset.checked_add(self.offset);
        let end = byte_len.zip(start).and_then(|(len, start)| start.checked_add(len as u64));
        match (byte_len, end) {
            (Some(byte_len), Some(end)) if end <= file_size => {
                Ok(TensorInfo { name: self.name, dims, dtype, offset: self.offset, byte_len })
            }
            _ => Err(format!(
                "{what}: cannot read {} bytes at offset {}: the file has only {file_size} bytes (truncated, or a wrong shape)",
                byte_len.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                start.map_or_else(|| "past 2^64".to_string(), |s| s.to_string()),
            )),
        }
    }
}
