//! The demo's synthetic instruction task: polite, short replies that name the requested object. The
//! words, the requests and the rule that judges them live in `eval/rules.rs` (`rule:polite-reply`); this
//! file builds the demo's data from them.
//!
//! Demonstrations for SFT are deliberately imperfect: half of them break one rule (rude, wrong object,
//! rambling, or curt).

use rand::seq::SliceRandom;
use rand::Rng;

pub use crate::eval::rules::{is_desirable, polite_reply as score, Request, COLOURS, OBJECTS, VERBS};

const OTHER_WORDS: &[&str] = &["please", "the", "sure", "no", ",", ".", "can", "you", "i", "will", "not"];

/// Every word the task uses: the demo tokenizer's vocabulary.
pub fn vocabulary() -> Vec<&'static str> {
    OTHER_WORDS.iter().chain(VERBS).chain(COLOURS).chain(OBJECTS).copied().collect()
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

#[cfg(test)]
mod tests {
    use super::*;

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
