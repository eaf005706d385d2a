//! The feedback database: every answer `prospect serve` gives, and every thumb up or down on it, as
//! KTO's training data.
//!
//! - `sqlite://PATH` is an SQLite file (bundled SQLite, WAL mode, foreign keys on).
//! - `postgres://USER:PASSWORD@HOST:PORT/DB` is a PostgreSQL database (the `postgres` crate, without TLS:
//!   reach a remote server through a tunnel or a local socket).
//!
//! The schema is versioned: `schema_version` holds the version, and [`MIGRATIONS`] bring an older database
//! up to date at open, in one transaction. Every query is the same parameterised SQL on both backends (`$1`, `$2`, ...: SQLite reads
//! them as numbered parameters), with values as [`Sql`].
//!
//! ```text
//! answers  (id PK, created_ms, model, adapter, messages JSON, completion, params JSON, finish,
//!           prompt_tokens, completion_tokens)
//! feedback (answer_id → answers.id, user_id, label 0/1, comment, created_ms; PK (answer_id, user_id))
//! ```
//!
//! A second thumb from the same user on the same answer replaces the first. Training reads one row per
//! thumb: the answer's conversation as the prompt, its completion as an assistant message, the thumb as
//! the label ([`export_jsonl`]). That is TRL's conversational unpaired format, so `train_data =
//! "sqlite://feedback.db"` goes through the same layout detection as a file. `?since=TIME` (RFC 3339, or
//! Unix seconds) keeps only the thumbs given at or after TIME.

use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The schema, one entry per version: entry k takes a database from version k to k + 1. `INT64` is
/// SQLite's `INTEGER` and PostgreSQL's `BIGINT` ([`migrations`]).
pub const MIGRATIONS: &[&str] = &["
    CREATE TABLE answers (
        id TEXT PRIMARY KEY,
        created_ms INT64 NOT NULL,
        model TEXT NOT NULL,
        adapter TEXT,
        messages TEXT NOT NULL,
        completion TEXT NOT NULL,
        params TEXT NOT NULL,
        finish TEXT NOT NULL,
        prompt_tokens INT64 NOT NULL,
        completion_tokens INT64 NOT NULL
    );
    CREATE TABLE feedback (
        answer_id TEXT NOT NULL REFERENCES answers(id),
        user_id TEXT NOT NULL,
        label INT64 NOT NULL CHECK (label IN (0, 1)),
        comment TEXT,
        created_ms INT64 NOT NULL,
        PRIMARY KEY (answer_id, user_id)
    );
    CREATE INDEX feedback_created ON feedback(created_ms);
"];

/// [`MIGRATIONS`] in one backend's integer type.
pub fn migrations(int64: &str) -> Vec<String> {
    MIGRATIONS.iter().map(|m| m.replace("INT64", int64)).collect()
}

/// Which database.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` connection URL (without `since`).
    Postgres(String),
}

/// A database URL: where, and from when.
#[derive(Debug, Clone, PartialEq)]
pub struct DbUrl {
    pub location: Location,
    /// Only thumbs given at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
}

impl DbUrl {
    /// Whether `text` names a database rather than a file.
    pub fn is_db(text: &str) -> bool {
        text.starts_with("sqlite://") || text.starts_with("postgres://") || text.starts_with("postgresql://")
    }

    /// `sqlite://PATH[?since=TIME]` or `postgres://USER:PASSWORD@HOST:PORT/DB[?since=TIME&...]` (other
    /// query keys go to the PostgreSQL connection).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |m: String| {
            Error::config(
                "db",
                format!("{m}; expected sqlite://PATH or postgres://USER:PASSWORD@HOST/DB, with ?since=TIME if wanted, got {:?}", mask(text)),
            )
        };
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let mut since_ms = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("since", t)) => since_ms = Some(parse_time(t).map_err(bad)?),
                _ => rest.push(pair),
            }
        }
        let location = if let Some(path) = base.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad("no file path".into()));
            }
            if let Some(pair) = rest.first() {
                return Err(bad(format!("unknown query `{pair}` (known: since)")));
            }
            Location::Sqlite(PathBuf::from(path))
        } else if base.starts_with("postgres://") || base.starts_with("postgresql://") {
            let query = if rest.is_empty() { String::new() } else { format!("?{}", rest.join("&")) };
            Location::Postgres(format!("{base}{query}"))
        } else {
            return Err(bad("not a database URL".into()));
        };
        Ok(Self { location, since_ms })
    }

    /// The database as messages name it: the file, or the URL without its password.
    pub fn display(&self) -> PathBuf {
        match &self.location {
            Location::Sqlite(p) => p.clone(),
            Location::Postgres(url) => PathBuf::from(mask(url)),
        }
    }
}

/// A URL with the password replaced by `***`.
fn mask(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            format!("{scheme}://{}:***@{host}", user.split(':').next().unwrap_or(""))
        }
        _ => url.to_string(),
    }
}

/// RFC 3339 (`2026-12-01T00:00:00Z`) or Unix seconds, as Unix milliseconds.
pub fn parse_time(t: &str) -> std::result::Result<i64, String> {
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(secs * 1000);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|e| format!("`since={t}` is not RFC 3339 or Unix seconds ({e})"))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One answer the server gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    pub created_ms: i64,
    pub model: String,
    pub adapter: Option<String>,
    /// The conversation it answered: `[{role, content}, ...]`.
    pub messages: serde_json::Value,
    pub completion: String,
    /// The sampling parameters it was generated with.
    pub params: serde_json::Value,
    pub finish: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A thumb on an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thumb {
    pub answer_id: String,
    /// `""` for an anonymous thumb.
    pub user: String,
    pub label: bool,
    pub comment: Option<String>,
    pub created_ms: i64,
}

/// What recording a thumb did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// The user's earlier thumb on this answer was replaced.
    Replaced,
    /// No answer has this id.
    UnknownAnswer,
}

/// A value bound to or read from a query: the schema's columns are integers and (nullable) text.
#[derive(Debug, Clone, PartialEq)]
pub enum Sql {
    Int(i64),
    Text(Option<String>),
}

impl Sql {
    fn text(s: &str) -> Self {
        Sql::Text(Some(s.to_string()))
    }

    fn int(&self) -> i64 {
        match self {
            Sql::Int(i) => *i,
            Sql::Text(_) => 0,
        }
    }

    fn string(&self) -> Option<String> {
        match self {
            Sql::Text(s) => s.clone(),
            Sql::Int(i) => Some(i.to_string()),
        }
    }
}

/// The open connection.
enum Backend {
    Sqlite(Connection),
    Postgres(Box<postgres::Client>),
}

/// An open feedback database. One connection, shared behind a lock (SQLite writes are serial anyway).
pub struct FeedbackDb {
    conn: Mutex<Backend>,
    /// For messages: the file, or the URL without its password.
    name: PathBuf,
}

impl Backend {
    /// Run statements with no parameters and no result (DDL, BEGIN / COMMIT).
    fn batch(&mut self, sql: &str) -> std::result::Result<(), String> {
        match self {
            Backend::Sqlite(c) => c.execute_batch(sql).map_err(|e| e.to_string()),
            Backend::Postgres(c) => c.batch_execute(sql).map_err(|e| e.to_string()),
        }
    }

    fn execute(&mut self, sql: &str, params: &[Sql]) -> std::result::Result<u64, String> {
        match self {
            Backend::Sqlite(c) => c
                .execute(sql, rusqlite::params_from_iter(params.iter().map(sqlite_value)))
                .map(|n| n as u64)
                .map_err(|e| e.to_string()),
            Backend::Postgres(c) => {
                let boxed = postgres_values(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
                c.execute(sql, &refs).map_err(|e| e.to_string())
            }
        }
    }

    /// Rows of a query whose columns are integers where `ints[i]` is true and text elsewhere.
    fn query(&mut self, sql: &str, params: &[Sql], ints: &[bool]) -> std::result::Result<Vec<Vec<Sql>>, String> {
        match self {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare(sql).map_err(|e| e.to_string())?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params.iter().map(sqlite_value)), |r| {
                        (0..ints.len())
                            .map(|i| {
                                Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                                    rusqlite::types::Value::Integer(v) => Sql::Int(v),
                                    rusqlite::types::Value::Text(t) => Sql::Text(Some(t)),
                                    _ => Sql::Text(None),
                                })
                            })
                            .collect::<rusqlite::Result<Vec<Sql>>>()
                    })
                    .map_err(|e| e.to_string())?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| e.to_string())
            }
            Backend::Postgres(c) => {
                let boxed = postgres_values(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
                let rows = c.query(sql, &refs).map_err(|e| e.to_string())?;
                rows.iter()
                    .map(|r| {
                        ints.iter()
                            .enumerate()
                            .map(|(i, &int)| {
                                if int {
                                    r.try_get::<_, i64>(i).map(Sql::Int)
                                } else {
                                    r.try_get::<_, Option<String>>(i).map(Sql::Text)
                                }
                            })
                            .collect::<std::result::Result<Vec<Sql>, _>>()
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            }
        }
    }

    /// `f` inside BEGIN … COMMIT (ROLLBACK when it fails).
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Backend) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        self.batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

fn sqlite_value(v: &Sql) -> rusqlite::types::Value {
    match v {
        Sql::Int(i) => rusqlite::types::Value::Integer(*i),
        Sql::Text(Some(s)) => rusqlite::types::Value::Text(s.clone()),
        Sql::Text(None) => rusqlite::types::Value::Null,
    }
}

fn postgres_values(params: &[Sql]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                Sql::Int(i) => Box::new(*i),
                Sql::Text(s) => Box::new(s.clone()),
            }
        })
        .collect()
}

/// The columns [`FeedbackDb::thumbs`] reads: which are integers.
const THUMB_COLUMNS: [bool; 14] =
    [false, false, true, false, true, true, false, false, false, false, false, false, true, true];

impl FeedbackDb {
    /// Open (creating an SQLite file if needed) and migrate to the current schema.
    pub fn open(url: &DbUrl) -> Result<Self> {
        let name = url.display();
        let err = |m: String| Error::DataFile { path: name.clone(), message: format!("database: {m}") };
        let (mut backend, migrations) = match &url.location {
            Location::Sqlite(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
                conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| err(e.to_string()))?;
                conn.pragma_update(None, "foreign_keys", "ON").map_err(|e| err(e.to_string()))?;
                conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| err(e.to_string()))?;
                (Backend::Sqlite(conn), migrations("INTEGER"))
            }
            Location::Postgres(conn_url) => {
                let client = postgres::Client::connect(conn_url, postgres::NoTls).map_err(|e| err(e.to_string()))?;
                (Backend::Postgres(Box::new(client)), migrations("BIGINT"))
            }
        };
        migrate(&mut backend, &migrations).map_err(err)?;
        Ok(Self { conn: Mutex::new(backend), name })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Backend) -> std::result::Result<T, String>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|m| Error::DataFile { path: self.name.clone(), message: format!("database: {m}") })
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.with(|c| version(c).map(|v| v.unwrap_or(0)))
    }

    pub fn insert_answer(&self, a: &Answer) -> Result<()> {
        let params = [
            Sql::text(&a.id),
            Sql::Int(a.created_ms),
            Sql::text(&a.model),
            Sql::Text(a.adapter.clone()),
            Sql::text(&a.messages.to_string()),
            Sql::text(&a.completion),
            Sql::text(&a.params.to_string()),
            Sql::text(&a.finish),
            Sql::Int(a.prompt_tokens as i64),
            Sql::Int(a.completion_tokens as i64),
        ];
        self.with(|c| {
            c.execute(
                "INSERT INTO answers (id, created_ms, model, adapter, messages, completion, params, finish, \
                 prompt_tokens, completion_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &params,
            )
            .map(drop)
        })
    }

    /// Record a thumb; the same user's earlier thumb on the same answer is replaced.
    pub fn record(&self, t: &Thumb) -> Result<Recorded> {
        let (id, user) = (Sql::text(&t.answer_id), Sql::text(&t.user));
        self.with(|c| {
            c.transaction(|c| {
                if c.query("SELECT id FROM answers WHERE id = $1", std::slice::from_ref(&id), &[false])?.is_empty() {
                    return Ok(Recorded::UnknownAnswer);
                }
                let earlier = c.query(
                    "SELECT label FROM feedback WHERE answer_id = $1 AND user_id = $2",
                    &[id.clone(), user.clone()],
                    &[true],
                )?;
                c.execute(
                    "INSERT INTO feedback (answer_id, user_id, label, comment, created_ms) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (answer_id, user_id) DO UPDATE SET label = excluded.label, \
                     comment = excluded.comment, created_ms = excluded.created_ms",
                    &[id.clone(), user.clone(), Sql::Int(t.label as i64), Sql::Text(t.comment.clone()), Sql::Int(t.created_ms)],
                )?;
                Ok(if earlier.is_empty() { Recorded::New } else { Recorded::Replaced })
            })
        })
    }

    /// Every thumb (at or after `since_ms`) with its answer, oldest first.
    pub fn thumbs(&self, since_ms: Option<i64>) -> Result<Vec<(Thumb, Answer)>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT f.answer_id, f.user_id, f.label, f.comment, f.created_ms, a.created_ms, a.model, a.adapter, \
                 a.messages, a.completion, a.params, a.finish, a.prompt_tokens, a.completion_tokens \
                 FROM feedback f JOIN answers a ON a.id = f.answer_id WHERE f.created_ms >= $1 \
                 ORDER BY f.created_ms, f.answer_id, f.user_id",
                &[Sql::Int(since_ms.unwrap_or(i64::MIN))],
                &THUMB_COLUMNS,
            )
        })?;
        let json = |v: &Sql| v.string().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(serde_json::Value::Null);
        Ok(rows
            .into_iter()
            .map(|r| {
                let thumb = Thumb {
                    answer_id: r[0].string().unwrap_or_default(),
                    user: r[1].string().unwrap_or_default(),
                    label: r[2].int() == 1,
                    comment: r[3].string(),
                    created_ms: r[4].int(),
                };
                let answer = Answer {
                    id: thumb.answer_id.clone(),
                    created_ms: r[5].int(),
                    model: r[6].string().unwrap_or_default(),
                    adapter: r[7].string(),
                    messages: json(&r[8]),
                    completion: r[9].string().unwrap_or_default(),
                    params: json(&r[10]),
                    finish: r[11].string().unwrap_or_default(),
                    prompt_tokens: r[12].int() as usize,
                    completion_tokens: r[13].int() as usize,
                };
                (thumb, answer)
            })
            .collect())
    }
}

fn version(c: &mut Backend) -> std::result::Result<Option<i64>, String> {
    Ok(c.query("SELECT version FROM schema_version", &[], &[true])?.first().map(|r| r[0].int()))
}

/// Bring the database to `migrations.len()`, in one transaction.
fn migrate(c: &mut Backend, migrations: &[String]) -> std::result::Result<(), String> {
    c.transaction(|c| {
        c.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        let current = match version(c)? {
            Some(v) => v.max(0) as usize,
            None => {
                c.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
                0
            }
        };
        if current > migrations.len() {
            return Err(format!(
                "the database has schema version {current}, newer than this binary's {}",
                migrations.len()
            ));
        }
        for sql in &migrations[current..] {
            c.batch(sql)?;
        }
        c.execute("UPDATE schema_version SET version = $1", &[Sql::Int(migrations.len() as i64)]).map(drop)
    })
}

/// The thumbs of `url` as JSONL in TRL's conversational unpaired format, one row per thumb:
/// `{"prompt": [messages], "completion": [{"role": "assistant", "content": ...}], "label": bool}`.
pub fn export_jsonl(url: &DbUrl) -> Result<Vec<u8>> {
    if let Location::Sqlite(path) = &url.location {
        if !path.is_file() {
            return Err(Error::DataFile {
                path: path.clone(),
                message: "no such feedback database (prospect serve --db sqlite://PATH creates one)".into(),
            });
        }
    }
    let db = FeedbackDb::open(url)?;
    let mut out = Vec::new();
    for (thumb, answer) in db.thumbs(url.since_ms)? {
        let row = serde_json::json!({
            "prompt": answer.messages,
            "completion": [{"role": "assistant", "content": answer.completion}],
            "label": thumb.label,
        });
        out.extend_from_slice(row.to_string().as_bytes());
        out.push(b'\n');
    }
    if out.is_empty() {
        return Err(Error::DataFile { path: url.display(), message: "the database holds no feedback yet".into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: &str) -> Answer {
        Answer {
            id: id.into(),
            created_ms: 1,
            model: "m".into(),
            adapter: None,
            messages: serde_json::json!([{"role": "user", "content": format!("q {id}")}]),
            completion: format!("a {id}"),
            params: serde_json::json!({"temperature": 0.0}),
            finish: "stop".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
        }
    }

    fn thumb(id: &str, user: &str, label: bool, at: i64) -> Thumb {
        Thumb { answer_id: id.into(), user: user.into(), label, comment: None, created_ms: at }
    }

    #[test]
    fn urls_parse_and_name_what_is_wrong() {
        let u = DbUrl::parse("sqlite://runs/feedback.db?since=2026-12-01T00:00:00Z").unwrap();
        assert_eq!(u.location, Location::Sqlite(PathBuf::from("runs/feedback.db")));
        // python3 -c "import datetime; print(int(datetime.datetime(2026,12,1,tzinfo=datetime.timezone.utc).timestamp()*1000))"
        assert_eq!(u.since_ms, Some(1_796_083_200_000));
        assert_eq!(DbUrl::parse("sqlite:///abs/f.db?since=10").unwrap().since_ms, Some(10_000));
        // `since` is ours; the other keys belong to the PostgreSQL connection. The password never shows.
        let p = DbUrl::parse("postgres://ann:s3cret@db.local:5433/fb?since=10&connect_timeout=5").unwrap();
        assert_eq!(p.location, Location::Postgres("postgres://ann:s3cret@db.local:5433/fb?connect_timeout=5".into()));
        assert_eq!(p.since_ms, Some(10_000));
        assert_eq!(p.display(), PathBuf::from("postgres://ann:***@db.local:5433/fb?connect_timeout=5"));
        for (bad, why) in [
            ("sqlite://", "no file path"),
            ("sqlite://f.db?until=3", "unknown query `until=3`"),
            ("sqlite://f.db?since=yesterday", "not RFC 3339"),
            ("mysql://u@h/db", "not a database URL"),
        ] {
            let e = DbUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = DbUrl::parse("postgres://ann:s3cret@h/db?since=never").unwrap_err().to_string();
        assert!(e.contains("ann:***@h") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn thumbs_replace_per_user_and_export_one_row_each() {
        let dir = std::env::temp_dir().join(format!("prospect-feedback-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = DbUrl::parse(&format!("sqlite://{}/f.db", dir.display())).unwrap();
        let db = FeedbackDb::open(&url).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        db.insert_answer(&answer("a1")).unwrap();
        db.insert_answer(&answer("a2")).unwrap();
        assert_eq!(db.record(&thumb("a1", "ann", true, 10)).unwrap(), Recorded::New);
        assert_eq!(db.record(&thumb("a1", "ann", false, 20)).unwrap(), Recorded::Replaced);
        assert_eq!(db.record(&thumb("a1", "bob", true, 30)).unwrap(), Recorded::New);
        assert_eq!(db.record(&thumb("a2", "", true, 40)).unwrap(), Recorded::New);
        assert_eq!(db.record(&thumb("nope", "", true, 50)).unwrap(), Recorded::UnknownAnswer);
        let got: Vec<(String, String, bool)> =
            db.thumbs(None).unwrap().into_iter().map(|(t, _)| (t.answer_id, t.user, t.label)).collect();
        let want = [("a1", "ann", false), ("a1", "bob", true), ("a2", "", true)];
        assert_eq!(got, want.map(|(a, u, l)| (a.to_string(), u.to_string(), l)));
        assert_eq!(db.thumbs(Some(30)).unwrap().len(), 2);
        drop(db);
        // Reopening migrates nothing and keeps everything.
        let text = String::from_utf8(export_jsonl(&url).unwrap()).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"prompt": [{"role": "user", "content": "q a1"}],
                               "completion": [{"role": "assistant", "content": "a a1"}], "label": false})
        );
        assert_eq!(text.lines().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
