//! Malformed GGUF files, written byte by byte (gguf.md layout: magic, version, tensor count, metadata
//! count, key/type/value entries, tensor infos, data aligned to 32), through `import_gguf`. Each must be
//! an error that names the file and the key or tensor at fault: never a panic, an abort, a huge
//! allocation, or a folder that cannot be loaded. `tests/fixtures/bad/gguf/` holds inputs the fuzz
//! harness (`scripts/fuzz.sh`) found; each must fail the same way.

use std::path::{Path, PathBuf};

use prospect::import::{convert_gguf, import_gguf, ImportDtype};

/// A GGUF file under construction (version 3: u64 lengths).
#[derive(Clone, Default)]
struct Gguf {
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    /// Replaces the computed tensor count when set.
    tensor_count: Option<u64>,
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

impl Gguf {
    fn kv(mut self, key: &str, type_id: u32, value: Vec<u8>) -> Self {
        self.kvs.retain(|(k, _, _)| k != key);
        self.kvs.push((key.to_string(), type_id, value));
        self
    }
    fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(self, key: &str, v: f32) -> Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn str(self, key: &str, v: &str) -> Self {
        self.kv(key, 8, string(v))
    }
    fn strs(self, key: &str, vs: &[&str]) -> Self {
        let mut value = 8u32.to_le_bytes().to_vec();
        value.extend((vs.len() as u64).to_le_bytes());
        vs.iter().for_each(|s| value.extend(string(s)));
        self.kv(key, 9, value)
    }
    fn i32s(self, key: &str, vs: &[i32]) -> Self {
        let mut value = 5u32.to_le_bytes().to_vec();
        value.extend((vs.len() as u64).to_le_bytes());
        vs.iter().for_each(|v| value.extend(v.to_le_bytes()));
        self.kv(key, 9, value)
    }
    /// An f32 tensor; `ne` is GGUF order (columns first). Data: 0.01 * index.
    fn f32_tensor(mut self, name: &str, ne: &[u64]) -> Self {
        let n: u64 = ne.iter().product();
        let data = (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
        self.tensors.push((name.to_string(), ne.to_vec(), 0, data));
        self
    }
    /// A tensor entry whose data is not in the file (for shapes too large to write).
    fn declared_tensor(mut self, name: &str, ne: &[u64], type_id: u32) -> Self {
        self.tensors.retain(|(n, _, _, _)| n != name);
        self.tensors.push((name.to_string(), ne.to_vec(), type_id, Vec::new()));
        self
    }
    fn without_tensor(mut self, name: &str) -> Self {
        self.tensors.retain(|(n, _, _, _)| n != name);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (key, type_id, value) in &self.kvs {
            out.extend(string(key));
            out.extend(type_id.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        for (name, ne, type_id, data) in &self.tensors {
            out.extend(string(name));
            out.extend((ne.len() as u32).to_le_bytes());
            ne.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

const HIDDEN: u64 = 8;

/// A valid toy Llama: 1 layer, hidden 8, 2 heads / 1 KV head, feed-forward 16, vocabulary 8, f32.
fn toy() -> Gguf {
    let g = Gguf::default()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", HIDDEN as u32)
        .u32("llama.feed_forward_length", 16)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt-2")
        .strs("tokenizer.ggml.tokens", &["<|endoftext|>", "a", "b", "Ġ", "1", "2", "Ġb", "<|im_end|>"])
        .i32s("tokenizer.ggml.token_type", &[3, 1, 1, 1, 1, 1, 1, 3])
        .strs("tokenizer.ggml.merges", &["Ġ b"])
        .u32("tokenizer.ggml.eos_token_id", 7)
        .str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}");
    let g = g.f32_tensor("token_embd.weight", &[HIDDEN, 8]).f32_tensor("output_norm.weight", &[HIDDEN]);
    let layer: [(&str, [u64; 2]); 9] = [
        ("attn_norm", [HIDDEN, 1]),
        ("ffn_norm", [HIDDEN, 1]),
        ("attn_q", [HIDDEN, 8]),
        ("attn_k", [HIDDEN, 4]),
        ("attn_v", [HIDDEN, 4]),
        ("attn_output", [8, HIDDEN]),
        ("ffn_gate", [HIDDEN, 16]),
        ("ffn_up", [HIDDEN, 16]),
        ("ffn_down", [16, HIDDEN]),
    ];
    layer.iter().fold(g, |g, (kind, ne)| {
        let ne: &[u64] = if ne[1] == 1 { &ne[..1] } else { ne };
        g.f32_tensor(&format!("blk.0.{kind}.weight"), ne)
    })
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-bad-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Import `bytes` as `NAME.gguf`; the error text (the test fails if the import succeeds), and no
/// output folder may exist afterwards.
fn import_error(name: &str, bytes: &[u8]) -> String {
    let dir = scratch(name);
    let src = dir.join(format!("{name}.gguf"));
    std::fs::write(&src, bytes).unwrap();
    let dest = dir.join("out");
    let err = match import_gguf(&src, &dest, ImportDtype::F32) {
        Ok(report) => panic!("{name}: a malformed file was imported: {report:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("{name}.gguf")), "{name}: the error must name the file: {err}");
    assert!(!dest.exists(), "{name}: a failed import must leave no folder");
    err
}

fn assert_contains(err: &str, wants: &[&str]) {
    for want in wants {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
}

#[test]
fn the_toy_file_imports_and_loads() {
    // The builder is right, so every failure below is the malformation's doing.
    let dir = scratch("valid");
    let src = dir.join("toy.gguf");
    std::fs::write(&src, toy().bytes()).unwrap();
    let report = import_gguf(&src, &dir.join("out"), ImportDtype::F32).unwrap();
    assert_eq!(
        (report.tensors, report.parameters, report.vocab_size),
        (11, 64 + 8 * 3 + 8 * (8 + 4 + 4 + 8 + 16 * 3), 8)
    );
    let (policy, _) = prospect::model::Policy::load(&dir.join("out"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(policy.params.len(), 11);
}

#[test]
fn huge_dimensions_are_refused_before_allocating() {
    // [2^31, 2^31] f32: 2^62 elements, 2^64 bytes: used to be a capacity-overflow panic.
    let err = import_error("dims31", &toy().declared_tensor("token_embd.weight", &[1 << 31, 1 << 31], 0).bytes());
    assert_contains(&err, &["tensor `token_embd.weight`", "shape [2147483648, 2147483648]", "more than 2^64 bytes"]);
    // [2^20, 2^20] f32 = 4 TiB (2^42 bytes): used to abort trying to allocate it.
    let err = import_error("dims20", &toy().declared_tensor("token_embd.weight", &[1 << 20, 1 << 20], 0).bytes());
    assert_contains(&err, &["tensor `token_embd.weight`", "cannot read 4398046511104 bytes", "the file has only"]);
    // Four dimensions of 2^32: the element count overflows usize.
    let err = import_error("dims4", &toy().declared_tensor("blk.0.attn_q.weight", &[1 << 32; 4], 0).bytes());
    assert_contains(&err, &["tensor `blk.0.attn_q.weight`", "element count overflows"]);
    // Q4_0 (32 values per 18-byte block) with 2^40 rows: (2^45 / 32) * 18 bytes, checked too.
    let err = import_error("q4", &toy().declared_tensor("blk.0.ffn_up.weight", &[32, 1 << 40], 2).bytes());
    assert_contains(&err, &["tensor `blk.0.ffn_up.weight` (Q4_0", "cannot read 19791209299968 bytes"]);
}

#[test]
fn a_zero_sized_tensor_is_an_error() {
    let err = import_error("zero", &toy().declared_tensor("blk.0.ffn_norm.weight", &[0], 0).bytes());
    assert_contains(&err, &["tensor `blk.0.ffn_norm.weight`", "zero dimension"]);
    let err = import_error("zero2", &toy().declared_tensor("token_embd.weight", &[8, 0], 0).bytes());
    assert_contains(&err, &["tensor `token_embd.weight`", "zero dimension"]);
}

#[test]
fn tensors_must_have_the_shapes_the_hyperparameters_give() {
    // `llama.embedding_length` 16 with 8-wide tensors: used to import, then fail to load.
    let err = import_error("width", &toy().u32("llama.embedding_length", 16).bytes());
    assert_contains(
        &err,
        &["tensor `token_embd.weight` (F32, shape [8, 8])", "expected shape [8, 16]", "`llama.embedding_length` 16"],
    );
    // A feed-forward width that disagrees with ffn_gate.
    let err = import_error("ffn", &toy().u32("llama.feed_forward_length", 24).bytes());
    assert_contains(&err, &["tensor `blk.0.ffn_gate.weight`", "expected shape [24, 8]"]);
    // A tensor the model needs is absent.
    let err = import_error("missing", &toy().without_tensor("blk.0.attn_v.weight").bytes());
    assert_contains(&err, &["tensor `blk.0.attn_v.weight` is missing"]);
    // Zero layers, KV heads that do not divide the heads.
    let err = import_error("layers", &toy().u32("llama.block_count", 0).bytes());
    assert_contains(&err, &["`llama.block_count` is 0"]);
    let err = import_error("kv", &toy().u32("llama.attention.head_count_kv", 3).bytes());
    assert_contains(&err, &["`llama.attention.head_count_kv` 3 does not divide"]);
}

#[test]
fn an_invalid_chat_template_is_an_error() {
    let err =
        import_error("jinja", &toy().str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }").bytes());
    assert_contains(&err, &["chat template (GGUF `tokenizer.chat_template`)", "cannot compile"]);
}

/// The value bytes of `depth` arrays nested in each other, the innermost an empty u32 array.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut value = [4u32.to_le_bytes().to_vec(), 0u64.to_le_bytes().to_vec()].concat();
    for _ in 1..depth {
        value = [9u32.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec(), value].concat();
    }
    value
}

#[test]
fn malformed_headers_are_errors() {
    let base = toy();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("align0", base.clone().u32("general.alignment", 0).bytes(), "`general.alignment` must be a u32 power of two"),
        ("align3", base.clone().u32("general.alignment", 3).bytes(), "`general.alignment` must be a u32 power of two"),
        ("strlen", base.clone().kv("x", 8, u64::MAX.to_le_bytes().to_vec()).bytes(), "value of `x` at byte"),
        (
            "arraylen",
            base.clone()
                .kv("x", 9, [4u32.to_le_bytes().to_vec(), (1u64 << 40).to_le_bytes().to_vec()].concat())
                .bytes(),
            "`x` declares 1099511627776 array elements",
        ),
        ("nested", base.clone().kv("x", 9, nested_arrays(5)).bytes(), "`x` nests arrays more than 4 deep"),
        ("valuetype", base.clone().kv("x", 13, vec![0; 8]).bytes(), "value type 13"),
        ("bool", base.clone().kv("x", 7, vec![2]).bytes(), "bool stored as 2"),
        (
            "count",
            Gguf { tensor_count: Some(1 << 60), ..base.clone() }.bytes(),
            "the header declares 1152921504606846976 tensors",
        ),
        (
            "ggmltype",
            base.clone().declared_tensor("output_norm.weight", &[8], 16).bytes(),
            "tensor `output_norm.weight` has ggml type 16",
        ),
        ("ndims", base.clone().declared_tensor("output_norm.weight", &[1; 5], 0).bytes(), "has 5 dimensions"),
        (
            "blockrows",
            base.clone().declared_tensor("output_norm.weight", &[8], 2).bytes(),
            "rows of 8 values do not split into blocks of 32",
        ),
    ];
    for (name, bytes, want) in cases {
        let err = import_error(name, &bytes);
        assert_contains(&err, &[want]);
    }
    // A key written twice (the builder replaces duplicates, so splice one in by hand).
    let mut g = base.clone();
    g.kvs.push(("general.architecture".into(), 8, string("qwen2")));
    let err = import_error("dupkey2", &g.bytes());
    assert_contains(&err, &["metadata key `general.architecture` appears twice"]);
    let mut g = base;
    g.tensors.push(g.tensors[1].clone());
    let err = import_error("duptensor", &g.bytes());
    assert_contains(&err, &["tensor `output_norm.weight` appears twice"]);
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error_not_a_panic() {
    let bytes = toy().bytes();
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        let result = convert_gguf(&mut std::io::Cursor::new(cut), Path::new("cut.gguf"), ImportDtype::F32);
        let err = result.err().unwrap_or_else(|| panic!("a file cut at {len} of {} bytes imported", bytes.len()));
        assert!(err.to_string().contains("cut.gguf"), "{len}: {err}");
    }
}

#[test]
fn inputs_the_fuzzer_found_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bad/gguf");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "gguf"));
    files.sort();
    assert!(!files.is_empty(), "no regression inputs in {}", dir.display());
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| {
            convert_gguf(&mut std::io::Cursor::new(&bytes[..]), &path, ImportDtype::F32).map(|c| c.report)
        });
        match result {
            Ok(Err(e)) => assert!(e.to_string().contains(&*path.to_string_lossy()), "{}: {e}", path.display()),
            Ok(Ok(report)) => panic!("{}: imported ({report:?}); it must be refused", path.display()),
            Err(_) => panic!("{}: the import panicked", path.display()),
        }
    }
}
