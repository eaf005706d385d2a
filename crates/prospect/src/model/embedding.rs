//! The input embedding (`embed_tokens`) with PyTorch's `padding_idx` semantics.
//!
//! `transformers` builds the Llama family's input embedding as
//! `nn.Embedding(vocab_size, hidden_size, padding_idx=config.pad_token_id)` (Llama, Mistral and Qwen2 alike,
//! transformers 5.24). The forward pass is a plain row lookup; the backward pass sends no gradient
//! *through the lookup* into row `padding_idx`. Other uses of the same matrix (the LM head when embeddings
//! are tied) still give that row its gradient. The row matters whenever the pad token also occurs inside
//! the text: SmolLM2's pad token is `<|im_end|>`, which ends every ChatML turn.
//!
//! This file is responsible for the lookup only. It is not a general sparse-gradient embedding: the
//! gradient of the matrix is dense, as candle's `index_select` backward makes it.
//!
//! Shapes: `b` batch, `t` time, `d` hidden, `v` vocab, `n = b·t`.

use candle_core::Tensor;

use crate::error::Result;

/// `embed_tokens`: a `[v, d]` matrix looked up by token id, whose `padding_idx` row gets no gradient
/// from the lookup.
#[derive(Clone)]
pub struct TokenEmbedding {
    /// `[v, d]`; a `Var`'s tensor when training, shared with a tied LM head.
    weight: Tensor,
    /// The row the lookup sends no gradient to (`config.pad_token_id`), or `None` (every row learns).
    padding_idx: Option<u32>,
}

impl TokenEmbedding {
    pub fn new(weight: Tensor, padding_idx: Option<u32>) -> Self {
        Self { weight, padding_idx }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Rows of `weight` for `input_ids` `[b, t]` → `[b, t, d]`. The values are exactly the looked-up
    /// rows. At positions holding `padding_idx` the value comes from a detached copy of that row, so
    /// the lookup's gradient stops there (PyTorch's `embedding_backward` skips `padding_idx` the same way).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let d = self.weight.dim(1)?;
        let flat = input_ids.flatten_all()?; // [n]
        let live = self.weight.index_select(&flat, 0)?; // [n, d]
        let x = match self.padding_idx {
            None => live,
            Some(pad) => {
                // Broadcast views: neither the pad row nor the mask is copied `n` times.
                let frozen = self.weight.detach().narrow(0, pad as usize, 1)?.broadcast_as((b * t, d))?; // [n, d]
                let is_pad = flat.eq(pad)?.unsqueeze(1)?.broadcast_as((b * t, d))?; // [n, d] u8
                                                                                    // where_cond's backward sends `grad` to `live` only where `is_pad` is 0.
                is_pad.where_cond(&frozen, &live)? // [n, d]
            }
        };
        Ok(x.reshape((b, t, d))?) // [b, t, d]
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    // W [v=4, d=2], ids [1, 2, 0, 2], pad 2, loss = Σ_i c_i · x_i with c [4, 2] = [[1,2],[3,4],[5,6],[7,8]].
    // The lookup's gradient for row r is Σ of c_i over the positions i holding r:
    //   row 0 = c_2 = [5, 6]; row 1 = c_0 = [1, 2]; row 3 = 0;
    //   row 2 = c_1 + c_3 = [10, 12] for a plain lookup, 0 with padding_idx 2.
    // torch: e = nn.Embedding(4, 2, padding_idx=2); (e(torch.tensor([[1,2,0,2]])) * c).sum().backward()
    //        e.weight.grad -> [[5,6],[1,2],[0,0],[0,0]]
    const W: [[f32; 2]; 4] = [[1., 0.], [0., 1.], [1., 1.], [2., 0.]];
    const C: [[f32; 2]; 4] = [[1., 2.], [3., 4.], [5., 6.], [7., 8.]];

    fn lookup_grad(padding_idx: Option<u32>) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&W, &dev).unwrap()).unwrap();
        let emb = TokenEmbedding::new(w.as_tensor().clone(), padding_idx);
        let ids = Tensor::new(&[[1u32, 2, 0, 2]], &dev).unwrap();
        let x = emb.forward(&ids).unwrap(); // [1, 4, 2]
        let c = Tensor::new(&C, &dev).unwrap().unsqueeze(0).unwrap();
        let grads = (&x * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap().to_vec2().unwrap();
        (x.squeeze(0).unwrap().to_vec2().unwrap(), g)
    }

    #[test]
    fn pad_row_gets_no_gradient_through_the_lookup() {
        let (x, g) = lookup_grad(Some(2));
        assert_eq!(x, [[0., 1.], [1., 1.], [1., 0.], [1., 1.]], "forward = the looked-up rows");
        assert_eq!(g, [[5., 6.], [1., 2.], [0., 0.], [0., 0.]]);
    }

    #[test]
    fn without_padding_idx_every_row_learns() {
        let (x, g) = lookup_grad(None);
        assert_eq!(x, [[0., 1.], [1., 1.], [1., 0.], [1., 1.]]);
        assert_eq!(g, [[5., 6.], [1., 2.], [10., 12.], [0., 0.]]);
        // Rows other than the pad row are the same either way.
        let (_, with_pad) = lookup_grad(Some(2));
        for r in [0, 1, 3] {
            assert_eq!(g[r], with_pad[r], "row {r}");
        }
    }

    #[test]
    fn a_tied_head_still_trains_the_pad_row() {
        // The same W as embedding and LM head: loss = Σ_i logits[i, 2] with logits = x Wᵀ, i.e. Σ_i x_i · W_2.
        // Head part: ∂/∂W_2 = Σ_i x_i = [0+1+1+1, 1+1+0+1] = [3, 3].
        // Lookup part: every x_i receives W_2 = [1, 1]; position 0 (id 1) and 2 (id 0) pass it on, the
        // two pad positions do not. So W_0 = [1, 1], W_1 = [1, 1], W_2 = [3, 3] (plain lookup: [5, 5]).
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&W, &dev).unwrap()).unwrap();
        let emb = TokenEmbedding::new(w.as_tensor().clone(), Some(2));
        let x = emb.forward(&Tensor::new(&[[1u32, 2, 0, 2]], &dev).unwrap()).unwrap(); // [1, 4, 2]
        let logits = x.broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap(); // [1, 4, 4]
        let loss = logits.narrow(2, 2, 1).unwrap().sum_all().unwrap();
        let g: Vec<Vec<f32>> = loss.backward().unwrap().get(w.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(g, [[1., 1.], [1., 1.], [3., 3.], [0., 0.]]);
    }
}
