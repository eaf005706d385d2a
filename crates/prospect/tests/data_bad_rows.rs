//! Bad rows that used to be accepted silently (issue 10, "Silent acceptance"): each is an error with
//! the exact `FILE:LINE: ...` message.

use std::path::Path;

use prospect::data::read::parse_rows;
use prospect::data::ReadOptions;

fn err_with(text: &str, options: &ReadOptions) -> String {
    parse_rows(text.as_bytes(), Path::new("in.jsonl"), options).unwrap_err().to_string()
}

fn err(text: &str) -> String {
    err_with(text, &ReadOptions::default())
}

#[test]
fn a_duplicate_key_does_not_flip_a_label() {
    let text = "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n\
                {\"prompt\": \"c\", \"completion\": \"d\", \"label\": true, \"label\": false}\n";
    assert_eq!(
        err(text),
        "in.jsonl:2: duplicate key `label`: each key may appear once per object (a JSON reader would keep only the last)"
    );
}

const REPLIES: &str = r#"
{"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "best", "rank": 0}
{"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "second", "rank": 1}"#;

#[test]
fn oasst1_message_that_is_its_own_parent() {
    let text = format!(r#"{{"message_id": "p1", "parent_id": "p1", "role": "prompter", "text": "Hi"}}{REPLIES}"#);
    assert_eq!(err(&text), "in.jsonl:1: message \"p1\" is its own parent (`parent_id` = `message_id`)");
}

#[test]
fn oasst1_parent_cycle() {
    let text = format!(
        r#"{{"message_id": "p1", "parent_id": "q", "role": "prompter", "text": "Hi"}}
{{"message_id": "q", "parent_id": "p1", "role": "assistant", "text": "loop"}}{REPLIES}"#
    );
    assert_eq!(
        err(&text),
        "in.jsonl:1: message \"p1\" is its own ancestor: its `parent_id` chain comes back to it (2 messages); \
         expected a tree"
    );
    // Under skip_invalid the tree's pairs are skipped and counted, so nothing is left: the error says why.
    let skip = ReadOptions { skip_invalid: true, ..ReadOptions::default() };
    assert_eq!(
        err_with(&text, &skip),
        "in.jsonl: no usable rows: of 4 records, 1 rows were invalid (skipped under skip_invalid = true) and 0 left \
         out (oasst1 messages marked deleted); the first error: in.jsonl:1: message \"p1\" is its own ancestor: its \
         `parent_id` chain comes back to it (2 messages); expected a tree"
    );
}

#[test]
fn skip_invalid_with_every_row_invalid_shows_the_first_error() {
    let skip = ReadOptions { skip_invalid: true, ..ReadOptions::default() };
    // Every row has the TRL unpaired fields but a label that is not a boolean.
    let text: String =
        (0..16).map(|i| format!("{{\"prompt\": \"p{i}\", \"completion\": \"c\", \"label\": \"yes\"}}\n")).collect();
    assert_eq!(
        err_with(&text, &skip),
        "in.jsonl: no usable rows: every one of the 16 records was invalid (skipped under skip_invalid = true); the \
         first error: in.jsonl:1: field `label` must be true or false, got the string \"yes\""
    );
    // Rows that are not even objects: the same message, from the layout stage.
    assert_eq!(
        err_with("[1, 2]", &skip),
        "in.jsonl: no usable rows: every one of the 2 records was invalid (skipped under skip_invalid = true); the \
         first error: in.jsonl:1: expected a JSON object per row, got the number 1"
    );
}
