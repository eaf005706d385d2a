//! Judges: given a prompt and two completions, which is better?
//!
//! - `rule:NAME`: a programmatic judge for built-in tasks (`rules.rs`); each completion gets a score,
//!   higher wins.
//! - `llm:URL`: an OpenAI-compatible chat-completions endpoint, as the KTO paper's GPT-4 judge. The two
//!   responses go in random (seeded) order to remove position bias; the order is recorded. The answer
//!   must be exactly `A`, `B` or `TIE` (case and a trailing period aside); anything else counts as a
//!   tie and is reported as unparseable.
//! - `reward:DIR`: a reward model scores each completion, higher wins.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::rules::Rule;
use super::winrate::Verdict;
use crate::data::tokenize::Encoder;
use crate::data::{ChatTemplate, Content, Message};
use crate::error::{Error, Result};

/// The default instruction for LLM judges. `{prompt}`, `{a}` and `{b}` are filled in.
pub const DEFAULT_LLM_PROMPT: &str = "You judge which of two assistant responses better answers a user's request: \
more helpful, more correct, and more appropriate. Ignore the order in which they are shown and their length \
unless it matters for the request.\n\nRequest:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n\
Answer with exactly one word: A if Response A is better, B if Response B is better, or TIE.";

/// What `--judge` names.
#[derive(Debug, Clone, PartialEq)]
pub enum JudgeSpec {
    Rule(Rule),
    Llm { url: String },
    Reward(PathBuf),
}

impl JudgeSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad =
            |m: &str| Error::config("judge", format!("{m}; expected rule:NAME, llm:URL or reward:DIR, got {spec:?}"));
        match spec.split_once(':') {
            Some(("rule", name)) => match Rule::from_name(name) {
                Some(rule) => Ok(JudgeSpec::Rule(rule)),
                None => Err(bad(&format!("unknown rule `{name}` (known: {})", Rule::ALL.map(Rule::name).join(", ")))),
            },
            Some(("llm", url)) if url.starts_with("http://") || url.starts_with("https://") => {
                Ok(JudgeSpec::Llm { url: url.to_string() })
            }
            Some(("reward", dir)) if !dir.is_empty() => Ok(JudgeSpec::Reward(PathBuf::from(dir))),
            _ => Err(bad("unrecognised judge")),
        }
    }
}

/// The spec as `--judge` spells it: `rule:NAME`, `llm:URL` or `reward:DIR`.
impl std::fmt::Display for JudgeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JudgeSpec::Rule(rule) => write!(f, "rule:{rule}"),
            JudgeSpec::Llm { url } => write!(f, "llm:{url}"),
            JudgeSpec::Reward(dir) => write!(f, "reward:{}", dir.display()),
        }
    }
}

/// A verdict from two scores: higher wins, equal ties.
pub fn by_score(candidate: f64, baseline: f64) -> Verdict {
    match candidate.partial_cmp(&baseline) {
        Some(std::cmp::Ordering::Greater) => Verdict::Candidate,
        Some(std::cmp::Ordering::Less) => Verdict::Baseline,
        _ => Verdict::Tie,
    }
}

/// Which shown position an LLM judge preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preference {
    A,
    B,
    Tie,
}

/// Strict parsing of a judge's answer: `A`, `B` or `TIE`, ignoring case, surrounding white space and a
/// trailing period. Anything else is `None` (unparseable).
pub fn parse_preference(answer: &str) -> Option<Preference> {
    let a = answer.trim().trim_end_matches('.').trim().to_ascii_uppercase();
    match a.as_str() {
        "A" => Some(Preference::A),
        "B" => Some(Preference::B),
        "TIE" => Some(Preference::Tie),
        _ => None,
    }
}

/// A client for an OpenAI-compatible `chat/completions` endpoint.
pub struct LlmJudge {
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub prompt_template: String,
    rng: rand::rngs::StdRng,
    agent: ureq::Agent,
}

/// One LLM judgement, with what is needed to audit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmJudgement {
    pub verdict: Verdict,
    /// Where the candidate was shown: "A" or "B".
    pub candidate_position: String,
    pub answer: String,
    pub parsed: bool,
}

impl LlmJudge {
    pub fn new(url: &str, model: &str, api_key: Option<String>, prompt_template: Option<String>, seed: u64) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(120)).build();
        Self {
            url: url.to_string(),
            model: model.to_string(),
            api_key,
            prompt_template: prompt_template.unwrap_or_else(|| DEFAULT_LLM_PROMPT.to_string()),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            agent,
        }
    }

    pub fn judge(&mut self, prompt: &str, candidate: &str, baseline: &str) -> Result<LlmJudgement> {
        let candidate_first = self.rng.gen_bool(0.5);
        let (a, b) = if candidate_first { (candidate, baseline) } else { (baseline, candidate) };
        let content = self.prompt_template.replace("{prompt}", prompt).replace("{a}", a).replace("{b}", b);
        let body = serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        });
        let mut req = self.agent.post(&self.url).set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let err = |m: String| Error::Judge { judge: self.url.clone(), message: m };
        let resp = req.send_string(&body.to_string()).map_err(|e| err(e.to_string()))?;
        let text = resp.into_string().map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("response is not JSON ({e}): {text:.200}")))?;
        let answer = json["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| err(format!("no choices[0].message.content in {text:.200}")))?
            .to_string();
        let pref = parse_preference(&answer);
        let verdict = match (pref, candidate_first) {
            (Some(Preference::A), true) | (Some(Preference::B), false) => Verdict::Candidate,
            (Some(Preference::A), false) | (Some(Preference::B), true) => Verdict::Baseline,
            _ => Verdict::Tie,
        };
        Ok(LlmJudgement {
            verdict,
            candidate_position: if candidate_first { "A" } else { "B" }.to_string(),
            answer,
            parsed: pref.is_some(),
        })
    }
}

/// A reward model as a judge: each completion gets the score of the model's `score` head at the last
/// non-pad token of prompt + completion, tokenized as the reward trainer tokenizes it (TRL's rules: eos
/// appended to plain text; conversations rendered with the chat template, the completion as an assistant
/// message). Sequences are cut at `max_length`.
pub struct RewardJudge {
    model: crate::model::RewardModel,
    tok: crate::model::HfTokenizer,
    template: Option<ChatTemplate>,
    max_length: usize,
    device: candle_core::Device,
}

impl RewardJudge {
    /// `dir` is a reward model's folder, or a PEFT adapter of one (its base named in adapter_config.json).
    pub fn load(dir: &std::path::Path, max_length: usize, device: &candle_core::Device) -> Result<Self> {
        let source = crate::model::ModelSource::resolve(dir, None)?;
        let tok = crate::model::HfTokenizer::load(source.tokenizer_dir())?;
        let template = match &tok.chat_template {
            Some(_) => Some(ChatTemplate::for_tokenizer(&tok, None)?),
            None => None,
        };
        Ok(Self {
            model: crate::model::load_frozen_reward(dir, device)?,
            tok,
            template,
            max_length,
            device: device.clone(),
        })
    }

    /// The score of `completion` after `prompt` (a JSON string, or a list of messages).
    pub fn score(&self, prompt: &serde_json::Value, completion: &str) -> Result<f64> {
        let (p, c) = match prompt {
            serde_json::Value::String(s) => (Content::Text(s.clone()), Content::Text(completion.to_string())),
            other => {
                let msgs: Vec<Message> = serde_json::from_value(other.clone())
                    .map_err(|e| Error::Tokenizer(format!("prompt must be a string or a list of messages: {e}")))?;
                (Content::Messages(msgs), Content::Messages(vec![Message::new("assistant", completion)]))
            }
        };
        let encoder = Encoder { tok: &self.tok, template: self.template.as_ref() };
        let seq = encoder.sequence(&p, &c, &mut Default::default())?;
        let mut ids: Vec<u32> = seq.prompt_ids.iter().chain(&seq.completion_ids).copied().collect();
        ids.truncate(self.max_length);
        let n = ids.len();
        let input = candle_core::Tensor::from_vec(ids, (1, n), &self.device)?;
        let s = self.model.scores(&input, self.tok.pad_token_id)?; // [1]
        Ok(s.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_strictly() {
        assert_eq!(parse_preference(" a.\n"), Some(Preference::A));
        assert_eq!(parse_preference("B"), Some(Preference::B));
        assert_eq!(parse_preference("tie"), Some(Preference::Tie));
        assert_eq!(parse_preference("A is better"), None);
        assert_eq!(parse_preference("Response B"), None);
        assert_eq!(parse_preference(""), None);
    }

    #[test]
    fn specs_parse_and_name_what_is_wrong() {
        assert_eq!(JudgeSpec::parse("rule:polite-reply").unwrap(), JudgeSpec::Rule(Rule::PoliteReply));
        for spec in ["rule:polite-reply", "llm:https://x.test/v1/chat/completions", "reward:runs/rm/final"] {
            assert_eq!(JudgeSpec::parse(spec).unwrap().to_string(), spec);
        }
        assert_eq!(
            JudgeSpec::parse("llm:http://127.0.0.1:8080/v1/chat/completions").unwrap(),
            JudgeSpec::Llm { url: "http://127.0.0.1:8080/v1/chat/completions".into() }
        );
        assert_eq!(JudgeSpec::parse("reward:runs/rm/final").unwrap(), JudgeSpec::Reward("runs/rm/final".into()));
        let e = JudgeSpec::parse("rule:nope").unwrap_err().to_string();
        assert!(e.contains("unknown rule `nope` (known: polite-reply)"), "{e}");
        assert!(JudgeSpec::parse("gpt4").is_err());
    }

    #[test]
    fn scores_decide_by_size() {
        assert_eq!(by_score(3.0, 2.0), Verdict::Candidate);
        assert_eq!(by_score(1.0, 2.0), Verdict::Baseline);
        assert_eq!(by_score(2.0, 2.0), Verdict::Tie);
    }
}
