//! Rule judges: programmatic scores for built-in tasks, named by `--judge rule:NAME`.
//!
//! `polite-reply` judges the demo's synthetic instruction task. A prompt asks for an object:
//! `please bring the red cup`. A good reply is polite, names exactly that object and stays short:
//! `sure , the red cup .`. The rule scores any completion, not only dataset rows, so it can judge the
//! models' own samples:
//!
//! | point | awarded when |
//! |---|---|
//! | polite | the reply starts with `sure` |
//! | on topic | it names the requested colour and object, and no other |
//! | brief | it has at most [`MAX_WORDS`] words |
//!
//! A reply is desirable when it earns all three points. The demo (`demo/task.rs`) builds its prompts
//! and replies from the words and [`Request`] defined here.

pub const VERBS: &[&str] = &["bring", "pass", "find", "hold", "clean", "open"];
pub const COLOURS: &[&str] = &["red", "blue", "green", "black", "white"];
pub const OBJECTS: &[&str] = &["cup", "book", "key", "lamp", "coat", "box", "pen", "bag"];
pub const MAX_WORDS: usize = 6;

/// A built-in rule judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The demo's task: polite, on-topic, brief (0–3 points).
    PoliteReply,
}

impl Rule {
    pub const ALL: [Rule; 1] = [Rule::PoliteReply];

    /// The name `--judge rule:NAME` uses.
    pub fn name(self) -> &'static str {
        match self {
            Rule::PoliteReply => "polite-reply",
        }
    }

    /// The rule called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The points a completion earns for a prompt; higher is better.
    pub fn score(self, prompt: &str, completion: &str) -> u32 {
        match self {
            Rule::PoliteReply => polite_reply(prompt, completion),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One request of the polite-reply task: verb, colour, object.
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

/// 0–3 points for a completion to a prompt (see the module docs).
pub fn polite_reply(prompt: &str, completion: &str) -> u32 {
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
    polite_reply(prompt, completion) == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_scores_each_flaw() {
        let p = "please bring the red cup";
        assert_eq!(polite_reply(p, " sure , the red cup ."), 3);
        assert_eq!(polite_reply(p, " no , i will not ."), 1); // brief only
        assert_eq!(polite_reply(p, " sure , the blue key ."), 2); // polite, brief, wrong object
        assert_eq!(polite_reply(p, " sure , the red cup , the red cup , the red cup ."), 2); // rambling
        assert_eq!(polite_reply(p, " the red cup ."), 2); // curt
        assert_eq!(polite_reply(p, ""), 0);
        assert_eq!(polite_reply("not a request", " sure , the red cup ."), 0);
        assert!(is_desirable(p, "sure , the red cup ."));
        assert_eq!(Rule::PoliteReply.score(p, " the red cup ."), 2);
    }

    #[test]
    fn rules_are_found_by_name() {
        assert_eq!(Rule::from_name("polite-reply"), Some(Rule::PoliteReply));
        assert_eq!(Rule::from_name("polite"), None);
        assert_eq!(Rule::PoliteReply.to_string(), "polite-reply");
    }
}
