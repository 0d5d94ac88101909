//! Chat templates: a checkpoint's Jinja `chat_template` rendered as transformers'
//! `apply_chat_template` renders it, with minijinja configured like Hugging Face's Jinja
//! environment (`trim_blocks`, `lstrip_blocks`, loop controls, Python string and dict methods,
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps` writes).
//!
//! The template comes from the checkpoint (`chat_template.jinja`, `tokenizer_config.json`'s
//! `chat_template`, or the processor's `chat_template.json`), or is given as a string (a GGUF
//! file's `tokenizer.chat_template`); a checkpoint without one gets [`LLAMA4_CHAT_TEMPLATE`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::{Error, Result};

/// The Llama 4 chat template transformers 5.23.0 ships: the string `chat_template` in
/// `transformers/models/llama4/processing_llama4.py` (Apache-2.0, as this crate), byte for byte.
/// Used when a checkpoint has no template of its own. `tools/make_chat_fixture.py` writes it into
/// `fixtures/chat/llama4/tokenizer_config.json` from transformers itself, and a test checks that
/// the two are equal.
pub const LLAMA4_CHAT_TEMPLATE: &str = include_str!("llama4_chat_template.jinja");

/// The special tokens transformers passes to every template (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Where a [`ChatTemplate`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// `chat_template.jinja` in the checkpoint directory.
    ChatTemplateJinja,
    /// `chat_template` in `tokenizer_config.json`.
    TokenizerConfig,
    /// `chat_template.json` (the processor's file) in the checkpoint directory.
    ChatTemplateJson,
    /// Given as a string ([`ChatTemplate::new`]).
    Given,
    /// The checkpoint has none: [`LLAMA4_CHAT_TEMPLATE`].
    Llama4Default,
}

/// What a render needs besides the messages (the keyword arguments of `apply_chat_template`).
#[derive(Clone, Debug, Default)]
pub struct ChatOptions {
    /// End with the header that opens the assistant's answer.
    pub add_generation_prompt: bool,
    /// Tool definitions (JSON schemas), passed to the template as `tools`.
    pub tools: Option<Vec<Json>>,
    /// Documents for retrieval-augmented templates, passed as `documents`.
    pub documents: Option<Vec<Json>>,
    /// Further template variables (`tools_in_user_message`, `date_string`, ...); they override
    /// the special tokens of the same name.
    pub extra: serde_json::Map<String, Json>,
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether a template named `tool_use` exists (chosen when tools are given).
    has_tool_use: bool,
    special_tokens: BTreeMap<String, String>,
    source: TemplateSource,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

/// Marks an error raised by the template itself (`raise_exception`), so that it is reported as
/// the template's verdict on the conversation rather than as a template fault.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn template_err(e: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<Raised>() {
            return Error::ChatRejected(raised.0.clone());
        }
        source = s.source();
    }
    Error::ChatTemplate {
        reason: e.to_string(),
    }
}

impl ChatTemplate {
    /// Compiles `template` (Jinja source) with the given special tokens (`bos_token` →
    /// `<|begin_of_text|>`, ...).
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when the template does not compile.
    pub fn new(template: &str, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        Self::with_named(
            vec![("default".to_string(), template.to_string())],
            special_tokens,
            TemplateSource::Given,
        )
    }

    /// The template of the checkpoint in `dir`: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates of which `default` is used, and
    /// `tool_use` when tools are given), else `chat_template.json`, else [`LLAMA4_CHAT_TEMPLATE`].
    /// Special tokens come from `tokenizer_config.json` when it exists.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::ConfigJson`] for unreadable files, [`Error::ChatTemplate`] when the
    /// template does not compile.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let special = config.as_ref().map(special_tokens).unwrap_or_default();
        let jinja = dir.join("chat_template.jinja");
        if let Some(bytes) = llama4_core::input::read_optional_json(&jinja)? {
            let text = String::from_utf8(bytes).map_err(|_| Error::ConfigJson {
                path: jinja.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            return Self::with_named(
                vec![("default".into(), text)],
                special,
                TemplateSource::ChatTemplateJinja,
            );
        }
        if let Some(t) = config.as_ref().and_then(|c| c.get("chat_template")) {
            let named = named_templates(t).ok_or_else(|| Error::ConfigJson {
                path: dir.join("tokenizer_config.json"),
                reason: "`chat_template` is neither a string nor a list of {name, template}".into(),
            })?;
            return Self::with_named(named, special, TemplateSource::TokenizerConfig);
        }
        let json_path = dir.join("chat_template.json");
        if let Some(j) = read_json_if_present(&json_path)? {
            let text = j
                .get("chat_template")
                .and_then(Json::as_str)
                .ok_or_else(|| Error::ConfigJson {
                    path: json_path,
                    reason: "no string `chat_template`".into(),
                })?;
            return Self::with_named(
                vec![("default".into(), text.to_string())],
                special,
                TemplateSource::ChatTemplateJson,
            );
        }
        Self::with_named(
            vec![("default".into(), LLAMA4_CHAT_TEMPLATE.to_string())],
            special,
            TemplateSource::Llama4Default,
        )
    }

    fn with_named(
        templates: Vec<(String, String)>,
        special_tokens: BTreeMap<String, String>,
        source: TemplateSource,
    ) -> Result<Self> {
        let mut env = hugging_face_environment()?;
        let mut has_default = false;
        let mut has_tool_use = false;
        for (name, text) in templates {
            has_default |= name == "default";
            has_tool_use |= name == "tool_use";
            env.add_template_owned(name, strip_generation_tags(&text))
                .map_err(template_err)?;
        }
        if !has_default {
            return Err(Error::ChatTemplate {
                reason: "no template named `default`".into(),
            });
        }
        Ok(ChatTemplate {
            env,
            has_tool_use,
            special_tokens,
            source,
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// The special tokens the template is rendered with.
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// Renders `messages` (objects with `role` and `content`, `content` a string or a list of
    /// parts such as `{"type": "text", "text": ...}` and `{"type": "image"}`; assistant messages
    /// may carry `tool_calls`). As transformers does, keys whose value is `null` are dropped and
    /// a message's reasoning is also offered under `thinking` and `reasoning_content`.
    ///
    /// # Errors
    /// [`Error::ChatRejected`] when the template raises (`raise_exception`), [`Error::ChatTemplate`]
    /// when rendering fails otherwise or a message is not an object.
    pub fn render(&self, messages: &[Json], options: &ChatOptions) -> Result<String> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| normalise_message(i, m))
            .collect::<Result<Vec<_>>>()?;
        let name = if options.tools.is_some() && self.has_tool_use {
            "tool_use"
        } else {
            "default"
        };
        let template = self.env.get_template(name).map_err(template_err)?;
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        for (k, v) in &options.extra {
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        ctx.insert("messages".into(), Value::from(Serde(&messages)));
        ctx.insert("tools".into(), Value::from(Serde(&options.tools)));
        ctx.insert("documents".into(), Value::from(Serde(&options.documents)));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(options.add_generation_prompt),
        );
        template.render(ctx).map_err(template_err)
    }
}

/// A message as transformers hands it to the template: `null` values dropped, reasoning aliased.
fn normalise_message(i: usize, m: &Json) -> Result<Json> {
    let obj = m.as_object().ok_or_else(|| Error::ChatTemplate {
        reason: format!("message {i} is not an object"),
    })?;
    let kept: serde_json::Map<String, Json> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| kept.get(*k).cloned());
    Ok(match reasoning {
        // `{"thinking": r, **message, "reasoning_content": r}`, in that key order.
        Some(r) => {
            let mut out = serde_json::Map::new();
            out.insert("thinking".into(), r.clone());
            // An existing key keeps its place (insertion order is preserved).
            out.extend(kept);
            out.insert("reasoning_content".into(), r);
            Json::Object(out)
        }
        None => Json::Object(kept),
    })
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    let Some(bytes) = llama4_core::input::read_optional_json(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::ConfigJson {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// `bos_token` and the other named special tokens of a `tokenizer_config.json`, each a string
/// or an added-token object with `content`.
pub fn special_tokens(tokenizer_config: &Json) -> BTreeMap<String, String> {
    SPECIAL_TOKEN_NAMES
        .iter()
        .filter_map(|&name| {
            let v = tokenizer_config.get(name)?;
            let text = v.as_str().or_else(|| v.get("content").and_then(Json::as_str))?;
            Some((name.to_string(), text.to_string()))
        })
        .collect()
}

/// `chat_template` as a string (named `default`) or as `[{"name", "template"}, ...]`.
fn named_templates(v: &Json) -> Option<Vec<(String, String)>> {
    if let Some(s) = v.as_str() {
        return Some(vec![("default".into(), s.to_string())]);
    }
    v.as_array()?
        .iter()
        .map(|t| {
            Some((
                t.get("name")?.as_str()?.to_string(),
                t.get("template")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Removes `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask extension:
/// the tags render their body unchanged, and minijinja does not know them).
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A minijinja environment that renders as transformers' `ImmutableSandboxedEnvironment` does.
fn hugging_face_environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(template_err)?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Python prints `True`, `False` and `None`; minijinja would print them lower-case.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(fmt_err),
        ValueKind::None => out.write_str("None").map_err(fmt_err),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)),
            )
        },
    );
    env.add_function(
        "strftime_now",
        |format: String| -> std::result::Result<String, minijinja::Error> {
            let mut s = String::new();
            write!(s, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("bad strftime format {format:?}"),
                )
            })?;
            Ok(s)
        },
    );
    env.add_filter("tojson", tojson);
    Ok(env)
}

fn fmt_err(_: std::fmt::Error) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::WriteFailure, "formatting failed")
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with those keyword arguments accepted.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.as_str().map(str::to_string).ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                )
            })?),
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let writer = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    writer.write(&value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps` output for a template value.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                let items = keys
                    .into_iter()
                    .map(|k| {
                        let item = v.get_item(&k)?;
                        Ok((k, item))
                    })
                    .collect::<std::result::Result<Vec<_>, minijinja::Error>>()?;
                self.container(('{', '}'), &items, level, out, |(k, item), level, out| {
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(item, level, out)
                })?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(('[', ']'), &items, level, out, |item, level, out| {
                    self.write(item, level, out)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn container<T>(
        &self,
        (open, close): (char, char),
        items: &[T],
        level: usize,
        out: &mut String,
        mut each: impl FnMut(&T, usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(level + 1));
            }
            each(item, level + 1, out)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `repr(float)` in Python: the shortest digits that read back, in fixed notation for decimal
/// exponents from -4 to 15 (with `.0` when integral), otherwise as `1.5e-07` / `2.5e+20`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let body = if (-4..16).contains(&exp) {
        let point = exp + 1;
        if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exp.abs())
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (0.5, "0.5"),
            (1e-7, "1e-07"),
            (2.5e20, "2.5e+20"),
            (-3.0, "-3.0"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (f64::INFINITY, "Infinity"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn generation_tags_are_removed_and_nothing_else() {
        let src = "a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}";
        assert_eq!(strip_generation_tags(src), "abc{% if x %}d{% endif %}");
    }

    #[test]
    fn raise_exception_is_reported_as_the_templates_verdict() {
        let t = ChatTemplate::new("{{ raise_exception('no ' ~ messages|length) }}", BTreeMap::new()).unwrap();
        let err = t.render(&[], &ChatOptions::default()).unwrap_err();
        assert!(matches!(&err, Error::ChatRejected(m) if m == "no 0"), "{err}");
        let t = ChatTemplate::new("{{ messages[0].content.nope() }}", BTreeMap::new()).unwrap();
        let msg = serde_json::json!({"role": "user", "content": "x"});
        let err = t.render(&[msg], &ChatOptions::default()).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate { .. }), "{err}");
        let err = ChatTemplate::new("{% if %}", BTreeMap::new()).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate { .. }), "{err}");
    }
}
