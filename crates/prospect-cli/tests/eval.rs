//! `prospect generate` and `prospect eval`, through the real binary: a rule judge with exact counts, and
//! an LLM judge served by a small OpenAI-compatible server on loopback (random order, strict parsing).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn write(path: &Path, rows: &[&str]) {
    std::fs::write(path, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
}

const PROMPTS: [&str; 4] =
    ["please bring the red cup", "please open the blue box", "please find the green key", "please hold the black pen"];

/// Candidate: good, good, rude, good. Baseline: rude, good, good, wrong object.
/// Rule scores: c = [3, 3, 1, 3], b = [1, 3, 3, 2] → win, tie, loss, win: (2 + 0.5) / 4 = 0.625.
fn generation_files(dir: &Path) -> (PathBuf, PathBuf) {
    let c = dir.join("kto.jsonl");
    let b = dir.join("sft.jsonl");
    let cand = [" sure , the red cup .", " sure , the blue box .", " no , i will not .", " sure , the black pen ."];
    let base = [" no , i will not .", " sure , the blue box .", " sure , the green key .", " sure , the red key ."];
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    write(
        &c,
        &PROMPTS
            .iter()
            .zip(cand)
            .map(|(p, x)| row(p, x))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // The baseline lists the prompts in another order: rows pair up by prompt, not by line.
    let mut brows: Vec<String> = PROMPTS.iter().zip(base).map(|(p, x)| row(p, x)).collect();
    brows.reverse();
    write(&b, &brows.iter().map(String::as_str).collect::<Vec<_>>());
    (c, b)
}

/// `prospect eval --candidate C --baseline B --judge JUDGE --output OUT EXTRA...`.
fn run_eval(c: &Path, b: &Path, judge: &str, out: &Path, extra: &[&str]) -> Output {
    let files = [c.to_str().unwrap(), b.to_str().unwrap(), out.to_str().unwrap()];
    let args = ["eval", "--candidate", files[0], "--baseline", files[1], "--judge", judge, "--output", files[2]];
    prospect(&args.iter().chain(extra).copied().collect::<Vec<_>>())
}

#[test]
fn rule_judge_counts_wins_ties_and_losses() {
    let dir = scratch("eval-rule");
    let (c, b) = generation_files(&dir);
    let out = dir.join("out");
    let o = run_eval(&c, &b, "rule:polite-reply", &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let k = &r["candidates"][0];
    assert_eq!((k["wins"].as_u64(), k["ties"].as_u64(), k["losses"].as_u64()), (Some(2), Some(1), Some(1)));
    assert_eq!(k["win_rate"].as_f64(), Some(0.625));
    // Wilson at p = 0.625, n = 4; python: z=1.959963984540054; n=4; p=.625; d=1+z*z/n; c=(p+z*z/(2*n))/d;
    //   h=z/d*math.sqrt(p*(1-p)/n+z*z/(4*n*n)); (c-h, c+h)  ->  (0.21943, 0.90810)
    let ci = k["ci95"].as_array().unwrap();
    assert!(
        (ci[0].as_f64().unwrap() - 0.21943).abs() < 1e-4 && (ci[1].as_f64().unwrap() - 0.90810).abs() < 1e-4,
        "{ci:?}"
    );
    assert_eq!(k["mean_candidate_score"].as_f64(), Some(2.5));
    assert_eq!(r["ci_method"], "wilson");
    assert!(std::fs::read_to_string(out.join("results.md")).unwrap().contains("| kto | 0.625 |"));
    assert_eq!(&std::fs::read(out.join("win_rates.png")).unwrap()[1..4], b"PNG");
    assert_eq!(std::fs::read_to_string(out.join("comparisons-kto.jsonl")).unwrap().lines().count(), 4);
}

/// A chat-completions server that answers by content: it prefers the response that starts with
/// "sure", says TIE when both or neither do, and answers "I think A" (unparseable) for the key prompt.
fn fake_judge(requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let content = req["messages"][0]["content"].as_str().unwrap().to_string();
            let a = content
                .split("Response A:\n")
                .nth(1)
                .unwrap()
                .split("\n\nResponse B:")
                .next()
                .unwrap()
                .trim()
                .to_string();
            let b = content.split("Response B:\n").nth(1).unwrap().split("\n\n").next().unwrap().trim().to_string();
            let answer = if content.contains("green key") {
                "I think A".to_string()
            } else {
                match (a.starts_with("sure"), b.starts_with("sure")) {
                    (true, false) => "A".into(),
                    (false, true) => "B.".into(),
                    _ => "tie".into(),
                }
            };
            let reply =
                serde_json::json!({"choices": [{"message": {"role": "assistant", "content": answer}}]}).to_string();
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len()).unwrap();
            seen.push(content);
        }
        seen
    });
    (url, handle)
}

#[test]
fn llm_judge_over_loopback_randomises_order_and_parses_strictly() {
    let dir = scratch("eval-llm");
    let (c, b) = generation_files(&dir);
    let (url, server) = fake_judge(4);
    let out = dir.join("out");
    let judge = format!("llm:{url}");
    let o = run_eval(&c, &b, &judge, &out, &["--seed", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 4);
    // red cup: candidate polite, baseline rude → win. blue box: both polite → tie.
    // green key: unparseable → tie, counted. black pen: both polite → tie.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let k = &r["candidates"][0];
    assert_eq!((k["wins"].as_u64(), k["ties"].as_u64(), k["losses"].as_u64()), (Some(1), Some(3), Some(0)));
    assert_eq!(k["unparseable"].as_u64(), Some(1));
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("comparisons-kto.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let positions: Vec<&str> = log.iter().map(|e| e["candidate_position"].as_str().unwrap()).collect();
    assert!(positions.contains(&"A") && positions.contains(&"B"), "order must be randomised: {positions:?}");
    assert_eq!(log[2]["judge_answer"], "I think A");
    assert_eq!(log[2]["parsed"], false);
}

#[test]
fn generate_writes_completions_and_carries_fields() {
    let dir = scratch("generate");
    let prompts = dir.join("prompts.jsonl");
    write(&prompts, &["{\"prompt\": \"The sky is\", \"id\": 7}", "", "{\"prompt\": \"Two plus two is\", \"id\": 8}"]);
    let out = dir.join("gen.jsonl");
    let model = fixtures().join("tiny-llama");
    let o = prospect(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--num-samples",
        "2",
        "--temperature",
        "1.0",
        "--seed",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows.iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>(), vec![7, 7, 8, 8]);
    assert_eq!(rows.iter().map(|r| r["sample"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 0, 1]);
    for r in &rows {
        let ids = r["completion_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 5, "{r}");
        assert!(r["completion"].is_string() && r["model"].as_str().unwrap().ends_with("tiny-llama"));
    }
    let bad = dir.join("bad.jsonl");
    write(&bad, &["{\"text\": \"no prompt\"}"]);
    let o = prospect(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.jsonl:1: field `prompt` is missing"));
}

#[test]
fn generate_renders_conversational_prompts_with_the_chat_template() {
    // tiny-llama's ChatML template: the prompt the model sees is exactly what
    // apply_chat_template(messages, add_generation_prompt=True) renders, tokenized without extras.
    let dir = scratch("generate-chat");
    let prompts = dir.join("prompts.jsonl");
    write(&prompts, &["{\"prompt\": [{\"role\": \"user\", \"content\": \"What color is the sky?\"}]}"]);
    let out = dir.join("gen.jsonl");
    let model = fixtures().join("tiny-llama");
    let o = prospect(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    // Greedy decoding of the rendered text must equal greedy decoding of the same text given as a string.
    let plain = dir.join("plain.jsonl");
    write(&plain, &[&serde_json::json!({"prompt": "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"}).to_string()]);
    let out2 = dir.join("gen2.jsonl");
    let o = prospect(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        plain.to_str().unwrap(),
        "--output",
        out2.to_str().unwrap(),
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let row2: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out2).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(row["completion_ids"], row2["completion_ids"]);
    assert_eq!(row["completion_ids"].as_array().unwrap().len(), 4);
}

/// `prospect eval --judge reward:tiny-llama-rm` on two rows. tests/fixtures/tiny-llama-rm is a
/// LlamaForSequenceClassification folder (num_labels = 1) that scores prompt + completion + eos. Returns
/// the comparison log, the scored token ids (candidate, baseline per row; right-padded with the pad token)
/// and the scores the binary logged for them, in that order.
fn reward_judge_run(name: &str) -> (Vec<serde_json::Value>, Vec<Vec<u32>>, Vec<f64>) {
    let dir = scratch(name);
    let rm = fixtures().join("tiny-llama-rm");
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    let (c, b) = (dir.join("cand.jsonl"), dir.join("base.jsonl"));
    write(&c, &[&row("The sky is", " blue."), &row("Two plus two is", " four.")]);
    write(&b, &[&row("The sky is", " green today."), &row("Two plus two is", " five.")]);
    let out = dir.join("out");
    let judge = format!("reward:{}", rm.display());
    let o = run_eval(&c, &b, &judge, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("comparisons-cand.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let tok = prospect::model::HfTokenizer::load(&rm).unwrap();
    let mut ids = vec![];
    let mut ours = vec![];
    for e in &log {
        for (side, key) in [("candidate", "candidate_score"), ("baseline", "baseline_score")] {
            let seq = prospect::data::tokenize_text(
                &tok,
                e["prompt"].as_str().unwrap(),
                e[side].as_str().unwrap(),
                &mut Default::default(),
            )
            .unwrap();
            ids.push(seq.prompt_ids.iter().chain(&seq.completion_ids).copied().collect::<Vec<u32>>());
            ours.push(e[key].as_f64().unwrap());
        }
    }
    let width = ids.iter().map(Vec::len).max().unwrap();
    let padded: Vec<Vec<u32>> = ids
        .iter()
        .map(|r| r.iter().copied().chain(std::iter::repeat(tok.pad_token_id)).take(width).collect())
        .collect();
    (log, padded, ours)
}

#[test]
fn reward_judge_scores_as_the_library_does_and_verdicts_follow_the_scores() {
    let (log, ids, logged) = reward_judge_run("eval-reward");
    assert_eq!(log.len(), 2);
    // The binary's scores are the library's reward model on the same right-padded ids (transformers'
    // scores of this folder are checked by `reward_judge_scores_as_transformers_does`, live-reference).
    let dev = candle_core::Device::Cpu;
    let rm = prospect::model::load_frozen_reward(&fixtures().join("tiny-llama-rm"), &dev).unwrap();
    let pad = prospect::model::HfTokenizer::load(&fixtures().join("tiny-llama-rm")).unwrap().pad_token_id;
    let want: Vec<f32> = rm.scores(&candle_core::Tensor::new(ids, &dev).unwrap(), pad).unwrap().to_vec1().unwrap();
    for (o, w) in logged.iter().zip(&want) {
        assert!((o - *w as f64).abs() < 1e-5, "binary {logged:?} vs library {want:?}");
    }
    assert!((logged[0] - logged[1]).abs() > 1e-6, "the two completions must score differently: {logged:?}");
    for e in &log {
        let (cs, bs) = (e["candidate_score"].as_f64().unwrap(), e["baseline_score"].as_f64().unwrap());
        let want = if cs > bs {
            "candidate"
        } else if cs < bs {
            "baseline"
        } else {
            "tie"
        };
        assert_eq!(e["verdict"], want);
    }
}

#[test]
fn an_unknown_judge_is_a_usage_error_with_the_known_rules() {
    let dir = scratch("eval-bad-judge");
    let (c, b) = generation_files(&dir);
    let out = dir.join("out");
    let o = run_eval(&c, &b, "rule:nope", &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid value 'rule:nope' for '--judge <JUDGE>': unknown rule `nope` (known: polite-reply)"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a bad flag");
}

#[test]
#[cfg(feature = "live-reference")]
fn reward_judge_scores_as_transformers_does() {
    // Each completion's score must equal what transformers gives prompt + completion + eos.
    let (_, padded, ours) = reward_judge_run("eval-reward-live");
    let python = std::env::var("PROSPECT_PYTHON")
        .expect("PROSPECT_PYTHON is not set: run through `bash scripts/test.sh`, which sets up the reference Python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hf_scores.py");
    let run = std::process::Command::new(&python)
        .arg(script)
        .arg(fixtures().join("tiny-llama-rm"))
        .arg(serde_json::to_string(&padded).unwrap())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run PROSPECT_PYTHON={python}: {e}"));
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let want: Vec<f64> =
        serde_json::from_value(serde_json::from_slice::<serde_json::Value>(&run.stdout).unwrap()["scores"].clone())
            .unwrap();
    assert_eq!(want.len(), ours.len());
    for (o, w) in ours.iter().zip(&want) {
        assert!((o - w).abs() < 1e-4, "Prospect {ours:?} vs transformers {want:?}");
    }
}
