//! OpenAssistant (oasst1): a table of messages, one per record (`message_id`, `parent_id`, `role`
//! `prompter`/`assistant`, `text`, `rank`, `deleted`). Converted per tree, not per record: for each
//! message with two or more ranked assistant replies, replies of adjacent rank (rank 0 is best) are
//! paired, (0 vs 1), (1 vs 2), ..., and the prompt is the thread from the root. Deleted messages are
//! not part of the tree (counted as filtered). A message that is its own parent, or a `parent_id` chain
//! that comes back to itself, is an error at that message's line: it is not a tree.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::fields::{assistant, Fields};
use super::Converted;
use crate::data::rows::{Content, Message};
use crate::data::Shape;
use crate::error::Result;

pub(super) fn detect(obj: &Fields, _labelled: bool) -> Option<Shape> {
    ["message_id", "parent_id", "role", "text"].iter().all(|k| obj.contains_key(*k)).then_some(Shape::Paired)
}

/// A parent's ranked assistant replies as (rank, line, record).
type Replies<'a> = Vec<(i64, usize, &'a Fields)>;

/// The message table: live messages by id, and each parent's ranked assistant replies.
struct Tree<'a> {
    by_id: HashMap<&'a str, (usize, &'a Fields)>,
    children: HashMap<&'a str, Replies<'a>>,
    deleted: usize,
}

impl<'a> Tree<'a> {
    fn new(records: &'a [(usize, Fields)], skip: &mut dyn FnMut(usize, String) -> Result<()>) -> Result<Self> {
        let mut tree = Tree { by_id: HashMap::new(), children: HashMap::new(), deleted: 0 };
        for (line, obj) in records {
            let Some(id) = obj.get("message_id").and_then(Value::as_str) else {
                skip(*line, "field `message_id` must be a string".into())?;
                continue;
            };
            if obj.get("deleted").and_then(Value::as_bool) == Some(true) {
                tree.deleted += 1; // oasst1 marks removed messages; they are not part of the tree (counted).
                continue;
            }
            let parent = obj.get("parent_id").and_then(Value::as_str);
            if parent == Some(id) {
                skip(*line, format!("message {id:?} is its own parent (`parent_id` = `message_id`)"))?;
                continue;
            }
            tree.by_id.insert(id, (*line, obj));
            let rank = obj.get("rank").and_then(Value::as_f64);
            let role = obj.get("role").and_then(Value::as_str);
            if let (Some(p), Some(r), Some("assistant")) = (parent, rank, role) {
                tree.children.entry(p).or_default().push((r as i64, *line, obj));
            }
        }
        Ok(tree)
    }

    /// The thread from the root down to `start`, as messages. An error carries the line to report it at:
    /// the message that closes a `parent_id` cycle, or `None` for the reply's own line.
    fn thread(&self, start: &'a str) -> std::result::Result<Vec<Message>, (Option<usize>, String)> {
        let mut out = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut id: &str = start;
        loop {
            let Some((line, obj)) = self.by_id.get(id) else {
                return Err((
                    None,
                    format!("message {id:?} of this reply's thread is not in the file; expected whole message trees"),
                ));
            };
            if !seen.insert(id) {
                let message = format!(
                    "message {id:?} is its own ancestor: its `parent_id` chain comes back to it ({} messages); \
                     expected a tree",
                    seen.len()
                );
                return Err((Some(*line), message));
            }
            let fail = |m: String| (None, m);
            let text =
                obj.get("text").and_then(Value::as_str).ok_or_else(|| fail("field `text` must be a string".into()))?;
            let role = match obj.get("role").and_then(Value::as_str) {
                Some("prompter") => "user",
                Some("assistant") => "assistant",
                other => {
                    return Err(fail(format!("field `role` must be \"prompter\" or \"assistant\", got {other:?}")))
                }
            };
            out.push(Message::new(role, text));
            match obj.get("parent_id").and_then(Value::as_str) {
                Some(p) => id = p,
                None => break,
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// The pairs of a file's message trees, each with the line of its better reply, and the number of
/// deleted messages. A thread that cannot be built is skipped (or an error) at its first reply's line.
pub(super) fn pairs(
    records: &[(usize, Fields)],
    skip: &mut dyn FnMut(usize, String) -> Result<()>,
) -> Result<(Vec<(usize, Converted)>, usize)> {
    let tree = Tree::new(records, skip)?;
    let mut parents: Vec<(&str, &Replies)> =
        tree.children.iter().filter(|(_, c)| c.len() >= 2).map(|(p, c)| (*p, c)).collect();
    parents.sort_by_key(|(_, c)| c.iter().map(|x| x.1).min());
    let mut out = Vec::new();
    for (parent, replies) in parents {
        let mut replies = replies.clone();
        replies.sort_by_key(|(rank, line, _)| (*rank, *line));
        let prompt = match tree.thread(parent) {
            Ok(p) => p,
            Err((line, m)) => {
                skip(line.unwrap_or(replies[0].1), m)?;
                continue;
            }
        };
        let text = |o: &Fields| o.get("text").and_then(Value::as_str).unwrap_or_default().to_string();
        for w in replies.windows(2) {
            let pair = Converted::Paired(
                Content::Messages(prompt.clone()),
                assistant(&text(w[0].2)),
                assistant(&text(w[1].2)),
            );
            out.push((w[0].1, pair));
        }
    }
    Ok((out, tree.deleted))
}
