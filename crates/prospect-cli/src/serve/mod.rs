//! `prospect serve`: a model behind an OpenAI-compatible API and a small chat page, every answer and every
//! thumb stored in the feedback database (`prospect::feedback`), which `prospect train` reads directly.
//!
//! ```text
//! axum handlers (tokio)   parse, authorise, render the chat template, tokenize   routes.rs
//!      │ Job (rows + an event channel)
//!      ▼
//! decode thread           gathers the jobs that arrive within `--batch-window-ms` (up to `--max-batch`
//!                         rows) and decodes them as one batch: prospect::eval::generate::decode_rows,
//!                         each row with its own seed, so an answer does not depend on its batch mates
//!      │ text pieces, then the finished generation, per row
//!      ▼
//! handler                 a JSON response, or server-sent events; the answer goes into the database
//! ```

mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use prospect::data::ChatTemplate;
use prospect::eval::generate::{decode_rows, Rngs, RowSpec};
use prospect::eval::Generation;
use prospect::feedback::{DbUrl, FeedbackDb};
use prospect::model::{CausalLm, HfTokenizer, ModelSource};
use rand::SeedableRng;

#[derive(Args)]
pub struct ServeArgs {
    /// Hugging Face model folder, or a PEFT adapter folder (applied to the base it names).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter to serve, unmerged, on `--model` as its base.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu", value_parser = crate::flags::device_spec)]
    device: String,
    /// Where answers and feedback go: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long, default_value = "sqlite://feedback.db")]
    db: String,
    /// The address to listen on; 127.0.0.1 keeps the server to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "PROSPECT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A separate key for POST /v1/feedback (default: the API key).
    #[arg(long, env = "PROSPECT_FEEDBACK_KEY", hide_env_values = true)]
    feedback_key: Option<String>,
    /// The model name in responses and /v1/models (default: the model folder's name).
    #[arg(long)]
    name: Option<String>,
    /// `max_tokens` when a request leaves it out.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Requests that arrive within this many milliseconds of each other are decoded as one batch.
    #[arg(long, default_value_t = 10)]
    batch_window_ms: u64,
    /// Rows (requests × n) decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
}

/// What a decoding row reports back to its request.
pub enum RowEvent {
    /// More of the row's text.
    Text(String),
    /// The row is finished.
    Done(Generation),
    /// Decoding failed.
    Failed(String),
}

/// A request's rows, sent to the decode thread.
pub struct Job {
    rows: Vec<RowSpec>,
    seeds: Vec<u64>,
    events: tokio::sync::mpsc::UnboundedSender<(usize, RowEvent)>,
}

/// What the handlers share.
pub struct AppState {
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    db: FeedbackDb,
    tok: HfTokenizer,
    template: ChatTemplate,
    model_name: String,
    adapter: Option<String>,
    context: usize,
    default_max_tokens: usize,
    api_key: Option<String>,
    feedback_key: Option<String>,
    metrics: routes::Metrics,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let device = crate::flags::open_device(&a.device)?;
    let source = ModelSource::resolve(&a.model, a.adapter.as_deref())?;
    let tok = HfTokenizer::load(source.tokenizer_dir())?;
    let template = ChatTemplate::for_tokenizer(&tok, None).with_context(|| {
        format!("{} has no usable chat template, which serving conversations needs", source.tokenizer_dir().display())
    })?;
    let model = prospect::model::load_frozen_source(&source, &device)?;
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    let db_url = DbUrl::parse(&a.db)?;
    let db = FeedbackDb::open(&db_url)?;
    let model_name = a.name.clone().unwrap_or_else(|| {
        let dir = source.adapter.as_ref().unwrap_or(&source.base);
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "prospect".into())
    });
    let (tx, rx) = mpsc::channel::<Job>();
    let decode_tok = tok.clone();
    let (window, max_batch) = (Duration::from_millis(a.batch_window_ms), a.max_batch.max(1));
    let metrics = routes::Metrics::new();
    let batch_rows = metrics.batch_rows.clone();
    std::thread::spawn(move || {
        decode_loop(&model, &decode_tok, &rx, Batching { window, max_batch, batch_rows }, &device)
    });
    let state = Arc::new(AppState {
        jobs: std::sync::Mutex::new(tx),
        db,
        tok,
        template,
        model_name,
        adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
        context,
        default_max_tokens: a.default_max_tokens,
        api_key: a.api_key,
        feedback_key: a.feedback_key,
        metrics,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        eprintln!(
            "serving {} on http://{addr} (answers and feedback in {})",
            state.model_name,
            db_url.display().display()
        );
        let app = routes::router(state, a.max_body_bytes);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the server stopped")
    })
}

/// How the decode thread forms batches.
struct Batching {
    window: Duration,
    max_batch: usize,
    batch_rows: prometheus_client::metrics::histogram::Histogram,
}

/// The decode thread: take a job, gather those that follow within the window, decode them as one batch,
/// report each row's text and result to its job.
fn decode_loop(
    model: &CausalLm,
    tok: &HfTokenizer,
    rx: &mpsc::Receiver<Job>,
    batching: Batching,
    device: &candle_core::Device,
) {
    while let Ok(first) = rx.recv() {
        let started = Instant::now();
        let mut jobs = vec![first];
        while jobs.iter().map(|j| j.rows.len()).sum::<usize>() < batching.max_batch {
            let left = batching.window.saturating_sub(started.elapsed());
            match rx.recv_timeout(left) {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Row k of the batch belongs to job owner[k].0, as its row owner[k].1.
        let mut rows = Vec::new();
        let mut rngs = Vec::new();
        let mut owner = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            for (r, (row, seed)) in job.rows.iter().zip(&job.seeds).enumerate() {
                rows.push(row.clone());
                rngs.push(rand::rngs::StdRng::seed_from_u64(*seed));
                owner.push((j, r));
            }
        }
        batching.batch_rows.observe(rows.len() as f64);
        let send = |k: usize, e: RowEvent| {
            let (j, r) = owner[k];
            let _ = jobs[j].events.send((r, e)); // a client that went away is not an error
        };
        let result = decode_rows(model, tok, &rows, Rngs::PerRow(rngs), device, &mut |_| {}, &mut |k, text| {
            send(k, RowEvent::Text(text.to_string()))
        });
        match result {
            Ok(gens) => gens.into_iter().enumerate().for_each(|(k, g)| send(k, RowEvent::Done(g))),
            Err(e) => (0..rows.len()).for_each(|k| send(k, RowEvent::Failed(e.to_string()))),
        }
    }
}
