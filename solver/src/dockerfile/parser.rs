//! Dockerfile text to instruction nodes: parser directives, comments, line continuations,
//! heredocs. No meaning is given to instructions here (see `instructions`).

use super::DockerfileError;

/// A heredoc body attached to an instruction (`RUN <<EOF`).
#[derive(Debug, Clone, PartialEq)]
pub struct Heredoc {
    pub name: String,
    pub content: String,
    /// `<<EOF` (unquoted) expands variables; `<<"EOF"` / `<<'EOF'` does not.
    pub expand: bool,
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// The instruction word, lowercased.
    pub instruction: String,
    /// `--name=value` flags before the arguments, without the dashes.
    pub flags: Vec<String>,
    /// The arguments, continuations joined.
    pub args: String,
    pub heredocs: Vec<Heredoc>,
    /// The whole instruction as written (for history and progress).
    pub original: String,
}

/// Parser directives from the top of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Directives {
    pub syntax: Option<String>,
    pub escape: char,
}

#[derive(Debug, Clone)]
pub struct Parsed {
    pub directives: Directives,
    pub nodes: Vec<Node>,
}

fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?.trim();
    let (k, v) = body.split_once('=')?;
    let k = k.trim().to_ascii_lowercase();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((k, v.trim().to_string()))
}

/// The `# syntax = NAME` directive of a source file, read without parsing the rest (it picks
/// the frontend, which may not read Dockerfiles at all).
pub fn syntax(text: &str) -> Option<String> {
    text.lines()
        .map_while(directive)
        .find(|(k, _)| k == "syntax")
        .map(|(_, v)| v)
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Parsed, DockerfileError> {
    let mut c = Cursor {
        lines: text.lines().collect(),
        i: 0,
    };
    let directives = c.directives()?;
    let mut nodes = Vec::new();
    while c.i < c.lines.len() {
        let start = c.i;
        let first = c.lines[start].trim_start();
        c.i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let (logical, mut original) = c.logical_line(start, directives.escape);
        let (instruction, flags, args) = split_instruction(&logical);
        let mut heredocs = Vec::new();
        if matches!(instruction.as_str(), "run" | "copy" | "add") {
            for (name, expand, strip_tabs) in heredoc_markers(&args) {
                let Some(content) = c.heredoc(&name, strip_tabs, &mut original) else {
                    return Err(DockerfileError::at(
                        start + 1,
                        format!("unterminated heredoc <<{name}: add a line containing only {name}"),
                    ));
                };
                heredocs.push(Heredoc {
                    name,
                    content,
                    expand,
                });
            }
        }
        nodes.push(Node {
            line: start + 1,
            instruction,
            flags,
            args,
            heredocs,
            original,
        });
    }
    Ok(Parsed { directives, nodes })
}

/// The instruction word (lowercased), its `--flags` and the rest of a logical line.
fn split_instruction(logical: &str) -> (String, Vec<String>, String) {
    let (word, rest) = match logical.find(char::is_whitespace) {
        Some(p) => (&logical[..p], logical[p..].trim_start()),
        None => (logical, ""),
    };
    let mut rest = rest;
    let mut flags = Vec::new();
    while rest.starts_with("--") {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        flags.push(rest[2..end].to_string());
        rest = rest[end..].trim_start();
    }
    (word.to_ascii_lowercase(), flags, rest.to_string())
}

/// A position in the lines of a Dockerfile.
struct Cursor<'a> {
    lines: Vec<&'a str>,
    i: usize,
}

impl Cursor<'_> {
    /// The parser directives, only at the very top: before any blank line, comment or
    /// instruction.
    fn directives(&mut self) -> Result<Directives, DockerfileError> {
        let mut d = Directives {
            syntax: None,
            escape: '\\',
        };
        while let Some((k, v)) = self.lines.get(self.i).and_then(|l| directive(l)) {
            match k.as_str() {
                "syntax" => d.syntax = Some(v),
                "escape" => {
                    d.escape = match v.as_str() {
                        "\\" => '\\',
                        "`" => '`',
                        _ => {
                            return Err(DockerfileError::at(
                                self.i + 1,
                                format!("invalid escape directive {v:?}: use \\ or `"),
                            ))
                        }
                    }
                }
                "check" => {}
                _ => break,
            }
            self.i += 1;
        }
        Ok(d)
    }

    /// The instruction starting at line `start` with its continuation lines joined (comment and
    /// blank lines inside it dropped), and the lines as written.
    fn logical_line(&mut self, start: usize, esc: char) -> (String, String) {
        let mut logical = String::new();
        let mut original = String::from(self.lines[start]);
        let mut current = self.lines[start].trim().to_string();
        while current.ends_with(esc) {
            current.pop();
            logical.push_str(&current);
            current = String::new();
            while let Some(next) = self.lines.get(self.i) {
                self.i += 1;
                original.push('\n');
                original.push_str(next);
                let t = next.trim_start();
                if !(t.starts_with('#') || t.is_empty()) {
                    current = next.trim_end().to_string();
                    break;
                }
            }
        }
        logical.push_str(&current);
        (logical, original)
    }

    /// The body of heredoc `name` (tabs stripped for `<<-`), appended to `original` as it is
    /// read; None when the file ends before its closing line.
    fn heredoc(&mut self, name: &str, strip_tabs: bool, original: &mut String) -> Option<String> {
        let mut content = String::new();
        while let Some(l) = self.lines.get(self.i) {
            self.i += 1;
            original.push('\n');
            original.push_str(l);
            let cmp = if strip_tabs {
                l.trim_start_matches('\t')
            } else {
                l
            };
            if cmp == name {
                return Some(content);
            }
            content.push_str(cmp);
            content.push('\n');
        }
        None
    }
}

/// The heredoc markers (`<<EOF`, `<<-EOF`, `<<"EOF"`) in an instruction's arguments, in order.
fn heredoc_markers(args: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(p) = rest.find("<<") {
        let mut s = &rest[p + 2..];
        let strip_tabs = s.starts_with('-');
        if strip_tabs {
            s = &s[1..];
        }
        let (quoted, s2) = match s.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &s[1..]),
            _ => (None, s),
        };
        let end = s2
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s2.len());
        let name = &s2[..end];
        if !name.is_empty()
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        {
            out.push((name.to_string(), quoted.is_none(), strip_tabs));
        }
        rest = &s2[end..];
        if let Some(q) = quoted {
            rest = rest.strip_prefix(q).unwrap_or(rest);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_continuations_comments_heredocs() {
        let text = "# syntax=docker/dockerfile:1\n# escape=\\\nFROM busybox AS base\n# a comment\nRUN echo a \\\n  # inside\n  && echo b\nCOPY --chown=1:2 --chmod=644 a b /dst/\nRUN <<EOF\necho one\necho two\nEOF\nRUN <<-'X' cat\n\tliteral $HOME\n\tX\n";
        let p = parse(text).unwrap();
        assert_eq!(p.directives.syntax.as_deref(), Some("docker/dockerfile:1"));
        let n = &p.nodes;
        assert_eq!(n.len(), 5);
        assert_eq!(
            (n[0].line, n[0].instruction.as_str(), n[0].args.as_str()),
            (3, "from", "busybox AS base")
        );
        assert_eq!(n[1].args, "echo a   && echo b");
        assert_eq!(n[2].flags, ["chown=1:2", "chmod=644"]);
        assert_eq!(n[2].args, "a b /dst/");
        assert_eq!(n[3].heredocs[0].content, "echo one\necho two\n");
        assert!(n[3].heredocs[0].expand);
        assert_eq!(n[4].heredocs[0].content, "literal $HOME\n");
        assert!(!n[4].heredocs[0].expand);
        assert_eq!(n[4].line, 13);
    }

    #[test]
    fn backtick_escape_and_errors() {
        let p = parse("# escape=`\nFROM x\nRUN dir `\n  c:\\\n").unwrap();
        assert_eq!(p.nodes[1].args, "dir   c:\\");
        let err = parse("FROM x\nRUN <<EOF\necho\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.to_string().contains("unterminated heredoc"), "{err}");
        assert!(parse("# escape=x\nFROM a\n").is_err());
    }
}
