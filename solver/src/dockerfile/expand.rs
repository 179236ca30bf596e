//! Shell-like word processing for Dockerfile arguments: quotes, escapes and `$var`, `${var}`,
//! `${var:-default}`, `${var-default}`, `${var:+alt}`, `${var+alt}`.

use super::WordError;

/// How deep `${a:-${b:-...}}` may nest: far beyond any real Dockerfile, far below the stack's end.
pub const MAX_NESTING: usize = 64;
/// How much one instruction's words may expand to: variables that double themselves
/// (`ARG b=${a}${a}`) reach it in a few lines instead of exhausting memory.
pub const MAX_EXPANDED: usize = 1 << 20;

/// Splits `input` into words (quote-aware) and expands variables from `lookup`.
pub fn words(
    input: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, WordError> {
    Expander::new(escape, lookup).process(input, true)
}

/// Expands one word: quotes removed, variables expanded, whitespace kept.
pub fn word(
    input: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, WordError> {
    Expander::new(escape, lookup).word(input)
}

/// One expansion, with its nesting depth and the bytes variables produced so far.
struct Expander<'a> {
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    depth: usize,
    produced: usize,
}

impl<'a> Expander<'a> {
    fn new(escape: char, lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Expander {
            escape,
            lookup,
            depth: 0,
            produced: 0,
        }
    }

    fn word(&mut self, input: &str) -> Result<String, WordError> {
        Ok(self.process(input, false)?.join(" "))
    }

    fn process(&mut self, input: &str, split: bool) -> Result<Vec<String>, WordError> {
        let escape = self.escape;
        let chars: Vec<char> = input.chars().collect();
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if split && c.is_whitespace() {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                i += 1;
                continue;
            }
            in_word = true;
            if c == escape {
                cur.push(*chars.get(i + 1).unwrap_or(&c));
                i += if i + 1 < chars.len() { 2 } else { 1 };
            } else if c == '\'' {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&x| x == '\'')
                    .ok_or("unterminated single quote")?;
                cur.extend(&chars[i + 1..i + 1 + end]);
                i += end + 2;
            } else if c == '"' {
                i = self.double_quoted(&chars, i + 1, &mut cur)?;
            } else if c == '$' {
                i = self.variable(&chars, i, &mut cur)?;
            } else {
                cur.push(c);
                i += 1;
            }
        }
        if in_word || (!split && out.is_empty()) {
            out.push(cur);
        }
        Ok(out)
    }

    /// The inside of a double-quoted string starting at `chars[i]`; returns the index after it.
    fn double_quoted(
        &mut self,
        chars: &[char],
        mut i: usize,
        cur: &mut String,
    ) -> Result<usize, WordError> {
        loop {
            let Some(&d) = chars.get(i) else {
                return Err("unterminated double quote".into());
            };
            if d == '"' {
                return Ok(i + 1);
            }
            if d == self.escape && matches!(chars.get(i + 1), Some('"' | '$') | Some('\\')) {
                cur.push(chars[i + 1]);
                i += 2;
            } else if d == '$' {
                i = self.variable(chars, i, cur)?;
            } else {
                cur.push(d);
                i += 1;
            }
        }
    }

    /// Expands the variable at `chars[i] == '$'`, appending to `out`; returns the next index.
    fn variable(&mut self, chars: &[char], i: usize, out: &mut String) -> Result<usize, WordError> {
        let braced = chars.get(i + 1) == Some(&'{');
        let start = i + 1 + usize::from(braced);
        let mut j = start;
        while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        let name: String = chars[start..j].iter().collect();
        let (value, next) = if braced {
            if name.is_empty() {
                return Err("bad substitution: empty variable name in ${}".into());
            }
            let close =
                find_close(chars, j).ok_or_else(|| format!("missing }} after ${{{name}"))?;
            let modifier: String = chars[j..close].iter().collect();
            (self.modified(&name, &modifier)?, close + 1)
        } else if name.is_empty() {
            ("$".to_string(), j)
        } else {
            ((self.lookup)(&name).unwrap_or_default(), j)
        };
        self.produced += value.len();
        if self.produced > MAX_EXPANDED {
            return Err(format!(
                "variables expand to more than {} MiB (${name} among them): a variable that repeats itself grows without bound; shorten it",
                MAX_EXPANDED >> 20
            ).into());
        }
        out.push_str(&value);
        Ok(next)
    }

    /// `${name<modifier>}`: `:-`, `-`, `:+`, `+` or none.
    fn modified(&mut self, name: &str, modifier: &str) -> Result<String, WordError> {
        let value = (self.lookup)(name);
        if modifier.is_empty() {
            return Ok(value.unwrap_or_default());
        }
        let (op, arg) = if modifier.starts_with(":-") || modifier.starts_with(":+") {
            modifier.split_at(2)
        } else if modifier.starts_with('-') || modifier.starts_with('+') {
            modifier.split_at(1)
        } else {
            return Err(format!(
                "unsupported modifier {modifier:?} in ${{{name}{modifier}}}: use :-, -, :+ or +"
            )
            .into());
        };
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "variable expansion nested deeper than {MAX_NESTING} levels at ${{{name}...}}; flatten the ${{a:-${{b:-...}}}} chain"
            ).into());
        }
        self.depth += 1;
        let arg = self.word(arg);
        self.depth -= 1;
        let arg = arg?;
        Ok(match op {
            ":-" => value.filter(|v| !v.is_empty()).unwrap_or(arg),
            "-" => value.unwrap_or(arg),
            ":+" => value
                .filter(|v| !v.is_empty())
                .map(|_| arg)
                .unwrap_or_default(),
            _ => value.map(|_| arg).unwrap_or_default(),
        })
    }
}

fn find_close(chars: &[char], mut j: usize) -> Option<usize> {
    let mut depth = 0;
    while j < chars.len() {
        match chars[j] {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(j),
            '}' => depth -= 1,
            _ => {}
        }
        j += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            "SP" => Some("x y".into()),
            _ => None,
        }
    }

    #[test]
    fn expansion_forms() {
        let w = |s: &str| word(s, '\\', &env).unwrap();
        assert_eq!(w("$A"), "alpha");
        assert_eq!(w("${A}-b"), "alpha-b");
        assert_eq!(w("${NOPE:-dflt}"), "dflt");
        assert_eq!(w("${EMPTY:-dflt}"), "dflt");
        assert_eq!(w("${EMPTY-dflt}"), "");
        assert_eq!(w("${A:+set}"), "set");
        assert_eq!(w("${NOPE:+set}"), "");
        assert_eq!(w("${NOPE:-${A}}"), "alpha");
        assert_eq!(w("'$A'"), "$A");
        assert_eq!(w("\"$A b\""), "alpha b");
        assert_eq!(w("\\$A"), "$A");
        assert_eq!(w("cost $"), "cost $");
    }

    #[test]
    fn splitting_and_errors() {
        assert_eq!(
            words("a \"b c\" $SP", '\\', &env).unwrap(),
            ["a", "b c", "x y"]
        );
        assert!(words("\"open", '\\', &env).is_err());
        assert!(word("${A", '\\', &env).is_err());
        assert!(word("${A/x/y}", '\\', &env).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}x{}", "${a:-".repeat(5000), "}".repeat(5000));
        let e = word(&deep, '\\', &env).unwrap_err();
        assert!(e.0.contains("nested deeper than 64"), "{e}");
        let ok = format!("{}x{}", "${a:-".repeat(60), "}".repeat(60));
        assert_eq!(word(&ok, '\\', &env).unwrap(), "x");
    }

    #[test]
    fn self_doubling_variables_stop_at_the_cap() {
        let big = "x".repeat(MAX_EXPANDED / 2 + 1);
        let lookup = |n: &str| (n == "B").then(|| big.clone());
        let e = word("${B}${B}", '\\', &lookup).unwrap_err();
        assert!(e.0.contains("more than 1 MiB"), "{e}");
        assert_eq!(word("${B}", '\\', &lookup).unwrap().len(), big.len());
    }
}
