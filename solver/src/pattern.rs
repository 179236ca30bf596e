//! Path patterns: Go's `filepath.Match` (`*`, `?`, `[a-z]`, `[^x]`, `\` escapes) per path segment,
//! plus `**` for any number of segments, and `.dockerignore` rules with `!` exceptions.

/// Whether `path` (relative, `/`-separated, clean) matches `pattern`.
pub fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let s: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match_segments(&p, &s)
}

fn match_segments(p: &[&str], s: &[&str]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((&"**", rest)) => (0..=s.len()).any(|i| match_segments(rest, &s[i..])),
        Some((first, rest)) => match s.split_first() {
            Some((seg, srest)) => {
                match_segment(first.as_bytes(), seg.as_bytes()) && match_segments(rest, srest)
            }
            None => false,
        },
    }
}

fn match_segment(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| match_segment(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && match_segment(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some(end) = p.iter().skip(1).position(|&c| c == b']').map(|e| e + 1) else {
                return !s.is_empty() && s[0] == b'[' && match_segment(&p[1..], &s[1..]);
            };
            let Some(&c) = s.first() else { return false };
            let class = &p[1..end];
            let (negate, class) = match class.first() {
                Some(b'^') | Some(b'!') => (true, &class[1..]),
                _ => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && match_segment(&p[end + 1..], &s[1..])
        }
        Some(b'\\') if p.len() > 1 => {
            !s.is_empty() && s[0] == p[1] && match_segment(&p[2..], &s[1..])
        }
        Some(&c) => !s.is_empty() && s[0] == c && match_segment(&p[1..], &s[1..]),
    }
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
}
