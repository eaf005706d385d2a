//! From GGUF tensor bytes to f32 tensors in Hugging Face layout: dequantization (candle's ggml
//! kernels) and the inverse of llama.cpp's Q/K row permutation.
//!
//! Types: F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K are each checked value
//! for value against gguf-py on random blocks (`crates/prospect/tests/gguf_blocks.rs`); F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1, Q4_K, Q6_K against hand-computed values below; F32, Q4_1 and Q8_0 also on the whole
//! SmolLM2 file (`crates/prospect-cli/tests/gguf_import.rs`). Q8_1 and Q8_K (llama.cpp's
//! intermediate types, never stored in model files) are read by candle but untested. IQ* and other types
//! candle 0.11.1 does not know stop the import when the header is read.
//!
//! Not responsible for: reading the GGUF header or naming tensors (that is `gguf.rs`).
//!
//! Shape legend: `r` rows (output features), `c` columns (input features), `h` heads.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};

/// llama.cpp's name for a storage type (`Q4_K`, not candle's `Q4K`), for messages and reports.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Dequantize the raw bytes of one tensor to f32. `dims` is in Hugging Face order (rows first), i.e.
/// GGUF's `ne` reversed; the bytes are ggml blocks laid out row by row.
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], dims: &[usize]) -> candle_core::Result<Tensor> {
    let elems: usize = dims.iter().product();
    let expected = elems / dtype.block_size() * dtype.type_size();
    if !elems.is_multiple_of(dtype.block_size()) || bytes.len() != expected {
        candle_core::bail!(
            "{} tensor of shape {dims:?} needs {expected} bytes in blocks of {} values, got {} bytes",
            type_name(dtype),
            dtype.block_size(),
            bytes.len()
        );
    }
    qtensor_from_ggml(dtype, bytes, dims.to_vec(), &Device::Cpu)?.dequantize(&Device::Cpu)
}

/// Undo llama.cpp's Q/K row permutation.
///
/// `convert_hf_to_gguf.py` stores `q_proj`/`k_proj` rows so that each head's RoPE pairs are
/// interleaved (GPT-J style, `x[2i], x[2i+1]`), where Hugging Face rotates halves (`x[i], x[i+d/2]`):
/// `w.reshape(h, 2, r/h/2, c).swapaxes(1, 2).reshape(r, c)`. This is its inverse:
/// `w.reshape(h, r/h/2, 2, c).swapaxes(1, 2).reshape(r, c)`.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (r, c) = w.dims2()?; // [r, c]
    if heads == 0 || r % (2 * heads) != 0 {
        candle_core::bail!("cannot undo the Q/K permutation: {r} rows do not split into {heads} heads of even size");
    }
    w.reshape((heads, r / heads / 2, 2, c))? // [h, r/h/2, 2, c]
        .transpose(1, 2)? // [h, 2, r/h/2, c]
        .contiguous()?
        .reshape((r, c)) // [r, c]
}

#[cfg(test)]
mod tests {
    //! Each block below is built by hand, byte by byte, and its expected values are worked out from
    //! the block formats in ggml (`ggml-quants.c`, `dequantize_row_*`), quoted beside each test.

    use super::*;

    /// IEEE half-precision bits of the few values these tests use (sign | 5-bit exponent | 10-bit mantissa).
    fn h(x: f32) -> [u8; 2] {
        let bits: u16 = match x {
            0.0 => 0x0000,
            0.25 => 0x3400,
            0.5 => 0x3800,
            1.5 => 0x3E00,
            2.0 => 0x4000,
            -1.0 => 0xBC00,
            -2.25 => 0xC080,
            65504.0 => 0x7BFF,
            _ => unreachable!("add {x} to the table"),
        };
        bits.to_le_bytes()
    }

    fn values(dtype: GgmlDType, bytes: &[u8], n: usize) -> Vec<f32> {
        dequantize(dtype, bytes, &[n]).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn f32_f16_bf16_are_read_as_stored() {
        let xs = [1.5f32, -2.25, 0.0, 65504.0];
        let f32_bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = xs.iter().flat_map(|x| h(*x)).collect();
        // bfloat16 is the top half of an f32; 65504 = 0x477FE000 rounds up to 0x4780 (65536).
        let bf16_bytes: Vec<u8> = [0x3FC0u16, 0xC010, 0x0000, 0x4780].iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(values(GgmlDType::F32, &f32_bytes, 4), xs);
        assert_eq!(values(GgmlDType::F16, &f16_bytes, 4), xs);
        assert_eq!(values(GgmlDType::BF16, &bf16_bytes, 4), [1.5, -2.25, 0.0, 65536.0]);
    }

    #[test]
    fn q8_0_is_scale_times_int8() {
        // block_q8_0 { f16 d; int8 qs[32] }: y[j] = d * qs[j]
        let mut block = h(0.5).to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let want: Vec<f32> = (0..32).map(|j| 0.5 * (j as f32 - 16.0)).collect();
        assert_eq!(values(GgmlDType::Q8_0, &block, 32), want);
    }

    #[test]
    fn q4_0_low_nibbles_first_minus_8() {
        // block_q4_0 { f16 d; u8 qs[16] }: y[j] = d * ((qs[j] & 0xF) - 8), y[j + 16] = d * ((qs[j] >> 4) - 8)
        let mut block = h(2.0).to_vec();
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let got = values(GgmlDType::Q4_0, &block, 32);
        assert_eq!(got[0], -16.0); // 2 * (0 - 8)
        assert_eq!(got[3], -10.0); // 2 * (3 - 8)
        assert_eq!(got[15], 14.0); // 2 * (15 - 8)
        assert_eq!(got[16], 14.0); // high nibble of qs[0] = 15: 2 * 7
        assert_eq!(got[31], -16.0); // high nibble of qs[15] = 0
    }

    #[test]
    fn q4_1_is_scale_times_nibble_plus_min() {
        // block_q4_1 { f16 d; f16 m; u8 qs[16] }: y[j] = d * (qs[j] & 0xF) + m, y[j + 16] = d * (qs[j] >> 4) + m
        let mut block = h(0.25).to_vec();
        block.extend(h(-1.0));
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let got = values(GgmlDType::Q4_1, &block, 32);
        assert_eq!(got[0], -1.0); // 0.25 * 0 - 1
        assert_eq!(got[5], 0.25); // 0.25 * 5 - 1
        assert_eq!(got[16], 2.75); // 0.25 * 15 - 1
        assert_eq!(got[31], -1.0);
    }

    /// ggml's 12-byte packing of eight 6-bit (scale, min) pairs (`get_scale_min_k4` reads it back):
    /// j < 4: scales[j] = sc | (sc_{j+4} >> 4) << 6, scales[j+4] = m | (m_{j+4} >> 4) << 6;
    /// j ≥ 4: scales[j+4] = (sc & 0xF) | (m & 0xF) << 4.
    fn pack_k4_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
            s[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
            s[j + 8] = (sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4;
        }
        s
    }

    #[test]
    fn q4_k_scales_mins_and_nibble_order() {
        // block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }, 8 sub-blocks of 32:
        // sub-block 2i takes the low nibbles of qs[32i..32i+32], sub-block 2i+1 the high nibbles;
        // y = d * sc_j * q - dmin * m_j.
        let sc = [1, 2, 3, 63, 17, 40, 5, 33]; // 17, 40, 33 need the high bits stored in bytes 0..8
        let m = [0, 1, 2, 3, 48, 5, 6, 7];
        let mut block = h(0.5).to_vec();
        block.extend(h(0.25));
        block.extend(pack_k4_scales(sc, m));
        block.extend([0x93u8; 128]); // low nibble 3, high nibble 9
        let got = values(GgmlDType::Q4K, &block, 256);
        for j in 0..8 {
            let q = if j % 2 == 0 { 3.0 } else { 9.0 };
            let want = 0.5 * sc[j] as f32 * q - 0.25 * m[j] as f32;
            for k in 0..32 {
                assert_eq!(got[32 * j + k], want, "sub-block {j}, element {k}");
            }
        }
        assert_eq!(got[32 * 3], 0.5 * 63.0 * 9.0 - 0.75); // 282.75
        assert_eq!(got[32 * 4], 0.5 * 17.0 * 3.0 - 12.0); // 13.5
    }

    #[test]
    fn q6_k_low_and_high_bits() {
        // block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }, per half of 128 values, l < 32:
        // q1 = (ql[l] & 0xF | (qh[l] >> 0 & 3) << 4) - 32  -> y[l]
        // q2 = (ql[l+32] & 0xF | (qh[l] >> 2 & 3) << 4) - 32 -> y[l+32]
        // q3 = (ql[l] >> 4 | (qh[l] >> 4 & 3) << 4) - 32     -> y[l+64]
        // q4 = (ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4) - 32  -> y[l+96]
        // each times d * scales[k / 16] for y[k].
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        ql[0] = 0x5A; // low 10, high 5
        qh[0] = 0b11_10_01_00; // q1 +0, q2 +16, q3 +32, q4 +48
        let scales: [i8; 16] = [1, -2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -16];
        let mut block = ql.to_vec();
        block.extend(qh);
        block.extend(scales.iter().map(|s| *s as u8));
        block.extend(h(0.5));
        let got = values(GgmlDType::Q6K, &block, 256);
        assert_eq!(got[0], 0.5 * 1.0 * (10.0 - 32.0)); // -11
        assert_eq!(got[32], 0.5 * 3.0 * (16.0 - 32.0)); // -24
        assert_eq!(got[64], 0.5 * 5.0 * (37.0 - 32.0)); // 12.5
        assert_eq!(got[96], 0.5 * 7.0 * (48.0 - 32.0)); // 56
        assert_eq!(got[1], 0.5 * 1.0 * -32.0); // all-zero bits: q = -32
        assert_eq!(got[16], 0.5 * -2.0 * -32.0); // scales[1] is negative: 32
        assert_eq!(got[255], 0.5 * -16.0 * -32.0); // last sub-block, second half: 256
    }

    #[test]
    fn wrong_byte_count_is_an_error_not_a_panic() {
        let err = dequantize(GgmlDType::Q4_1, &[0u8; 19], &[32]).unwrap_err().to_string();
        assert!(err.contains("needs 20 bytes"), "{err}");
        let err = dequantize(GgmlDType::Q4K, &[0u8; 144], &[100]).unwrap_err().to_string();
        assert!(err.contains("blocks of 256"), "{err}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: permute(w, h) = w.reshape(h, 2, r/h/2, c).swapaxes(1, 2).reshape(r, c).
        // 2 heads of 4 rows: within a head, rows [a0 a1 b0 b1] were stored as [a0 b0 a1 b1].
        let stored = Tensor::new(
            &[[0f32, 0.], [2., 2.], [1., 1.], [3., 3.], [4., 4.], [6., 6.], [5., 5.], [7., 7.]],
            &Device::Cpu,
        )
        .unwrap();
        let hf: Vec<Vec<f32>> = unpermute_qk(&stored, 2).unwrap().to_vec2().unwrap();
        let rows: Vec<f32> = hf.iter().map(|r| r[0]).collect();
        assert_eq!(rows, [0., 1., 2., 3., 4., 5., 6., 7.]);
        // And it is the inverse of the permutation on a random-looking 12×3 matrix with 3 heads.
        let w = Tensor::arange(0f32, 36., &Device::Cpu).unwrap().reshape((12, 3)).unwrap();
        let permuted =
            w.reshape((3, 2, 2, 3)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((12, 3)).unwrap();
        let back = unpermute_qk(&permuted, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert!(unpermute_qk(&w, 5).is_err());
    }
}
