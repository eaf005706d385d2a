//! The mutation engine: a seeded PRNG and byte-level mutations that are cheap and reach the places
//! readers of binary and text formats go wrong: bit flips, bytes and integers set to boundary values,
//! integers planted over what looks like a length or count field, decimal numbers in text replaced
//! by huge or negative ones, truncation, deletion, duplication, dictionary tokens, and splices of two
//! seeds. Offsets are drawn with a bias towards the start of the input, where headers live.
//!
//! Not responsible for: choosing seeds or running readers (`targets.rs`, `worker.rs`).

/// xorshift64* (Vigna): fast, seedable, good enough to drive mutations; not for anything else.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams (and 0 is no fixed point).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    /// An offset in `0..len` (`len > 0`), log-uniform in scale: as often in the first 64 bytes as in
    /// the next 4 KiB, so headers are hit as often as bodies.
    pub fn offset(&mut self, len: usize) -> usize {
        let bits = usize::BITS - len.leading_zeros();
        let scale = 1usize << self.below(bits as usize + 1).min(usize::BITS as usize - 1);
        self.below(scale.min(len))
    }
}

/// Integers at the edges of signed and unsigned widths, and sizes that overflow when multiplied.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    64,
    127,
    128,
    255,
    256,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    1 << 20,
    1 << 24,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 53,
    1 << 62,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Decimal replacements for numbers in text formats.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2147483648",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "1e309",
    "-0.0",
    "0.5",
    "1099511627776",
    "99999999999999999999999999",
];

/// Tokens that text readers give meaning to (JSON syntax, field names of the data layouts, Hugging
/// Face config and tokenizer keys, safetensors header keys, GGUF keys, Jinja syntax).
const DICTIONARY: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\\",
    "null",
    "true",
    "false",
    "NaN",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{\"a\":{\"a\":{\"a\":{\"a\":",
    "\n",
    "\r\n",
    "\u{feff}",
    "\"label\"",
    "\"prompt\"",
    "\"completion\"",
    "\"chosen\"",
    "\"rejected\"",
    "\"messages\"",
    "\"conversations\"",
    "\"role\"",
    "\"content\"",
    "\"from\"",
    "\"value\"",
    "\"text\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"F32\"",
    "\"BF16\"",
    "\"F16\"",
    "\"I64\"",
    "\"__metadata__\"",
    "\"vocab_size\"",
    "\"hidden_size\"",
    "\"num_attention_heads\"",
    "\"num_key_value_heads\"",
    "\"head_dim\"",
    "\"model_type\"",
    "\"type\"",
    "\"BPE\"",
    "\"vocab\"",
    "\"merges\"",
    "\"added_tokens\"",
    "\"pre_tokenizer\"",
    "\"Split\"",
    "\"Regex\"",
    "\"pattern\"",
    "\"normalizer\"",
    "\"chat_template\"",
    "\"eos_token\"",
    "\"pad_token\"",
    "{{",
    "}}",
    "{%",
    "%}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{{ raise_exception('x') }}",
    "general.alignment",
    "general.architecture",
    "llama.embedding_length",
    "llama.block_count",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.chat_template",
    "PAR1",
    "GGUF",
];

/// Apply 1 to 4 random mutations to `data` in place; `others` are seeds to splice with. The result is
/// at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, others: &[&[u8]], max_len: usize) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(12) {
            0 | 1 => flip_bit(rng, data),
            2 => set_byte(rng, data),
            3 | 4 => plant_integer(rng, data),
            5 => replace_number(rng, data),
            6 => truncate(rng, data),
            7 => delete_range(rng, data),
            8 => duplicate_range(rng, data),
            9 | 10 => insert_token(rng, data),
            _ => splice(rng, data, others),
        }
    }
    data.truncate(max_len);
}

fn flip_bit(rng: &mut Rng, data: &mut [u8]) {
    if !data.is_empty() {
        let at = rng.offset(data.len());
        data[at] ^= 1 << rng.below(8);
    }
}

fn set_byte(rng: &mut Rng, data: &mut [u8]) {
    if !data.is_empty() {
        let at = rng.offset(data.len());
        data[at] = [0u8, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'[', b'\\', b'0'][rng.below(10)];
    }
}

/// Overwrite a 1/2/4/8-byte little-endian integer with an interesting value. Half the time the spot is
/// one that already holds a small non-zero integer no larger than the input (a length, count, dimension
/// or offset, in a binary header), found by scanning forward from a random offset.
fn plant_integer(rng: &mut Rng, data: &mut [u8]) {
    if data.is_empty() {
        return;
    }
    let width = [1usize, 2, 4, 8, 8][rng.below(5)].min(data.len());
    let mut at = rng.offset(data.len() - width + 1);
    if rng.chance(2) {
        if let Some(field) = find_length_field(data, at, width) {
            at = field;
        }
    }
    let value = INTERESTING[rng.below(INTERESTING.len())];
    let value = if rng.chance(4) { value.wrapping_add(data.len() as u64) } else { value };
    data[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
}

fn find_length_field(data: &[u8], start: usize, width: usize) -> Option<usize> {
    let end = data.len().saturating_sub(width);
    (start..end.min(start + 512)).find(|&i| {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(&data[i..i + width]);
        let v = u64::from_le_bytes(buf);
        v > 0 && v <= data.len() as u64
    })
}

/// Replace a run of ASCII digits (a number in a text format) by a boundary decimal.
fn replace_number(rng: &mut Rng, data: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    let from = rng.offset(data.len());
    let Some(start) = data[from..].iter().position(u8::is_ascii_digit).map(|p| from + p) else { return };
    let end = data[start..].iter().position(|b| !b.is_ascii_digit()).map_or(data.len(), |p| start + p);
    let number = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
    data.splice(start..end, number.iter().copied());
}

fn truncate(rng: &mut Rng, data: &mut Vec<u8>) {
    if !data.is_empty() {
        let keep = rng.below(data.len());
        data.truncate(keep);
    }
}

fn delete_range(rng: &mut Rng, data: &mut Vec<u8>) {
    if !data.is_empty() {
        let start = rng.offset(data.len());
        let len = 1 + rng.below((data.len() - start).min(64));
        data.drain(start..start + len);
    }
}

fn duplicate_range(rng: &mut Rng, data: &mut Vec<u8>) {
    if !data.is_empty() {
        let start = rng.offset(data.len());
        let len = 1 + rng.below((data.len() - start).min(256));
        let chunk: Vec<u8> = data[start..start + len].to_vec();
        let times = if rng.chance(8) { 64 } else { 1 };
        let at = rng.offset(data.len() + 1);
        let repeated: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
        data.splice(at..at, repeated);
    }
}

fn insert_token(rng: &mut Rng, data: &mut Vec<u8>) {
    let token = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
    let at = if data.is_empty() { 0 } else { rng.offset(data.len() + 1) };
    if rng.chance(2) && at + token.len() <= data.len() {
        data[at..at + token.len()].copy_from_slice(token);
    } else {
        data.splice(at..at, token.iter().copied());
    }
}

/// The head of `data` followed by the tail of another seed.
fn splice(rng: &mut Rng, data: &mut Vec<u8>, others: &[&[u8]]) {
    if others.is_empty() || data.is_empty() {
        return;
    }
    let other = others[rng.below(others.len())];
    if other.is_empty() {
        return;
    }
    let cut = rng.below(data.len());
    let from = rng.below(other.len());
    data.truncate(cut);
    data.extend_from_slice(&other[from..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_offsets_stay_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..4).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next(), xs[0]);
        let mut rng = Rng::new(1);
        let offsets: Vec<usize> = (0..10_000).map(|_| rng.offset(100_000)).collect();
        assert!(offsets.iter().all(|&o| o < 100_000));
        // Log-uniform scale over 18 powers of two: the 7 scales <= 64 always land in the first 64 bytes and
        // the 10 above sum to ~1 more, so ~8/18 = 44% of offsets hit the head of a 100 kB input.
        let head = offsets.iter().filter(|&&o| o < 64).count();
        assert!((4_000..4_900).contains(&head), "{head}");
    }

    #[test]
    fn mutations_respect_the_size_cap_and_change_the_input() {
        let mut rng = Rng::new(3);
        let seed: Vec<u8> = b"{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true, \"n\": 12}".to_vec();
        let mut changed = 0;
        for _ in 0..1_000 {
            let mut data = seed.clone();
            mutate(&mut rng, &mut data, &[&seed], 80);
            assert!(data.len() <= 80);
            changed += usize::from(data != seed);
        }
        assert!(changed > 950, "{changed} of 1000 mutated");
    }

    #[test]
    fn length_fields_are_found_in_a_binary_header() {
        // A GGUF-like header: magic, version 3, tensor count 2 (u64), kv count 5 (u64).
        let mut data = b"GGUF".to_vec();
        data.extend(3u32.to_le_bytes());
        data.extend(2u64.to_le_bytes());
        data.extend(5u64.to_le_bytes());
        assert_eq!(find_length_field(&data, 0, 4), Some(4)); // the version, 3 <= 24 bytes
        assert_eq!(find_length_field(&data, 5, 8), Some(8)); // the tensor count
    }
}
