//! The demo's synthetic instruction task: polite, short replies that name the requested object.
//!
//! A prompt asks for an object: `please bring the red cup`. A good reply is polite, names exactly that
//! object and stays short: `sure , the red cup .`. The rule judge scores any completion, not only
//! dataset rows, so it can judge the models' own samples:
//!
//! | point | awarded when |
//! |---|---|
//! | polite | the reply starts with `sure` |
//! | on topic | it names the requested colour and object, and no other |
//! | brief | it has at most [`MAX_WORDS`] words |
//!
//! A reply is desirable when it earns all three points. Demonstrations for SFT are deliberately
//! imperfect: half of them break one rule (rude, wrong object, rambling, or curt).

use rand::seq::SliceRandom;
use rand::Rng;

pub const VERBS: &[&str] = &["bring", "pass", "find", "hold", "clean", "open"];
pub const COLOURS: &[&str] = &["red", "blue", "green", "black", "white"];
pub const OBJECTS: &[&str] = &["cup", "book", "key", "lamp", "coat", "box", "pen", "bag"];
const OTHER_WORDS: &[&str] = &["please", "the", "sure", "no", ",", ".", "can", "you", "i", "will", "not"];
pub const MAX_WORDS: usize = 6;

/// Every word the task uses: the demo tokenizer's vocabulary.
pub fn vocabulary() -> Vec<&'static str> {
    OTHER_WORDS.iter().chain(VERBS).chain(COLOURS).chain(OBJECTS).copied().collect()
}

/// One request: verb, colour, object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub verb: &'static str,
    pub colour: &'static str,
    pub object: &'static str,
}

impl Request {
    pub fn prompt(&self) -> String {
        format!("please {} the {} {}", self.verb, self.colour, self.object)
    }

    /// The ideal reply.
    pub fn good_reply(&self) -> String {
        format!(" sure , the {} {} .", self.colour, self.object)
    }

    /// Parse a prompt back into its request (the rule judge sees only text).
    pub fn parse(prompt: &str) -> Option<Request> {
        let w: Vec<&str> = prompt.split_whitespace().collect();
        let find = |list: &[&'static str], word: &str| list.iter().copied().find(|x| *x == word);
        match w.as_slice() {
            ["please", verb, "the", colour, object] => Some(Request {
                verb: find(VERBS, verb)?,
                colour: find(COLOURS, colour)?,
                object: find(OBJECTS, object)?,
            }),
            _ => None,
        }
    }
}

/// All requests, in a fixed order.
pub fn all_requests() -> Vec<Request> {
    let mut out = Vec::new();
    for &verb in VERBS {
        for &colour in COLOURS {
            for &object in OBJECTS {
                out.push(Request { verb, colour, object });
            }
        }
    }
    out
}

/// The kinds of imperfect reply in the demonstrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    Rude,
    WrongObject,
    Rambling,
    Curt,
}

pub const FLAWS: [Flaw; 4] = [Flaw::Rude, Flaw::WrongObject, Flaw::Rambling, Flaw::Curt];

pub fn flawed_reply(r: &Request, flaw: Flaw, rng: &mut impl Rng) -> String {
    match flaw {
        Flaw::Rude => " no , i will not .".to_string(),
        Flaw::WrongObject => {
            let other = OBJECTS.iter().filter(|o| **o != r.object).collect::<Vec<_>>();
            let colour = COLOURS.choose(rng).copied().unwrap_or("red");
            format!(" sure , the {} {} .", colour, other.choose(rng).map(|o| **o).unwrap_or("cup"))
        }
        Flaw::Rambling => format!(" sure , the {c} {o} , the {c} {o} , the {c} {o} .", c = r.colour, o = r.object),
        Flaw::Curt => format!(" the {} {} .", r.colour, r.object),
    }
}

/// The rule judge: 0–3 points for a completion to a prompt (see the module docs).
pub fn score(prompt: &str, completion: &str) -> u32 {
    let Some(r) = Request::parse(prompt) else { return 0 };
    let words: Vec<&str> = completion.split_whitespace().collect();
    let polite = words.first() == Some(&"sure");
    let objects: Vec<&&str> = words.iter().filter(|w| OBJECTS.contains(w)).collect();
    let colours: Vec<&&str> = words.iter().filter(|w| COLOURS.contains(w)).collect();
    let on_topic = !objects.is_empty()
        && objects.iter().all(|o| **o == r.object)
        && !colours.is_empty()
        && colours.iter().all(|c| **c == r.colour);
    let brief = !words.is_empty() && words.len() <= MAX_WORDS;
    u32::from(polite) + u32::from(on_topic) + u32::from(brief)
}

/// Full marks: the binary feedback KTO trains on.
pub fn is_desirable(prompt: &str, completion: &str) -> bool {
    score(prompt, completion) == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_scores_each_flaw() {
        let p = "please bring the red cup";
        assert_eq!(score(p, " sure , the red cup ."), 3);
        assert_eq!(score(p, " no , i will not ."), 1); // brief only
        assert_eq!(score(p, " sure , the blue key ."), 2); // polite, brief, wrong object
        assert_eq!(score(p, " sure , the red cup , the red cup , the red cup ."), 2); // rambling
        assert_eq!(score(p, " the red cup ."), 2); // curt
        assert_eq!(score(p, ""), 0);
        assert_eq!(score("not a request", " sure , the red cup ."), 0);
        assert!(is_desirable(p, "sure , the red cup ."));
    }

    #[test]
    fn prompts_round_trip_and_cover_the_grid() {
        let all = all_requests();
        assert_eq!(all.len(), 6 * 5 * 8);
        for r in &all {
            assert_eq!(Request::parse(&r.prompt()), Some(*r));
            assert_eq!(score(&r.prompt(), &r.good_reply()), 3);
        }
    }
}
