//! `prospect serve` against a real HTTP client: greedy answers equal `prospect generate`'s, streaming gives
//! the same text, concurrent requests batched together get the answers they get alone; then the whole
//! loop on SQLite: 20 answers, 20 thumbs (one replaced), auth and error bodies, metrics, `data export`
//! and `prospect train` straight from the database.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{fixtures, prospect, scratch, stderr};
use serde_json::{json, Value};

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> PathBuf {
    fixtures().join("tiny-llama-chatpad")
}

fn serve(db_url: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prospect"))
        .args(["serve", "--model"])
        .arg(model())
        .args(["--db", db_url, "--port", "0"])
        .args(extra)
        .env_remove("PROSPECT_API_KEY")
        .env_remove("PROSPECT_FEEDBACK_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let base = loop {
        let line = lines.next().unwrap_or_else(|| panic!("the server exited:\n{}", seen.join("\n"))).unwrap();
        if let Some(addr) = line.split(" on http://").nth(1).and_then(|s| s.split(' ').next()) {
            break format!("http://{addr}");
        }
        seen.push(line);
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base }
}

/// POST JSON; the status and the body (error statuses included).
fn post(url: &str, body: &Value, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

fn chat(server: &Server, body: &Value, key: Option<&str>) -> Value {
    let (status, text) = post(&format!("{}/v1/chat/completions", server.base), body, key);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn ask(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

const PROMPTS: [&str; 3] = ["What is the capital of France?", "Name a colour.", "Count to three."];

#[test]
fn greedy_answers_equal_generate_and_streams_and_batches_agree() {
    let dir = scratch("serve-greedy");
    let prompts = dir.join("prompts.jsonl");
    let rows: Vec<String> = PROMPTS.iter().map(|p| json!({"prompt": ask(p)}).to_string()).collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let out = dir.join("generated.jsonl");
    let o = prospect(&[
        "generate",
        "--model",
        model().to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let generated: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let server = serve(&format!("sqlite://{}", dir.join("f.db").display()), &["--batch-window-ms", "300"]);

    for (p, g) in PROMPTS.iter().zip(&generated) {
        let r = chat(&server, &json!({"messages": ask(p), "temperature": 0, "max_tokens": 12}), None);
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(text, g["completion"].as_str().unwrap(), "greedy answer to {p:?}");
        let finish = if g["finish"] == "length" { "length" } else { "stop" };
        assert_eq!(r["choices"][0]["finish_reason"], finish);
        assert_eq!(r["usage"]["completion_tokens"], g["completion_ids"].as_array().unwrap().len());

        // The same request streamed: the pieces add up to the same text.
        let resp = ureq::post(&format!("{}/v1/chat/completions", server.base))
            .send_string(&json!({"messages": ask(p), "temperature": 0, "max_tokens": 12, "stream": true}).to_string())
            .unwrap();
        assert_eq!(resp.content_type(), "text/event-stream");
        let mut body = String::new();
        resp.into_reader().read_to_string(&mut body).unwrap();
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(streamed, text);
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], finish);
    }

    // Sampled answers, one at a time, then all six at once (one batch, within the 300 ms window): each
    // request's answer depends on its seed only.
    let request =
        |i: usize| json!({"messages": ask(PROMPTS[i % 3]), "temperature": 1.0, "seed": 100 + i, "max_tokens": 10});
    let alone: Vec<Value> = (0..6).map(|i| chat(&server, &request(i), None)["choices"][0]["message"].clone()).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let server = &server;
        let handles: Vec<_> = (0..6).map(|i| s.spawn(move || chat(server, &request(i), None))).collect();
        handles.into_iter().map(|h| h.join().unwrap()["choices"][0]["message"].clone()).collect()
    });
    assert_eq!(together, alone);
    let metrics = ureq::get(&format!("{}/metrics", server.base)).call().unwrap().into_string().unwrap();
    let batches = metric(&metrics, "prospect_batch_rows_count");
    let rows = metric(&metrics, "prospect_batch_rows_sum");
    assert_eq!(rows, 3.0 + 3.0 + 6.0 + 6.0, "{metrics}");
    assert!(batches < rows, "no two requests were ever decoded together:\n{metrics}");
}

/// The value of an unlabelled metric line.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Auth, bad bodies and bad requests are OpenAI-style error bodies; the page and the health check need no key.
fn errors_are_openai_style(url: &dyn Fn(&str) -> String) {
    let page = ureq::get(&url("/")).call().unwrap();
    assert_eq!(page.content_type(), "text/html");
    let html = page.into_string().unwrap();
    assert!(html.contains("fetch(\"/v1/chat/completions\"") && html.contains("fetch(\"/v1/feedback\""), "{html}");
    assert_eq!(ureq::get(&url("/healthz")).call().unwrap().into_string().unwrap(), "ok\n");
    let (status, text) = post(&url("/v1/chat/completions"), &json!({"messages": ask(&"x".repeat(5000))}), Some("k1"));
    assert_eq!(status, 413, "a body over --max-body-bytes: {text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string(), "{text}");
    let (status, text) = post(&url("/v1/chat/completions"), &json!({"messages": ask("hi")}), None);
    assert_eq!(status, 401, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "invalid_api_key");
    let resp = ureq::post(&url("/v1/chat/completions")).set("Authorization", "Bearer k1").send_string("{not json");
    let Err(ureq::Error::Status(400, r)) = resp else { panic!("malformed JSON must be a 400") };
    assert_eq!(
        serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let (status, text) = post(&url("/v1/chat/completions"), &json!({"messages": [], "max_tokens": 4}), Some("k1"));
    assert!(status == 400 && text.contains("`messages` must hold at least one message"), "{status} {text}");
}

#[test]
fn thumbs_go_into_sqlite_and_train_kto() {
    let dir = scratch("serve-loop-sqlite");
    feedback_loop(&format!("sqlite://{}", dir.join("feedback.db").display()), &dir);
}

/// The same loop on a real PostgreSQL server (scripts/setup_postgres.sh starts one; scripts/test.sh passes
/// its URL as PROSPECT_POSTGRES_URL). The tables are dropped first, so every run starts empty.
#[test]
#[cfg(feature = "live-reference")]
fn thumbs_go_into_postgres_and_train_kto() {
    let url = std::env::var("PROSPECT_POSTGRES_URL")
        .expect("PROSPECT_POSTGRES_URL must name a PostgreSQL database (scripts/setup_postgres.sh)");
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS feedback; DROP TABLE IF EXISTS answers; DROP TABLE IF EXISTS schema_version;",
        )
        .unwrap();
    feedback_loop(&url, &scratch("serve-loop-postgres"));
    let n: i64 = client.query_one("SELECT count(*) FROM feedback", &[]).unwrap().get(0);
    assert_eq!(n, 20, "the thumbs are rows of the PostgreSQL table");
}

/// Serve, answer 20 prompts, post 20 thumbs (one replaced), export, train KTO from the database.
fn feedback_loop(db_url: &str, dir: &Path) {
    let server = serve(db_url, &["--api-key", "k1", "--max-body-bytes", "4096"]);
    let url = |p: &str| format!("{}{p}", server.base);

    errors_are_openai_style(&url);

    // 20 answers, 20 thumbs; user u0 then changes their mind.
    let mut expected = Vec::new();
    for i in 0..20 {
        let messages = ask(&format!("Question number {i}: say something."));
        let r =
            chat(&server, &json!({"messages": messages, "temperature": 0.8, "seed": i, "max_tokens": 8}), Some("k1"));
        let id = r["choices"][0]["id"].as_str().unwrap().to_string();
        let completion = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let label = i % 3 != 0;
        let (status, text) =
            post(&url("/v1/feedback"), &json!({"id": id, "label": label, "user": format!("u{i}")}), Some("k1"));
        assert_eq!(status, 200, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["replaced"], false);
        expected.push((id, messages, completion, label));
    }
    let (status, text) =
        post(&url("/v1/feedback"), &json!({"id": expected[0].0, "label": true, "user": "u0"}), Some("k1"));
    assert_eq!((status, serde_json::from_str::<Value>(&text).unwrap()["replaced"].clone()), (200, json!(true)));
    expected[0].3 = true;
    let (status, text) = post(&url("/v1/feedback"), &json!({"id": "chatcmpl-nope", "label": true}), Some("k1"));
    assert_eq!(status, 404, "{text}");
    let metrics = ureq::get(&url("/metrics")).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("prospect_requests_total{endpoint=\"chat\",status=\"200\"} 20"), "{metrics}");
    assert!(metrics.contains("prospect_feedback_total{label=\"up\"} 14"), "{metrics}"); // 13 ups + the changed mind
    let models = ureq::get(&url("/v1/models")).set("Authorization", "Bearer k1").call().unwrap().into_string().unwrap();
    assert!(models.contains("\"id\":\"tiny-llama-chatpad\""), "{models}");
    drop(server);

    // The database as training rows: one per thumb, as posted.
    let export = dir.join("export.jsonl");
    let o = prospect(&["data", "export", "--db", db_url, export.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut rows: Vec<Value> =
        std::fs::read_to_string(&export).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut want: Vec<Value> = expected
        .iter()
        .map(|(_, m, c, l)| json!({"prompt": m, "completion": [{"role": "assistant", "content": c}], "label": l}))
        .collect();
    let key = |v: &Value| v.to_string();
    rows.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(rows, want);
    let o = prospect(&[
        "data",
        "export",
        "--db",
        &format!("{db_url}?since=2999-01-01T00:00:00Z"),
        dir.join("none.jsonl").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("holds no feedback"), "{}", stderr(&o));

    // KTO straight from the database; the trained model answers.
    let config = dir.join("kto.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ntrain_data = {db_url:?}\noutput_dir = {:?}\nbatch_size = 4\nmicrobatch_size = 2\nmax_steps = 2\nlearning_rate = 1e-4\nmax_length = 128\n[loss]\ntype = \"kto\"\n",
            model(),
            dir.join("run")
        ),
    )
    .unwrap();
    let o = prospect(&["train", "--config", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("20 records"), "{}", stderr(&o));
    let prompts = dir.join("p.jsonl");
    std::fs::write(&prompts, json!({"prompt": ask("hello")}).to_string()).unwrap();
    let o = prospect(&[
        "generate",
        "--model",
        dir.join("run/final").to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        dir.join("g.jsonl").to_str().unwrap(),
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}
