//! Shell-like word processing for Dockerfile arguments: quotes, escapes and `$var`, `${var}`,
//! `${var:-default}`, `${var-default}`, `${var:+alt}`, `${var+alt}`.

/// Splits `input` into words (quote-aware) and expands variables from `lookup`.
pub fn words(
    input: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, String> {
    process(input, escape, lookup, true)
}

/// Expands one word: quotes removed, variables expanded, whitespace kept.
pub fn word(
    input: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    Ok(process(input, escape, lookup, false)?.join(" "))
}

fn process(
    input: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
    split: bool,
) -> Result<Vec<String>, String> {
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
            if let Some(&n) = chars.get(i + 1) {
                cur.push(n);
                i += 2;
            } else {
                cur.push(c);
                i += 1;
            }
        } else if c == '\'' {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == '\'')
                .ok_or("unterminated single quote")?;
            cur.extend(&chars[i + 1..i + 1 + end]);
            i += end + 2;
        } else if c == '"' {
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err("unterminated double quote".into());
                };
                if d == '"' {
                    i += 1;
                    break;
                }
                if d == escape && matches!(chars.get(i + 1), Some('"' | '$') | Some('\\')) {
                    cur.push(chars[i + 1]);
                    i += 2;
                } else if d == '$' {
                    i = variable(&chars, i, escape, lookup, &mut cur)?;
                } else {
                    cur.push(d);
                    i += 1;
                }
            }
        } else if c == '$' {
            i = variable(&chars, i, escape, lookup, &mut cur)?;
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

/// Expands the variable at `chars[i] == '$'`, appending to `out`; returns the next index.
fn variable(
    chars: &[char],
    i: usize,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<usize, String> {
    let mut j = i + 1;
    if chars.get(j) == Some(&'{') {
        j += 1;
        let start = j;
        while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        let name: String = chars[start..j].iter().collect();
        if name.is_empty() {
            return Err("bad substitution: empty variable name in ${}".into());
        }
        let close = find_close(chars, j).ok_or_else(|| format!("missing }} after ${{{name}"))?;
        let modifier: String = chars[j..close].iter().collect();
        let value = lookup(&name);
        let expanded = if modifier.is_empty() {
            value.unwrap_or_default()
        } else {
            let (op, arg) = if modifier.starts_with(":-") || modifier.starts_with(":+") {
                (&modifier[..2], &modifier[2..])
            } else if modifier.starts_with('-') || modifier.starts_with('+') {
                (&modifier[..1], &modifier[1..])
            } else {
                return Err(format!("unsupported modifier {modifier:?} in ${{{name}{modifier}}}: use :-, -, :+ or +"));
            };
            let arg = word(arg, escape, lookup)?;
            match op {
                ":-" => value.filter(|v| !v.is_empty()).unwrap_or(arg),
                "-" => value.unwrap_or(arg),
                ":+" => value
                    .filter(|v| !v.is_empty())
                    .map(|_| arg)
                    .unwrap_or_default(),
                _ => value.map(|_| arg).unwrap_or_default(),
            }
        };
        out.push_str(&expanded);
        Ok(close + 1)
    } else {
        let start = j;
        while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        if j == start {
            out.push('$');
            return Ok(j);
        }
        let name: String = chars[start..j].iter().collect();
        out.push_str(&lookup(&name).unwrap_or_default());
        Ok(j)
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
}
