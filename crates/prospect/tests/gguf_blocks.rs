//! `import::dequant::dequantize` against llama.cpp's own Python reader (gguf-py 0.19.0) on whole random
//! blocks of every ggml type the import reads. Fixture: `tests/fixtures/gguf_blocks.json`, from
//! `scripts/make_gguf_block_fixtures.py`. The hand-computed cases sit beside the code, in `dequant.rs`.

mod common;

use candle_core::quantized::GgmlDType;
use common::fixture_json;
use prospect::import::dequant::dequantize;

fn ggml_type(name: &str) -> GgmlDType {
    match name {
        "F16" => GgmlDType::F16,
        "BF16" => GgmlDType::BF16,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4_1" => GgmlDType::Q4_1,
        "Q5_0" => GgmlDType::Q5_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q8_0" => GgmlDType::Q8_0,
        "Q2_K" => GgmlDType::Q2K,
        "Q3_K" => GgmlDType::Q3K,
        "Q4_K" => GgmlDType::Q4K,
        "Q5_K" => GgmlDType::Q5K,
        "Q6_K" => GgmlDType::Q6K,
        other => panic!("fixture type {other} has no mapping"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_type_matches_gguf_py_on_random_blocks() {
    let fixture = fixture_json("gguf_blocks.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        // Two rows, as a weight matrix would be laid out: [2, n/2].
        let got: Vec<f32> = dequantize(ggml_type(name), &hex(case["hex"].as_str().unwrap()), &[2, want.len() / 2])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1e-3)).fold(0f32, f32::max);
        eprintln!("{name}: {} values, largest relative difference {worst:e}", got.len());
        assert!(worst <= 1e-6, "{name}: largest relative difference from gguf-py {worst:e}");
    }
}
