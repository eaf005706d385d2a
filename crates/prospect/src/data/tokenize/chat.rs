//! Chat templates: a model's Jinja `chat_template` rendered with `minijinja` the way `transformers`'
//! `apply_chat_template` renders it (transformers 5.24, `utils/chat_template_utils.py`):
//!
//! - `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the source dropped;
//! - `raise_exception(msg)`, `strftime_now(fmt)`, `namespace(..)`, `dict(..)`, loop variables and
//!   `break`/`continue`;
//! - Python string methods (`.strip()`, `.split()`, `.startswith()`, ...) via `minijinja-contrib`'s
//!   pycompat layer;
//! - `tojson` as Python's `json.dumps(x, ensure_ascii=False)` (Jinja's own escapes `<`, `>`, `&`, `'`;
//!   transformers overrides it, and so do we);
//! - the context: `messages`, `add_generation_prompt`, `tools = none`, `documents = none`, and the
//!   tokenizer's special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
//!
//! This file renders text only; turning the text into token ids is `tokenize/mod.rs`'s job.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::data::rows::Message;
use crate::error::{Error, Result};

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: Vec<(&'static str, String)>,
    /// Where the template came from, for error messages (`tokenizer_config.json`, a path, ...).
    pub origin: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compile `source`. `special` are the tokenizer's special-token texts by name (`bos_token`, ...).
    pub fn new(source: &str, special: Vec<(&'static str, String)>, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Template { origin: origin.to_string(), message: format!("cannot compile: {e:#}") })?;
        Ok(Self { env, special, origin: origin.to_string() })
    }

    /// The template for `tok`'s conversations: from `override_path` when given (a `.jinja` file, or a
    /// `tokenizer_config.json` whose `chat_template` is used), else the tokenizer's own.
    pub fn for_tokenizer(tok: &crate::model::HfTokenizer, override_path: Option<&std::path::Path>) -> Result<Self> {
        match override_path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let source = match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(o)) => match o.get("chat_template") {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        _ => return Err(Error::config("chat_template", format!("{} is JSON without a `chat_template` string", path.display()))),
                    },
                    _ => text,
                };
                Self::new(&source, tok.template_tokens(), &path.display().to_string())
            }
            None => match &tok.chat_template {
                Some(source) => Self::new(source, tok.template_tokens(), "the tokenizer's chat_template"),
                None => Err(Error::config(
                    "chat_template",
                    "the data is conversational (lists of messages) but the model's tokenizer has no chat template \
                     (no `chat_template` in tokenizer_config.json, no chat_template.jinja); set chat_template = \"path/to/template.jinja\"",
                )),
            },
        }
    }

    /// The text `apply_chat_template(messages, tokenize=False, add_generation_prompt=..)` returns.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template { origin: self.origin.clone(), message: e.to_string() })?;
        let mut ctx: std::collections::BTreeMap<&str, Value> = std::collections::BTreeMap::new();
        for (name, text) in &self.special {
            ctx.insert(name, Value::from(text.as_str()));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        template
            .render(ctx)
            .map_err(|e| Error::Template { origin: self.origin.clone(), message: format!("cannot render: {e:#}") })
    }
}

/// `strftime_now(fmt)`: the current UTC date/time, for templates that print today's date (Llama 3.1).
/// Supports `%d %m %Y %y %b %B %H %M %S %%`, which is what HF templates use.
fn strftime_now(fmt: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&format!("{year}")),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `x | tojson(indent=None)` as Python's `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout, keys in insertion order: `", "` and `": "` separators on one line,
/// or newline + indent.
fn python_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i > 0 { item_sep } else { "" });
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        K::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                out.push_str(if i > 0 { item_sep } else { "" });
                newline(out, depth + 1);
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::Value::String(key).to_string());
                out.push_str(": ");
                python_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        K::None | K::Undefined => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::String => out.push_str(&serde_json::Value::String(v.as_str().unwrap_or_default().to_string()).to_string()),
        K::Number => {
            let text = v.to_string();
            // Python prints floats with a fractional part (`1.0`); minijinja already does (`1.0`).
            out.push_str(&text);
        }
        _ => out.push_str(&serde_json::Value::String(v.to_string()).to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_and_without_generation_prompt() {
        let t = ChatTemplate::new(CHATML, vec![], "test").unwrap();
        let msgs = [Message::new("user", "hi")];
        assert_eq!(t.render(&msgs, true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.render(&msgs, false).unwrap(), "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let t = ChatTemplate::new(src, vec![], "test").unwrap();
        let err = t.render(&[Message::new("assistant", "x")], false).unwrap_err().to_string();
        assert!(err.contains("Conversation must start with user"), "{err}");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        // python: json.dumps({"a": [1, "<b>"], "c": {}}, ensure_ascii=False) == '{"a": [1, "<b>"], "c": {}}'
        let t =
            ChatTemplate::new("{{ {'a': [1, '<b>'], 'c': {}} | tojson }}|{{ [1] | tojson(indent=2) }}", vec![], "t")
                .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [1, \"<b>\"], \"c\": {}}|[\n  1\n]");
    }

    #[test]
    fn strftime_now_formats_today() {
        // Llama 3.1's templates print `strftime_now("%d %b %Y")`, e.g. "26 Jul 2024".
        let t =
            ChatTemplate::new("{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %%') }}", vec![], "t").unwrap();
        let text = t.render(&[], false).unwrap();
        let (a, b) = text.split_once('|').unwrap();
        let parts: Vec<&str> = a.split(' ').collect();
        assert_eq!(parts.len(), 3, "{text}");
        assert!(parts[0].len() == 2 && parts[1].len() == 3 && parts[2].len() == 4, "{text}");
        assert!(b.len() == 12 && b.ends_with(" %") && b.starts_with(parts[2]), "{text}");
    }

    #[test]
    fn special_tokens_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% if not loop.last %},{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, vec![("bos_token", "<s>".into())], "t").unwrap();
        assert_eq!(t.render(&[Message::new("user", " a "), Message::new("assistant", "b")], false).unwrap(), "<s>A,B");
    }
}
