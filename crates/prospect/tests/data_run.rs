//! The data options in a real run on tiny-llama: held-out eval under `eval/` keys, `skip_invalid`
//! counted in metrics.jsonl, `auto_weights` logged, class fractions, and the chat-template config error.

mod common;

use candle_core::Device;
use common::{fixtures, scratch, trl_config};
use prospect::loss::{KtoConfig, LossConfig};
use prospect::train::{train, Event, RunOptions};
use serde_json::Value;

fn notices(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::Notice(n) = e { Some(n.clone()) } else { None }).collect()
}

#[test]
fn eval_lines_carry_the_training_metrics_under_eval() {
    let out = scratch("data-run-eval");
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.eval_fraction = 0.25; // 4 of 16 rows
    config.eval_every = 2;
    let mut events = vec![];
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    assert_eq!(history.len(), 3);
    assert!(notices(&events).iter().any(|n| n.starts_with("held out 4 of 16 rows")), "{:?}", notices(&events));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<&Value> = lines.iter().filter(|l| l.get("eval/loss").is_some()).collect();
    // After step 2 (eval_every) and after the last step, 3.
    assert_eq!(evals.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3]);
    for key in ["eval/kl", "eval/rewards/chosen", "eval/rewards/rejected"] {
        assert!(evals[0].get(key).is_some(), "missing {key}: {}", evals[0]);
    }
    let eval_events = events.iter().filter(|e| matches!(e, Event::Eval { .. })).count();
    assert_eq!(eval_events, 2);
}

#[test]
fn skip_invalid_is_counted_in_metrics_and_at_the_end() {
    let out = scratch("data-run-skip");
    let data = out.join("bad.jsonl");
    let good = std::fs::read_to_string(fixtures().join("data/unpaired.jsonl")).unwrap();
    std::fs::write(
        &data,
        format!("{good}{{\"prompt\": \"x\", \"completion\": \"y\", \"label\": \"maybe\"}}\nnot json\n"),
    )
    .unwrap();
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.train_data = data.clone();
    let err = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.ends_with("bad.jsonl:17: field `label` must be true or false, got the string \"maybe\""), "{err}");
    config.skip_invalid = true;
    let mut events = vec![];
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    assert!(history.iter().all(|m| m.skipped_invalid == Some(2)));
    let last = notices(&events).into_iter().last().unwrap();
    assert_eq!(last, "skip_invalid: 2 invalid rows were skipped (metrics.jsonl: `data/skipped_invalid`)");
    let first_line: Value =
        serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    assert_eq!(first_line["data/skipped_invalid"], 2);
}

#[test]
fn auto_weights_after_dropping_desirable_pairs() {
    // 8 pairs → keep 25% of the desirable side: 2 desirable, 8 undesirable; λ_D = 7/6 · 8/2 = 4.6667.
    let out = scratch("data-run-auto-weights");
    let mut config = trl_config("paired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.desirable_fraction = 0.25;
    config.auto_weights = true;
    config.max_steps = Some(1);
    let mut events = vec![];
    train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    let n = notices(&events);
    assert!(
        n.iter()
            .any(|m| m.starts_with("kept 2 of 8 desirable rows (desirable_fraction = 0.25) and 8 of 8 undesirable")),
        "{n:?}"
    );
    assert!(
        n.iter().any(|m| m.starts_with("auto_weights: 2 desirable and 8 undesirable examples; desirable_weight = 4.6667, undesirable_weight = 1.0000")),
        "{n:?}"
    );
}

#[test]
fn conversational_rows_need_a_template() {
    // tiny-llama with its chat template removed from tokenizer_config.json.
    let out = scratch("data-run-no-template");
    let model = out.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let tok_config = std::fs::read_to_string(fixtures().join("tiny-llama/tokenizer_config.json")).unwrap();
    let mut stripped: serde_json::Map<String, Value> = serde_json::from_str(&tok_config).unwrap();
    stripped.remove("chat_template");
    std::fs::write(model.join("tokenizer_config.json"), Value::Object(stripped).to_string()).unwrap();

    let mut config = trl_config("conv_unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.model = model;
    config.max_length = 64;
    config.max_steps = Some(1);
    let err = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("config: `chat_template`: the data is conversational (lists of messages) but the model's tokenizer has no chat template"), "{err}");
    // `chat_template = "path"` supplies one (here: the original tokenizer_config.json with ChatML).
    let path = out.join("chatml_config.json");
    std::fs::write(&path, tok_config).unwrap();
    config.chat_template = Some(path);
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
}

#[test]
fn shuffling_after_unpairing_mixes_labels_in_batches() {
    // TRL's block unpairing puts the 8 chosen rows before the 8 rejected ones: in file order every batch
    // of 8 is one class. The seeded shuffle runs on the unpaired examples, so batches mix.
    use prospect::data::{prepare, read_jsonl, Examples};
    use prospect::model::HfTokenizer;
    use prospect::train::epoch_order;
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let path = fixtures().join("data/paired.jsonl");
    let kind = LossConfig::Kto(KtoConfig::default()).shape();
    let Examples::Unpaired(ex) = prepare(read_jsonl(&path).unwrap(), kind, &tok, 32, &path).unwrap().0 else {
        panic!()
    };
    let labels =
        |order: &[usize]| order.chunks(8).map(|b| b.iter().filter(|&&i| ex[i].label).count()).collect::<Vec<_>>();
    assert_eq!(labels(&epoch_order(16, 0, false, 42)), vec![8, 0]);
    let shuffled = labels(&epoch_order(16, 0, true, 42));
    assert!(shuffled.iter().all(|&d| d > 0 && d < 8), "{shuffled:?}");
    assert_eq!(epoch_order(16, 0, true, 42), epoch_order(16, 0, true, 42));
}

#[test]
fn eval_data_from_another_file_in_another_layout() {
    let out = scratch("data-run-eval-data");
    let mut config = trl_config("conv_unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.max_length = 64;
    config.max_steps = Some(1);
    config.eval_data = Some(fixtures().join("data/sharegpt_kto.json"));
    let mut events = vec![];
    train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    let evals: Vec<(usize, f64)> = events
        .iter()
        .filter_map(|e| if let Event::Eval { step, loss, .. } = e { Some((*step, *loss)) } else { None })
        .collect();
    assert_eq!(evals.len(), 1);
    assert!(evals[0].0 == 1 && evals[0].1.is_finite() && evals[0].1 > 0.0, "{evals:?}");
}

#[test]
fn evaluation_does_not_change_training() {
    // Eval after every step on a separate file: the training trajectory is bit-for-bit the one without.
    let run = |eval: bool, name: &str| {
        let out = scratch(name);
        let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
        if eval {
            config.eval_data = Some(fixtures().join("data/paired.jsonl"));
            config.eval_every = 1;
        }
        train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap()
    };
    let (with, without) = (run(true, "data-run-with-eval"), run(false, "data-run-without-eval"));
    for (a, b) in with.iter().zip(&without) {
        assert_eq!(
            (a.loss, a.grad_norm, a.objective.get("kl")),
            (b.loss, b.grad_norm, b.objective.get("kl")),
            "step {}",
            a.step
        );
    }
}

#[test]
fn a_template_that_rejects_a_row_names_its_line() {
    // Gemma-style templates raise on a system message; line 2 of conv_unpaired.jsonl has one.
    let out = scratch("data-run-template-raises");
    let jinja = out.join("no_system.jinja");
    std::fs::write(
        &jinja,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
         {{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    )
    .unwrap();
    let mut config = trl_config("conv_unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.max_length = 64;
    config.chat_template = Some(jinja.clone());
    let err = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    let want = format!("conv_unpaired.jsonl:2: chat template ({}): cannot render: ", jinja.display());
    assert!(err.contains(&want) && err.contains("System role not supported"), "{err}");
}

/// unpaired.jsonl with every label set to `label`, written under `out`.
fn one_class(out: &std::path::Path, label: bool) -> std::path::PathBuf {
    let good = std::fs::read_to_string(fixtures().join("data/unpaired.jsonl")).unwrap();
    let text = good
        .replace("\"label\": false", &format!("\"label\": {label}"))
        .replace("\"label\": true", &format!("\"label\": {label}"));
    assert_eq!(text.matches(&format!("\"label\": {label}")).count(), 16, "{text}");
    let path = out.join(format!("all-{label}.jsonl"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn one_class_kto_gets_a_warning_not_a_ratio() {
    let out = scratch("data-run-one-class");
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.train_data = one_class(&out, true);
    config.auto_weights = true;
    let err = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: auto_weights = true has no ratio to aim for: KTO class balance: all 16 examples are desirable and \
             none undesirable, so λ_D·n_D/(λ_U·n_U) has no second class and no class weight can balance it; KTO will \
             only move the desirable side. Add undesirable examples (e.g. label_from on a score), or train with sft; \
             or set auto_weights = false",
            config.train_data.display()
        )
    );
    config.auto_weights = false;
    config.train_data = one_class(&out, false);
    config.max_steps = Some(1);
    let mut events = vec![];
    train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    let n = notices(&events);
    assert!(
        n.iter().any(|m| m.starts_with("KTO class balance: all 16 examples are undesirable and none desirable")),
        "{n:?}"
    );
    assert!(!n.iter().any(|m| m.contains("Set EITHER") || m.contains("auto_weights:")), "{n:?}");
}

#[test]
fn a_one_row_kto_file_is_an_error_at_setup() {
    let out = scratch("data-run-one-row");
    let data = out.join("one.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Hi\", \"completion\": \"there\", \"label\": true}\n").unwrap();
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.train_data = data.clone();
    let err = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: `kto` estimates its KL term from mismatched pairs (a prompt with another example's completion), \
             which needs at least 2 examples; this file gives 1",
            data.display()
        )
    );
}

#[test]
fn a_last_microbatch_of_one_kto_example_is_reported() {
    // 3 examples in microbatches of 2: 3 % 2 == 1, so the epoch's last microbatch pairs its row with itself.
    let out = scratch("data-run-odd-tail");
    let data = out.join("three.jsonl");
    let row = |c: &str, l: bool| format!("{{\"prompt\": \"Hi\", \"completion\": \"{c}\", \"label\": {l}}}\n");
    std::fs::write(&data, [row("there", true), row("you", false), row("friend", true)].concat()).unwrap();
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.train_data = data;
    (config.batch_size, config.microbatch_size, config.max_steps) = (2, 2, Some(1));
    let mut events = vec![];
    train(&config, &Device::Cpu, RunOptions::default(), &mut |e| events.push(e)).unwrap();
    let n = notices(&events);
    let want = "3 examples in microbatches of 2: the last microbatch of each epoch holds one example";
    assert!(n.iter().any(|m| m.starts_with(want)), "{n:?}");
}
