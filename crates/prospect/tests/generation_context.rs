//! Generation stays inside the model's context (`max_position_embeddings`, 256 for tiny-llama): a row stops
//! with `finish = length` when prompt + completion reach it, and a prompt that leaves no room is an error
//! naming the prompt file's line.

mod common;

use candle_core::Device;
use common::{fixtures, scratch};
use prospect::eval::files::read_rows;
use prospect::eval::generate::generate_rows;
use prospect::eval::{generate, FinishReason, GenerateConfig};
use prospect::model::{HfTokenizer, Policy};

#[test]
fn a_row_stops_at_the_context() {
    let dir = fixtures().join("tiny-llama");
    let model = Policy::load(&dir, &Device::Cpu).unwrap().0.frozen_model(&Device::Cpu).unwrap();
    assert_eq!(model.config().max_position_embeddings, Some(256));
    let tok = HfTokenizer::load(&dir).unwrap();
    // 250 prompt tokens leave room for 6; a 4-token prompt beside it is not cut by its neighbour.
    let prompts = vec![vec![5u32; 250], vec![5u32; 4]];
    let cfg = GenerateConfig { max_new_tokens: 20, ..GenerateConfig::default() };
    let gens = generate(&model, &tok, &prompts, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    for (p, g) in prompts.iter().zip(&gens) {
        assert!(p.len() + g.completion_ids.len() <= 256, "{} + {}", p.len(), g.completion_ids.len());
        if g.finish == FinishReason::Length {
            let room = (256 - p.len()).min(cfg.max_new_tokens);
            assert_eq!(g.completion_ids.len(), room, "a `length` finish uses all the room there is");
        }
    }
    assert_eq!((gens[0].finish, gens[0].completion_ids.len()), (FinishReason::Length, 6));
}

#[test]
fn a_prompt_that_fills_the_context_is_an_error_naming_its_line() {
    let dir = scratch("generation-context");
    let file = dir.join("prompts.jsonl");
    let long = "one two three four ".repeat(100);
    std::fs::write(&file, format!("{{\"prompt\": \"short\"}}\n{{\"prompt\": \"{long}\"}}\n")).unwrap();
    let rows = read_rows(&file, false).unwrap();
    let model = fixtures().join("tiny-llama");
    let err = generate_rows(
        &prospect::model::ModelSource::resolve(&model, None).unwrap(),
        &file,
        &rows,
        1,
        &GenerateConfig::default(),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    let want = format!("{}:2: `prompt` is ", file.display());
    assert!(err.starts_with(&want), "{err}");
    assert!(err.contains("the model's context is 256 tokens (max_position_embeddings in "), "{err}");
}
