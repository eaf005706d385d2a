//! One test per data layout: rows written by hand in that layout, and the exact canonical rows they
//! become. Then one test per class of bad input, with the exact `FILE:LINE: ...` message.

use std::path::Path;

use prospect::data::read::parse_rows;
use prospect::data::{
    Content, DataFormat, LabelFrom, Message, PairedRow, ReadOptions, Rows, SftRow, Statistic, Threshold, UnpairedRow,
};

fn read(text: &str) -> (Rows, prospect::data::ReadReport) {
    parse_rows(text.as_bytes(), Path::new("in.json"), &ReadOptions::default()).unwrap()
}

fn err(text: &str) -> String {
    parse_rows(text.as_bytes(), Path::new("in.jsonl"), &ReadOptions::default()).unwrap_err().to_string()
}

fn msgs(turns: &[(&str, &str)]) -> Content {
    Content::Messages(turns.iter().map(|(r, c)| Message::new(r, c)).collect())
}

fn pair(prompt: Content, chosen: Content, rejected: Content, line: usize) -> PairedRow {
    PairedRow { prompt, chosen, rejected, line }
}

#[test]
fn trl_conversational_with_system() {
    let (rows, report) = read(
        r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}], "label": false, "system": "Be kind."}"#,
    );
    assert_eq!(report.format, DataFormat::Trl);
    assert_eq!(
        rows,
        Rows::Unpaired(vec![UnpairedRow {
            prompt: msgs(&[("system", "Be kind."), ("user", "Hi")]),
            completion: msgs(&[("assistant", "Hello")]),
            label: false,
            line: 1
        }])
    );
    let (rows, _) = read(
        r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]}"#,
    );
    assert_eq!(
        rows,
        Rows::Paired(vec![pair(msgs(&[("user", "Q")]), msgs(&[("assistant", "A")]), msgs(&[("assistant", "B")]), 1)])
    );
}

#[test]
fn halos_binary_and_pairwise() {
    let (rows, report) = read(
        r#"[
  {"prompt_id": "0", "prompt": [{"role": "user", "content": "Q"}], "output": [{"role": "assistant", "content": "A"}], "label": 1, "reward": 0.9, "type": "binary_feedback"},
  {"prompt_id": "1", "prompt": [{"role": "user", "content": "R"}], "output": "B", "label": 0, "reward": 0.1, "type": "binary_feedback"}
]"#,
    );
    assert_eq!(report.format, DataFormat::HalosBinary);
    assert_eq!(
        rows,
        Rows::Unpaired(vec![
            UnpairedRow {
                prompt: msgs(&[("user", "Q")]),
                completion: msgs(&[("assistant", "A")]),
                label: true,
                line: 2
            },
            UnpairedRow {
                prompt: msgs(&[("user", "R")]),
                completion: msgs(&[("assistant", "B")]),
                label: false,
                line: 3
            },
        ])
    );
    let (rows, report) = read(
        r#"[{"prompt": [{"role": "user", "content": "Q"}], "output_A": [{"role": "assistant", "content": "A"}], "output_B": [{"role": "assistant", "content": "B"}], "label": 0, "type": "pairwise_feedback"}]"#,
    );
    assert_eq!(report.format, DataFormat::HalosPairwise);
    assert_eq!(
        rows,
        Rows::Paired(vec![pair(msgs(&[("user", "Q")]), msgs(&[("assistant", "B")]), msgs(&[("assistant", "A")]), 1)])
    );
}

#[test]
fn llamafactory_sharegpt_kto_dpo_and_sft() {
    let (rows, report) = read(
        r#"[{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], "label": true}]"#,
    );
    assert_eq!(report.format, DataFormat::Sharegpt);
    assert_eq!(
        rows,
        Rows::Unpaired(vec![UnpairedRow {
            prompt: msgs(&[("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]),
            completion: msgs(&[("assistant", "A2")]),
            label: true,
            line: 1
        }])
    );
    let (rows, report) = read(
        r#"[{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}]"#,
    );
    assert_eq!(report.format, DataFormat::SharegptDpo);
    assert_eq!(
        rows,
        Rows::Paired(vec![pair(
            msgs(&[("system", "S"), ("user", "Q")]),
            msgs(&[("assistant", "good")]),
            msgs(&[("assistant", "bad")]),
            1
        )])
    );
    let (rows, _) = read(r#"{"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}"#);
    assert_eq!(
        rows,
        Rows::Sft(vec![SftRow { prompt: msgs(&[("user", "Q")]), completion: msgs(&[("assistant", "A")]), line: 1 }])
    );
}

#[test]
fn anthropic_hh_rlhf() {
    let (rows, report) = read(
        r#"{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.", "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."}"#,
    );
    assert_eq!(report.format, DataFormat::HhRlhf);
    assert_eq!(
        rows,
        Rows::Paired(vec![pair(
            msgs(&[("user", "Hi there"), ("assistant", "Hello!"), ("user", "How are you?")]),
            msgs(&[("assistant", "Fine, thanks.")]),
            msgs(&[("assistant", "Go away.")]),
            1
        )])
    );
    let e = err(r#"{"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}"#);
    assert_eq!(e, "in.jsonl:1: the `chosen` and `rejected` conversations differ before their last Assistant reply; expected one shared dialogue");
}

#[test]
fn stanford_shp_keeps_score_ratio_at_least_two() {
    let text = r#"{"post_id": "a", "history": "Why?", "human_ref_A": "Because.", "human_ref_B": "No idea.", "labels": 1, "score_A": 10, "score_B": 5}
{"post_id": "b", "history": "How?", "human_ref_A": "Like so.", "human_ref_B": "Carefully.", "labels": 0, "score_A": 3, "score_B": 9}
{"post_id": "c", "history": "When?", "human_ref_A": "Now.", "human_ref_B": "Later.", "labels": 1, "score_A": 3, "score_B": 2}"#;
    let (rows, report) = read(text);
    assert_eq!(report.format, DataFormat::Shp);
    assert_eq!((report.records, report.filtered), (3, 1)); // 3/2 < 2 is left out, and counted
    assert_eq!(
        rows,
        Rows::Paired(vec![
            pair(msgs(&[("user", "Why?")]), msgs(&[("assistant", "Because.")]), msgs(&[("assistant", "No idea.")]), 1),
            pair(
                msgs(&[("user", "How?")]),
                msgs(&[("assistant", "Carefully.")]),
                msgs(&[("assistant", "Like so.")]),
                2
            ),
        ])
    );
}

#[test]
fn oasst1_adjacent_rank_siblings() {
    // A tree: prompt p1 with three ranked replies, one of which has a follow-up with two ranked replies.
    let text = r#"{"message_id": "p1", "parent_id": null, "role": "prompter", "text": "Hi", "rank": null}
{"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "second", "rank": 1}
{"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "best", "rank": 0}
{"message_id": "a3", "parent_id": "p1", "role": "assistant", "text": "worst", "rank": 2}
{"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "More?", "rank": 0}
{"message_id": "b1", "parent_id": "p2", "role": "assistant", "text": "yes", "rank": 1}
{"message_id": "b0", "parent_id": "p2", "role": "assistant", "text": "sure", "rank": 0}
{"message_id": "x", "parent_id": "p2", "role": "assistant", "text": "removed", "rank": 2, "deleted": true}"#;
    let (rows, report) = read(text);
    assert_eq!(report.format, DataFormat::Oasst1);
    assert_eq!((report.records, report.filtered), (8, 1)); // the deleted message is counted
    assert_eq!(report.filter_rule, Some("oasst1 messages marked deleted"));
    let a = |t: &str| msgs(&[("assistant", t)]);
    assert_eq!(
        rows,
        Rows::Paired(vec![
            pair(msgs(&[("user", "Hi")]), a("best"), a("second"), 3),
            pair(msgs(&[("user", "Hi")]), a("second"), a("worst"), 2),
            pair(msgs(&[("user", "Hi"), ("assistant", "best"), ("user", "More?")]), a("sure"), a("yes"), 7),
        ])
    );
}

#[test]
fn ultrafeedback_best_against_worst() {
    let text = r#"{"source": "x", "instruction": "Name a color.", "completions": [{"model": "m1", "response": "Blue.", "overall_score": 7.5}, {"model": "m2", "response": "Dog.", "overall_score": 2.0}, {"model": "m3", "response": "Red.", "overall_score": 9.0}]}
{"source": "x", "instruction": "Tie.", "completions": [{"response": "a", "overall_score": 5}, {"response": "b", "overall_score": 5}]}"#;
    let (rows, report) = read(text);
    assert_eq!(report.format, DataFormat::Ultrafeedback);
    assert_eq!(report.filtered, 1);
    assert_eq!(
        rows,
        Rows::Paired(vec![pair(
            msgs(&[("user", "Name a color.")]),
            msgs(&[("assistant", "Red.")]),
            msgs(&[("assistant", "Dog.")]),
            1
        )])
    );
}

#[test]
fn label_from_scores() {
    let text = r#"{"prompt": "a", "completion": "x", "rating": 9}
{"prompt": "b", "completion": "y", "rating": 3}
{"prompt": "c", "completion": "z", "rating": 6}
{"prompt": "d", "completion": "w", "rating": 7}"#;
    let labels = |threshold: Threshold| {
        let options =
            ReadOptions { label_from: Some(LabelFrom { field: "rating".into(), threshold }), ..Default::default() };
        let (rows, report) = parse_rows(text.as_bytes(), Path::new("r.jsonl"), &options).unwrap();
        let Rows::Unpaired(v) = rows else { panic!() };
        (v.iter().map(|r| r.label).collect::<Vec<_>>(), report.label_threshold.unwrap())
    };
    assert_eq!(labels(Threshold::Value(7.0)), (vec![true, false, false, true], 7.0));
    // mean (9+3+6+7)/4 = 6.25; median (6+7)/2 = 6.5
    assert_eq!(labels(Threshold::Statistic(Statistic::Mean)), (vec![true, false, false, true], 6.25));
    assert_eq!(labels(Threshold::Statistic(Statistic::Median)), (vec![true, false, false, true], 6.5));
    let options = ReadOptions {
        label_from: Some(LabelFrom { field: "rating".into(), threshold: Threshold::Value(1.0) }),
        ..Default::default()
    };
    let e =
        parse_rows(b"{\"prompt\": \"a\", \"completion\": \"x\", \"rating\": \"high\"}", Path::new("r.jsonl"), &options)
            .unwrap_err();
    assert_eq!(e.to_string(), "r.jsonl:1: field `rating` must be a number, got the string \"high\"");
}

#[test]
fn data_format_override_skips_detection() {
    // `chosen`/`rejected` without `prompt` would be detected as HH-RLHF; forced TRL, `prompt` is missing.
    let options = ReadOptions { format: Some(DataFormat::Trl), ..Default::default() };
    let e = parse_rows(b"{\"chosen\": \"a\", \"rejected\": \"b\"}", Path::new("f.jsonl"), &options).unwrap_err();
    assert_eq!(
        e.to_string(),
        "f.jsonl:1: field `prompt` is missing; expected a string or a list of {role, content} messages"
    );
}

#[test]
fn bad_input_gives_file_line_and_what_was_expected() {
    let ok = r#"{"prompt": "a", "completion": "b", "label": true}"#;
    let cases: Vec<(String, &str)> = vec![
        (format!("{ok}\n{{\"prompt\": \"a\", \"completion\": \"b\", \"label\": tru}}"), "in.jsonl:2: malformed JSON: expected ident (column 48)"),
        (r#"{"prompt": "a", "label": true}"#.into(), "in.jsonl:1: field `completion` is missing; expected a string or a list of {role, content} messages"),
        (r#"{"prompt": 7, "completion": "b", "label": true}"#.into(), "in.jsonl:1: field `prompt` must be a string or a list of {role, content} messages, got the number 7"),
        (r#"{"prompt": "a", "completion": "b", "label": 1}"#.into(), "in.jsonl:1: field `label` must be true or false, got the number 1"),
        (format!("{ok}\n\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"q\"}}, {{\"role\": \"assistant\", \"content\": \"a\"}}], \"label\": true}}"),
         "in.jsonl:3: this row is ShareGPT messages (unpaired (prompt, completion, label)), but the file started as TRL unpaired (prompt, completion, label) at line 1"),
        (r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [], "label": true}"#.into(),
         "in.jsonl:1: field `completion` is an empty list; expected at least one {role, content} message"),
        (r#"{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": true}"#.into(),
         "in.jsonl:1: fields `prompt` and `completion` must both be text or both be lists of messages"),
        (r#"{"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}], "label": true}"#.into(),
         "in.jsonl:1: field `prompt`[0]: expected string fields `role` and `content` (or ShareGPT's `from` and `value`), got keys [\"role\"]"),
        (r#"{"messages": [{"role": "user", "content": "q"}], "label": true}"#.into(),
         "in.jsonl:1: field `messages`: the last message must be the assistant's reply (the completion), got role \"user\""),
        ("".into(), "in.jsonl: the file has no rows"),
        ("\n  \n".into(), "in.jsonl: the file has no rows"),
        ("[]".into(), "in.jsonl: the file has no rows"),
    ];
    for (text, want) in cases {
        assert_eq!(err(&text), want, "input: {text}");
    }
    // `{"prompt": "` is 12 bytes, then a lone 0xff.
    let mut bytes = format!("{ok}\n{{\"prompt\": \"").into_bytes();
    bytes.extend_from_slice(b"\xff\"}");
    let e = parse_rows(&bytes, Path::new("in.jsonl"), &ReadOptions::default()).unwrap_err().to_string();
    assert_eq!(e, "in.jsonl:2: invalid UTF-8 at byte 12 of the line; the file must be UTF-8 text");
}

#[test]
fn skip_invalid_counts_what_it_skips() {
    let text = "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n{\"prompt\": \"a\", \"completion\": \"b\", \"label\": \"yes\"}\nnot json\n{\"prompt\": \"c\", \"completion\": \"d\", \"label\": false}\n";
    let options = ReadOptions { skip_invalid: true, ..Default::default() };
    let (rows, report) = parse_rows(text.as_bytes(), Path::new("s.jsonl"), &options).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        report.skipped,
        vec![
            "s.jsonl:2: field `label` must be true or false, got the string \"yes\"".to_string(),
            "s.jsonl:3: malformed JSON: expected ident (column 2)".to_string(),
        ]
    );
    let e = parse_rows(b"oops\n", Path::new("s.jsonl"), &options).unwrap_err().to_string();
    assert_eq!(
        e,
        "s.jsonl: no usable rows: every one of the 1 records was invalid (skipped under skip_invalid = true); the first \
         error: s.jsonl:1: malformed JSON: expected value (column 1)"
    );
}

#[test]
fn canonical_jsonl_reads_back_to_the_same_rows() {
    let text = r#"{"prompt": "Say \"hi\"\n", "completion": " caf\u00e9 \ud83d\ude42", "label": true}
{"prompt": "tab\there", "completion": "", "label": false}"#;
    let (rows, _) = read(text);
    let (back, _) = read(&rows.to_jsonl());
    assert_eq!(rows, back);
    let (rows, _) = read(
        r#"{"conversations": [{"from": "human", "value": "Q \"x\""}], "chosen": {"from": "gpt", "value": "a\nb"}, "rejected": {"from": "gpt", "value": "c"}}"#,
    );
    let (back, report) = read(&rows.to_jsonl());
    assert_eq!(report.format, DataFormat::Trl);
    assert_eq!(rows, back);
}
