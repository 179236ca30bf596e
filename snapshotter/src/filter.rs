//! containerd's filter syntax, as accepted by `ctr snapshots ls` and the Walk/List API:
//!
//! ```text
//! filters  := filter ( "|" filter )*
//! filter   := selector ( "," selector )*
//! selector := fieldpath [ ( "==" | "!=" | "~=" ) value ]
//! fieldpath:= field ( "." field )*          field := identifier | "quoted"
//! value    := "quoted" | /regexp/ | bare text up to "," or "|"
//! ```
//! A selector without an operator tests that the field is present. Several filter strings are
//! alternatives (OR), as in containerd's `filters.ParseAll`.

use regex::Regex;

use crate::error::{Error, Result};

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: any of its conjunctions matches.
#[derive(Debug, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses filter strings; no strings (or only empty ones) match everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                continue;
            }
            let mut p = Parser { src: f, pos: 0 };
            any.extend(p.filters()?);
        }
        Ok(Filter { any })
    }

    /// Whether a thing whose fields are looked up by `field` matches. `field` returns `None` for
    /// a field the thing does not have.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        if self.any.is_empty() {
            return true;
        }
        self.any.iter().any(|all| {
            all.iter().all(|s| {
                let value = field(&s.path);
                match &s.op {
                    Op::Present => value.is_some(),
                    Op::Equal(want) => value.as_deref() == Some(want.as_str()),
                    Op::NotEqual(want) => value.as_deref() != Some(want.as_str()),
                    Op::Matches(re) => value.is_some_and(|v| re.is_match(&v)),
                }
            })
        })
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> Error {
        Error::InvalidArgument(format!(
            "invalid filter {:?} at offset {}: {what}; the syntax is field==value, joined by ',' (and) or '|' (or), e.g. kind==committed,labels.\"k\"==v",
            self.src, self.pos
        ))
    }

    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.src.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn filters(&mut self) -> Result<Vec<Vec<Selector>>> {
        let mut out = vec![self.conjunction()?];
        while self.eat("|") {
            out.push(self.conjunction()?);
        }
        self.skip_ws();
        if !self.rest().is_empty() {
            return Err(self.error("unexpected text"));
        }
        Ok(out)
    }

    fn conjunction(&mut self) -> Result<Vec<Selector>> {
        let mut out = vec![self.selector()?];
        while self.eat(",") {
            out.push(self.selector()?);
        }
        Ok(out)
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.eat(".") {
            path.push(self.field()?);
        }
        let op = if self.eat("==") {
            Op::Equal(self.value()?)
        } else if self.eat("!=") {
            Op::NotEqual(self.value()?)
        } else if self.eat("~=") {
            let pattern = self.value()?;
            let re = Regex::new(&pattern)
                .map_err(|e| self.error(&format!("bad regular expression: {e}")))?;
            Op::Matches(re)
        } else {
            self.skip_ws();
            match self.rest().chars().next() {
                None | Some(',') | Some('|') => Op::Present,
                Some('=') | Some('!') | Some('~') => {
                    return Err(self.error("unknown operator; use ==, != or ~="))
                }
                Some(_) => return Err(self.error("expected an operator (==, != or ~=)")),
            }
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String> {
        self.skip_ws();
        if self.rest().starts_with('"') {
            return self.quoted('"');
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest().len());
        if len == 0 || !self.rest().starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(self.error("expected a field name"));
        }
        let field = self.rest()[..len].to_string();
        self.pos += len;
        Ok(field)
    }

    fn value(&mut self) -> Result<String> {
        self.skip_ws();
        match self.rest().chars().next() {
            Some('"') => self.quoted('"'),
            Some('/') => self.quoted('/'),
            Some(_) => {
                let len = self.rest().find([',', '|']).unwrap_or(self.rest().len());
                let value = self.rest()[..len].trim_end().to_string();
                if value.is_empty() {
                    return Err(self.error("expected a value"));
                }
                self.pos += len;
                Ok(value)
            }
            None => Err(self.error("expected a value")),
        }
    }

    /// A string between `delim`s; backslash escapes the delimiter, a backslash and \n \t.
    fn quoted(&mut self, delim: char) -> Result<String> {
        let start = self.pos;
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, e)) if e == delim || e == '\\' => out.push(e),
                    Some((_, e)) if delim == '/' => {
                        // Keep regex escapes such as \d intact.
                        out.push('\\');
                        out.push(e);
                    }
                    _ => return Err(self.error("bad escape in quoted string")),
                },
                c if c == delim => {
                    self.pos = start + i + c.len_utf8();
                    return Ok(out);
                }
                c => out.push(c),
            }
        }
        Err(self.error("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn thing(
        kind: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> impl Fn(&[String]) -> Option<String> {
        let kind = kind.to_string();
        let name = name.to_string();
        let labels: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |path: &[String]| match path.first().map(String::as_str) {
            Some("kind") => Some(kind.clone()),
            Some("name") => Some(name.clone()),
            Some("labels") if path.len() > 1 => labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }

    fn matches(filter: &str, t: &impl Fn(&[String]) -> Option<String>) -> bool {
        Filter::parse_all(&[filter]).unwrap().matches(t)
    }

    #[test]
    fn selectors_and_operators() {
        let t = thing(
            "committed",
            "base",
            &[("containerd.io/snapshot/x", "1"), ("a", "b c")],
        );
        assert!(matches("kind==committed", &t));
        assert!(!matches("kind==active", &t));
        assert!(matches("kind!=active", &t));
        assert!(matches(r#"labels."containerd.io/snapshot/x"==1"#, &t));
        assert!(matches(r#"labels."containerd.io/snapshot/x""#, &t));
        assert!(!matches("labels.missing", &t));
        assert!(matches("labels.a==b c", &t));
        assert!(matches(r#"labels.a=="b c""#, &t));
        assert!(matches("name~=/^ba/", &t));
        assert!(matches("name~=^b.*e$", &t));
        assert!(matches("kind==active|name==base", &t));
        assert!(!matches("kind==committed,name==other", &t));
        assert!(matches(" kind == committed , name == base ", &t));
    }

    #[test]
    fn several_strings_are_alternatives() {
        let t = thing("active", "k", &[]);
        assert!(Filter::parse_all(&["kind==view", "name==k"])
            .unwrap()
            .matches(&t));
        assert!(Filter::parse_all::<&str>(&[]).unwrap().matches(&t));
    }

    #[test]
    fn malformed_filters_are_refused_with_position() {
        for bad in [
            "kind==",
            "kind=committed",
            "==x",
            "labels.\"unterminated",
            "kind==a,",
            "name~=(",
            "9abc==x",
        ] {
            let err = Filter::parse_all(&[bad]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains("invalid filter"), "{err}");
        }
    }
}
