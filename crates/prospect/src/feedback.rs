//! The feedback database: every answer `prospect serve` gives, and every thumb up or down on it, as
//! KTO's training data.
//!
//! `sqlite://PATH` is an SQLite file (bundled SQLite, WAL mode, foreign keys on). The schema is versioned:
//! `schema_version` holds the version, and [`MIGRATIONS`] brings an older file up to date at open, in one
//! transaction. All SQL is parameterised.
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

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The schema, one entry per version: entry k takes a database from version k to k + 1.
pub const MIGRATIONS: &[&str] = &["
    CREATE TABLE answers (
        id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        model TEXT NOT NULL,
        adapter TEXT,
        messages TEXT NOT NULL,
        completion TEXT NOT NULL,
        params TEXT NOT NULL,
        finish TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL
    );
    CREATE TABLE feedback (
        answer_id TEXT NOT NULL REFERENCES answers(id),
        user_id TEXT NOT NULL,
        label INTEGER NOT NULL CHECK (label IN (0, 1)),
        comment TEXT,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (answer_id, user_id)
    );
    CREATE INDEX feedback_created ON feedback(created_ms);
"];

/// A database URL: where, and from when.
#[derive(Debug, Clone, PartialEq)]
pub struct DbUrl {
    pub path: PathBuf,
    /// Only thumbs given at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
}

impl DbUrl {
    /// Whether `text` names a database rather than a file.
    pub fn is_db(text: &str) -> bool {
        text.starts_with("sqlite://") || text.starts_with("postgres://") || text.starts_with("postgresql://")
    }

    /// `sqlite://PATH[?since=TIME]`. PostgreSQL URLs are recognised and refused with a clear error.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |m: String| Error::config("db", format!("{m}; expected sqlite://PATH[?since=TIME], got {text:?}"));
        if text.starts_with("postgres") {
            return Err(bad("PostgreSQL is not supported yet".into()));
        }
        let rest = text.strip_prefix("sqlite://").ok_or_else(|| bad("not a database URL".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(bad("no file path".into()));
        }
        let mut since_ms = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("since", t)) => since_ms = Some(parse_time(t).map_err(bad)?),
                _ => return Err(bad(format!("unknown query `{pair}` (known: since)"))),
            }
        }
        Ok(Self { path: PathBuf::from(path), since_ms })
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

/// An open feedback database. One connection, shared behind a lock (SQLite writes are serial anyway).
pub struct FeedbackDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::DataFile { path: path.to_path_buf(), message: format!("database: {e}") }
}

impl FeedbackDb {
    /// Open (creating if needed) and migrate to the current schema.
    pub fn open(url: &DbUrl) -> Result<Self> {
        let path = url.path.clone();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut conn = Connection::open(&path).map_err(|e| db_err(&path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| db_err(&path, e))?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(|e| db_err(&path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| db_err(&path, e))?;
        migrate(&mut conn).map_err(|e| db_err(&path, e))?;
        Ok(Self { conn: Mutex::new(conn), path })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64> {
        version(&self.conn()).map_err(|e| db_err(&self.path, e))
    }

    pub fn insert_answer(&self, a: &Answer) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO answers (id, created_ms, model, adapter, messages, completion, params, finish, \
                 prompt_tokens, completion_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    a.id,
                    a.created_ms,
                    a.model,
                    a.adapter,
                    a.messages.to_string(),
                    a.completion,
                    a.params.to_string(),
                    a.finish,
                    a.prompt_tokens as i64,
                    a.completion_tokens as i64
                ],
            )
            .map_err(|e| db_err(&self.path, e))?;
        Ok(())
    }

    /// Record a thumb; the same user's earlier thumb on the same answer is replaced.
    pub fn record(&self, t: &Thumb) -> Result<Recorded> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| db_err(&self.path, e))?;
        let known: Option<i64> = tx
            .query_row("SELECT 1 FROM answers WHERE id = ?1", params![t.answer_id], |r| r.get(0))
            .optional()
            .map_err(|e| db_err(&self.path, e))?;
        if known.is_none() {
            return Ok(Recorded::UnknownAnswer);
        }
        let earlier: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM feedback WHERE answer_id = ?1 AND user_id = ?2",
                params![t.answer_id, t.user],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err(&self.path, e))?;
        tx.execute(
            "INSERT INTO feedback (answer_id, user_id, label, comment, created_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (answer_id, user_id) DO UPDATE SET label = excluded.label, comment = excluded.comment, \
             created_ms = excluded.created_ms",
            params![t.answer_id, t.user, t.label as i64, t.comment, t.created_ms],
        )
        .map_err(|e| db_err(&self.path, e))?;
        tx.commit().map_err(|e| db_err(&self.path, e))?;
        Ok(if earlier.is_some() { Recorded::Replaced } else { Recorded::New })
    }

    /// Every thumb (at or after `since_ms`) with its answer, oldest first.
    pub fn thumbs(&self, since_ms: Option<i64>) -> Result<Vec<(Thumb, Answer)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT f.answer_id, f.user_id, f.label, f.comment, f.created_ms, a.created_ms, a.model, a.adapter, \
                 a.messages, a.completion, a.params, a.finish, a.prompt_tokens, a.completion_tokens \
                 FROM feedback f JOIN answers a ON a.id = f.answer_id WHERE f.created_ms >= ?1 \
                 ORDER BY f.created_ms, f.answer_id, f.user_id",
            )
            .map_err(|e| db_err(&self.path, e))?;
        let json = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
        let rows = stmt
            .query_map(params![since_ms.unwrap_or(i64::MIN)], |r| {
                let thumb = Thumb {
                    answer_id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get::<_, i64>(2)? == 1,
                    comment: r.get(3)?,
                    created_ms: r.get(4)?,
                };
                let answer = Answer {
                    id: thumb.answer_id.clone(),
                    created_ms: r.get(5)?,
                    model: r.get(6)?,
                    adapter: r.get(7)?,
                    messages: json(r.get(8)?),
                    completion: r.get(9)?,
                    params: json(r.get(10)?),
                    finish: r.get(11)?,
                    prompt_tokens: r.get::<_, i64>(12)? as usize,
                    completion_tokens: r.get::<_, i64>(13)? as usize,
                };
                Ok((thumb, answer))
            })
            .map_err(|e| db_err(&self.path, e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| db_err(&self.path, e))
    }
}

fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
}

/// Bring the database to `MIGRATIONS.len()`, in one transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: Option<i64> = tx.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).optional()?;
    if current.is_none() {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", [])?;
    }
    let current = current.unwrap_or(0).max(0) as usize;
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {current}, newer than this binary's {}",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[current..] {
        tx.execute_batch(sql)?;
    }
    tx.execute("UPDATE schema_version SET version = ?1", params![MIGRATIONS.len() as i64])?;
    tx.commit()
}

/// The thumbs of `url` as JSONL in TRL's conversational unpaired format, one row per thumb:
/// `{"prompt": [messages], "completion": [{"role": "assistant", "content": ...}], "label": bool}`.
pub fn export_jsonl(url: &DbUrl) -> Result<Vec<u8>> {
    if !url.path.is_file() {
        return Err(Error::DataFile {
            path: url.path.clone(),
            message: "no such feedback database (prospect serve --db sqlite://PATH creates one)".into(),
        });
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
        return Err(Error::DataFile { path: url.path.clone(), message: "the database holds no feedback yet".into() });
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
        assert_eq!(u.path, PathBuf::from("runs/feedback.db"));
        // python3 -c "import datetime; print(int(datetime.datetime(2026,12,1,tzinfo=datetime.timezone.utc).timestamp()*1000))"
        assert_eq!(u.since_ms, Some(1_796_083_200_000));
        assert_eq!(DbUrl::parse("sqlite:///abs/f.db?since=10").unwrap().since_ms, Some(10_000));
        for (bad, why) in [
            ("sqlite://", "no file path"),
            ("sqlite://f.db?until=3", "unknown query `until=3`"),
            ("sqlite://f.db?since=yesterday", "not RFC 3339"),
            ("postgres://u@h/db", "PostgreSQL is not supported yet"),
        ] {
            let e = DbUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
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
