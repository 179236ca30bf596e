//! Path patterns: Go's `filepath.Match` (`*`, `?`, `[a-z]`, `[^x]`, `\` escapes) per path segment,
//! plus `**` for any number of segments, and `.dockerignore` rules with `!` exceptions.

/// Whether `path` (relative, `/`-separated, clean) matches `pattern`. Polynomial in both
/// lengths (no backtracking beyond the last star), so hostile patterns cost no more than
/// pattern length times name length.
pub fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<Segment> = pattern
        .split('/')
        .filter(|s| !s.is_empty())
        .map(Segment::parse)
        .collect();
    let s: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    wildcard(
        &p,
        &s,
        |seg| matches!(seg, Segment::AnyDepth),
        |seg, name| match seg {
            Segment::AnyDepth => true,
            Segment::Glob(toks) => wildcard(
                toks,
                name.as_bytes(),
                |t| matches!(t, Tok::Star),
                |t, c| t.accepts(*c),
            ),
        },
    )
}

/// One `/`-separated part of a pattern: `**` or a `filepath.Match` glob.
enum Segment {
    AnyDepth,
    Glob(Vec<Tok>),
}

impl Segment {
    fn parse(s: &str) -> Segment {
        if s == "**" {
            Segment::AnyDepth
        } else {
            Segment::Glob(tokens(s.as_bytes()))
        }
    }
}

/// One element of a glob: a star, or something that matches exactly one byte.
enum Tok {
    Star,
    Any,
    Byte(u8),
    Class { negate: bool, ranges: Vec<(u8, u8)> },
}

impl Tok {
    fn accepts(&self, c: u8) -> bool {
        match self {
            Tok::Star | Tok::Any => true,
            Tok::Byte(b) => *b == c,
            Tok::Class { negate, ranges } => {
                ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negate
            }
        }
    }
}

fn tokens(p: &[u8]) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let (tok, next) = match p[i] {
            b'*' => (Tok::Star, i + 1),
            b'?' => (Tok::Any, i + 1),
            b'\\' if i + 1 < p.len() => (Tok::Byte(p[i + 1]), i + 2),
            b'[' => match p[i + 1..].iter().position(|&c| c == b']') {
                Some(len) => (class(&p[i + 1..i + 1 + len]), i + len + 2),
                None => (Tok::Byte(b'['), i + 1), // unclosed: a literal bracket
            },
            c => (Tok::Byte(c), i + 1),
        };
        // Consecutive stars are one star.
        if !(matches!(tok, Tok::Star) && matches!(out.last(), Some(Tok::Star))) {
            out.push(tok);
        }
        i = next;
    }
    out
}

fn class(body: &[u8]) -> Tok {
    let (negate, body) = match body.first() {
        Some(b'^') | Some(b'!') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == b'-' {
            ranges.push((body[i], body[i + 2]));
            i += 3;
        } else {
            ranges.push((body[i], body[i]));
            i += 1;
        }
    }
    Tok::Class { negate, ranges }
}

/// Matches `items` against `pattern`, where `star` elements match any run of items and the rest
/// match one item each (`one`). Greedy, going back only to the most recent star: a later star
/// can always absorb what an earlier one would, so no other backtracking is needed.
fn wildcard<P, T>(
    pattern: &[P],
    items: &[T],
    star: impl Fn(&P) -> bool,
    one: impl Fn(&P, &T) -> bool,
) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while i < items.len() {
        if p < pattern.len() && star(&pattern[p]) {
            resume = Some((p + 1, i));
            p += 1;
        } else if p < pattern.len() && one(&pattern[p], &items[i]) {
            p += 1;
            i += 1;
        } else if let Some((after_star, from)) = resume {
            resume = Some((after_star, from + 1));
            p = after_star;
            i = from + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(star)
}

/// Whether `pattern` has wildcard characters.
pub fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// `.dockerignore` rules in order; the last rule that matches a path (or one of its parents) wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ignore {
    rules: Vec<(String, bool)>,
}

impl Ignore {
    /// Parses `.dockerignore` text: one pattern a line, `#` comments, `!` exceptions.
    pub fn parse(text: &str) -> Ignore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (neg, p) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                (clean(p), neg)
            })
            .filter(|(p, _)| !p.is_empty())
            .collect();
        Ignore { rules }
    }

    pub fn patterns(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|(p, neg)| if *neg { format!("!{p}") } else { p.clone() })
            .collect()
    }

    pub fn from_patterns(patterns: &[String]) -> Ignore {
        Ignore::parse(&patterns.join("\n"))
    }

    /// Whether `path` (relative, clean) is excluded from the context.
    pub fn excludes(&self, path: &str) -> bool {
        let mut excluded = false;
        for (pattern, negate) in &self.rules {
            // A rule matches the path or any of its parent directories.
            let mut hit = matches(pattern, path);
            let mut parent = path;
            while !hit {
                match parent.rsplit_once('/') {
                    Some((p, _)) => {
                        parent = p;
                        hit = matches(pattern, parent);
                    }
                    None => break,
                }
            }
            if hit {
                excluded = !negate;
            }
        }
        excluded
    }
}

/// `./a//b/` -> `a/b`; leading `/` dropped; `..` segments dropped (a context never escapes).
pub fn clean(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_match_semantics() {
        assert!(matches("foo*", "foo2"));
        assert!(!matches("foo*", "bar/foo2"));
        assert!(matches("*/foo", "bar/foo"));
        assert!(matches("f?o", "foo"));
        assert!(matches("[a-c]x", "bx"));
        assert!(!matches("[^a-c]x", "bx"));
        assert!(matches("**/*.go", "a/b/c.go"));
        assert!(matches("**/*.go", "c.go"));
        assert!(matches("a/**", "a/b/c"));
        assert!(matches("\\*", "*"));
    }

    #[test]
    fn dockerignore_rules() {
        let ig = Ignore::parse("# comment\nnode_modules\n*.log\n!keep.log\ndocs/**/*.md\n");
        assert!(ig.excludes("node_modules"));
        assert!(ig.excludes("node_modules/x/y.js"));
        assert!(ig.excludes("a.log"));
        assert!(!ig.excludes("keep.log"));
        assert!(ig.excludes("docs/a/b.md"));
        assert!(!ig.excludes("src/main.rs"));
        assert_eq!(clean("./a//b/../c/"), "a/c");
        assert_eq!(clean("../../etc"), "etc");
    }

    #[test]
    fn hostile_patterns_take_polynomial_time() {
        let name = "x".repeat(200);
        let pattern = format!("d/d/d/{}y", "*x".repeat(40));
        assert!(!matches(&pattern, &format!("d/d/d/{name}")));
        let deep = format!("{}z", "**/".repeat(8));
        let path = vec!["a"; 60].join("/");
        assert!(!matches(&deep, &path));
        assert!(matches(&deep, &format!("{path}/z")));
        let ig = Ignore::parse(&format!("{pattern}\n{deep}\n"));
        assert!(!ig.excludes(&format!("d/d/d/{name}/{path}")));
    }

    #[test]
    fn classes_escapes_and_stars() {
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXbYd"));
        assert!(matches("*", "anything"));
        assert!(!matches("*", "a/b"));
        assert!(matches("[!a]?", "bc"));
        assert!(matches("[", "["));
        assert!(matches("**", "a/b/c"));
        assert!(matches("a/**/b", "a/b"));
        assert!(matches("a/**/b", "a/x/y/b"));
        assert!(!matches("a/**/b", "a/x/y/c"));
    }
}
