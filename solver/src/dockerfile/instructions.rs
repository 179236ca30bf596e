//! Nodes to typed instructions: argument forms, flags, and errors that name the line and suggest
//! the instruction or flag that was probably meant.

use super::parser::{Heredoc, Node};
use super::{suggest, DockerfileError};

const INSTRUCTIONS: &[&str] = &[
    "from",
    "arg",
    "env",
    "label",
    "workdir",
    "user",
    "run",
    "copy",
    "add",
    "cmd",
    "entrypoint",
    "expose",
    "volume",
    "stopsignal",
    "healthcheck",
    "shell",
    "onbuild",
    "maintainer",
];

/// Exec form (`["a", "b"]`) or shell form (`a b`).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    From {
        image: String,
        name: Option<String>,
        platform: Option<String>,
    },
    Arg(Vec<(String, Option<String>)>),
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Workdir(String),
    User(String),
    Run {
        command: Command,
        heredocs: Vec<Heredoc>,
        network: Option<String>,
        /// Raw `--mount` values, parsed (with variables) at conversion.
        mounts: Vec<String>,
    },
    Copy(Copy),
    Cmd(Command),
    Entrypoint(Command),
    Expose(Vec<String>),
    Volume(Vec<String>),
    StopSignal(String),
    Healthcheck(Option<Healthcheck>),
    Shell(Vec<String>),
    Onbuild(String),
    Maintainer(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub add: bool,
    pub srcs: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    /// ADD --checksum=sha256:... of a remote file.
    pub checksum: Option<String>,
    pub heredocs: Vec<Heredoc>,
}

/// `HEALTHCHECK CMD`, its durations in nanoseconds; an option not given is left to the runtime.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Healthcheck {
    pub test: Vec<String>,
    pub interval: Option<u64>,
    pub timeout: Option<u64>,
    pub start_period: Option<u64>,
    pub start_interval: Option<u64>,
    pub retries: Option<u64>,
}

/// An instruction with the node it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub node: Node,
    pub instruction: Instruction,
}

fn err(node: &Node, msg: impl Into<String>) -> DockerfileError {
    DockerfileError::at(node.line, msg)
}

/// Takes the flags `allowed` from a node; any other flag is an error naming it (and the closest).
fn flags(node: &Node, allowed: &[&str]) -> Result<Vec<(String, Option<String>)>, DockerfileError> {
    let mut out = Vec::new();
    for f in &node.flags {
        let (name, value) = match f.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (f.clone(), None),
        };
        if !allowed.contains(&name.as_str()) {
            let hint = suggest(&name, allowed)
                .map(|s| format!(" (did you mean --{s}?)"))
                .unwrap_or_default();
            return Err(err(
                node,
                format!(
                    "unknown flag --{name} for {}{hint}",
                    node.instruction.to_uppercase()
                ),
            ));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn flag(flags: &[(String, Option<String>)], name: &str) -> Option<String> {
    flags
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone().unwrap_or_default())
}

/// `["a","b"]` when the arguments are a JSON string array, else the raw shell form.
fn command(args: &str) -> Command {
    let t = args.trim();
    if t.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Vec<String>>(t) {
            return Command::Exec(v);
        }
    }
    Command::Shell(t.to_string())
}

/// Splits `k=v k2="v 2"` (or the legacy `k v`) into pairs; values keep quotes for later expansion.
fn pairs(node: &Node, legacy: bool) -> Result<Vec<(String, String)>, DockerfileError> {
    let parts = split_raw(&node.args).map_err(|e| err(node, e))?;
    if parts.is_empty() {
        return Err(err(
            node,
            format!(
                "{} requires at least one argument",
                node.instruction.to_uppercase()
            ),
        ));
    }
    if !parts[0].contains('=') {
        if !legacy {
            return Err(err(
                node,
                format!("{} needs key=value pairs", node.instruction.to_uppercase()),
            ));
        }
        let rest = node.args.trim()[parts[0].len()..].trim().to_string();
        if rest.is_empty() {
            return Err(err(
                node,
                format!(
                    "{} {} needs a value: write {0} {1}=value",
                    node.instruction.to_uppercase(),
                    parts[0]
                ),
            ));
        }
        return Ok(vec![(parts[0].clone(), rest)]);
    }
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(err(node, format!("{p:?} is not a key=value pair"))),
        })
        .collect()
}

/// Splits on unquoted whitespace, keeping quotes and escapes in the parts.
fn split_raw(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (_, '\\') => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (_, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Types one node.
pub fn instruction(node: &Node) -> Result<Instruction, DockerfileError> {
    let args = node.args.trim();
    Ok(match node.instruction.as_str() {
        "from" => from(node)?,
        "arg" => arg(node)?,
        "env" => Instruction::Env(pairs(node, true)?),
        "label" => Instruction::Label(pairs(node, true)?),
        "workdir" => Instruction::Workdir(needs_args(node)?.to_string()),
        "user" => Instruction::User(needs_args(node)?.to_string()),
        "run" => run(node)?,
        "copy" | "add" => Instruction::Copy(copy(node)?),
        "cmd" => Instruction::Cmd(command(needs_args(node)?)),
        "entrypoint" => Instruction::Entrypoint(command(needs_args(node)?)),
        "expose" => Instruction::Expose(split_raw(needs_args(node)?).map_err(|e| err(node, e))?),
        "volume" => Instruction::Volume(list(node, needs_args(node)?)?),
        "stopsignal" => Instruction::StopSignal(needs_args(node)?.to_string()),
        "healthcheck" => Instruction::Healthcheck(healthcheck(node)?),
        "shell" => match command(args) {
            Command::Exec(v) if !v.is_empty() => Instruction::Shell(v),
            _ => {
                return Err(err(
                    node,
                    "SHELL requires the JSON form: SHELL [\"executable\", \"param\"]",
                ))
            }
        },
        "onbuild" => Instruction::Onbuild(needs_args(node)?.to_string()),
        "maintainer" => Instruction::Maintainer(args.to_string()),
        other => {
            let hint = suggest(other, INSTRUCTIONS)
                .map(|s| format!(" (did you mean {}?)", s.to_uppercase()))
                .unwrap_or_default();
            return Err(err(
                node,
                format!("unknown instruction: {}{hint}", other.to_uppercase()),
            ));
        }
    })
}

/// The node's arguments, which must not be empty.
fn needs_args(node: &Node) -> Result<&str, DockerfileError> {
    let args = node.args.trim();
    if args.is_empty() && node.heredocs.is_empty() {
        let upper = node.instruction.to_uppercase();
        return Err(err(node, format!("{upper} requires arguments")));
    }
    Ok(args)
}

/// A JSON array, or whitespace-separated words.
fn list(node: &Node, args: &str) -> Result<Vec<String>, DockerfileError> {
    match command(args) {
        Command::Exec(v) => Ok(v),
        Command::Shell(_) => split_raw(args).map_err(|e| err(node, e)),
    }
}

fn from(node: &Node) -> Result<Instruction, DockerfileError> {
    let f = flags(node, &["platform"])?;
    let parts = split_raw(node.args.trim()).map_err(|e| err(node, e))?;
    let (image, name) = match parts.as_slice() {
        [image] => (image.clone(), None),
        [image, as_, name] if as_.eq_ignore_ascii_case("as") => {
            (image.clone(), Some(name.to_ascii_lowercase()))
        }
        _ => {
            return Err(err(
                node,
                "FROM takes an image and an optional `AS name`: FROM image [AS name]",
            ))
        }
    };
    Ok(Instruction::From {
        image,
        name,
        platform: flag(&f, "platform"),
    })
}

fn arg(node: &Node) -> Result<Instruction, DockerfileError> {
    flags(node, &[])?;
    let parts = split_raw(node.args.trim()).map_err(|e| err(node, e))?;
    if parts.is_empty() {
        return Err(err(node, "ARG requires a name: ARG NAME[=default]"));
    }
    let pair = |p: String| match p.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (p, None),
    };
    Ok(Instruction::Arg(parts.into_iter().map(pair).collect()))
}

fn run(node: &Node) -> Result<Instruction, DockerfileError> {
    let args = needs_args(node)?;
    let f = flags(node, &["network", "mount", "security"])?;
    let mounts: Vec<String> = f
        .iter()
        .filter(|(n, _)| n == "mount")
        .map(|(_, v)| v.clone().unwrap_or_default())
        .collect();
    let network = flag(&f, "network");
    if let Some(n) = network.as_deref() {
        if !matches!(n, "default" | "none" | "host") {
            return Err(err(
                node,
                format!("RUN --network={n}: use default, none or host"),
            ));
        }
    }
    Ok(Instruction::Run {
        command: command(args),
        heredocs: node.heredocs.clone(),
        network,
        mounts,
    })
}

fn copy(node: &Node) -> Result<Copy, DockerfileError> {
    let add = node.instruction == "add";
    let allowed: &[&str] = if add {
        &["chown", "chmod", "link", "checksum", "keep-git-dir"]
    } else {
        &["from", "chown", "chmod", "link", "parents", "exclude"]
    };
    let f = flags(node, allowed)?;
    let mut parts = list(node, node.args.trim())?;
    if parts.len() < 2 && (parts.len() != 1 || node.heredocs.is_empty()) {
        let upper = node.instruction.to_uppercase();
        return Err(err(
            node,
            format!("{upper} requires at least one source and a destination: {upper} src... dest"),
        ));
    }
    let dest = parts.pop().unwrap_or_default();
    Ok(Copy {
        add,
        srcs: parts,
        dest,
        from: flag(&f, "from"),
        chown: flag(&f, "chown"),
        chmod: flag(&f, "chmod"),
        link: f
            .iter()
            .any(|(n, v)| n == "link" && v.as_deref() != Some("false")),
        checksum: flag(&f, "checksum"),
        heredocs: node.heredocs.clone(),
    })
}

/// `HEALTHCHECK NONE` (None) or `HEALTHCHECK [--interval=...] CMD command`.
fn healthcheck(node: &Node) -> Result<Option<Healthcheck>, DockerfileError> {
    const OPTIONS: [&str; 5] = [
        "interval",
        "timeout",
        "start-period",
        "start-interval",
        "retries",
    ];
    let f = flags(node, &OPTIONS)?;
    let args = node.args.trim();
    let parts = split_raw(args).map_err(|e| err(node, e))?;
    match parts.first().map(|s| s.to_ascii_uppercase()).as_deref() {
        Some("NONE") => return Ok(None),
        Some("CMD") => {}
        _ => return Err(err(node, "HEALTHCHECK takes NONE or CMD command")),
    }
    let test = match command(args[3..].trim()) {
        Command::Exec(v) => [vec!["CMD".to_string()], v].concat(),
        Command::Shell(s) => vec!["CMD-SHELL".to_string(), s],
    };
    let mut h = Healthcheck {
        test,
        ..Default::default()
    };
    for (k, v) in f {
        let v = v.unwrap_or_default();
        if k == "retries" {
            let n = v.parse().map_err(|_| {
                err(
                    node,
                    format!("--retries={v:?}: use a whole number such as 3"),
                )
            })?;
            h.retries = Some(n);
            continue;
        }
        let ns = duration_ns(&v).ok_or_else(|| {
            err(
                node,
                format!("bad duration {v:?} for --{k}: use e.g. 30s or 1m30s"),
            )
        })?;
        *match k.as_str() {
            "interval" => &mut h.interval,
            "timeout" => &mut h.timeout,
            "start-period" => &mut h.start_period,
            _ => &mut h.start_interval,
        } = Some(ns);
    }
    Ok(Some(h))
}

/// `1m30s`, `30s`, `500ms` in nanoseconds.
fn duration_ns(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += num.parse::<f64>().ok()? * scale;
        rest = tail;
    }
    Some(total as u64)
}

/// Types every node; the first must be FROM (or ARG before it).
pub fn instructions(nodes: &[Node]) -> Result<Vec<Located>, DockerfileError> {
    let mut out = Vec::new();
    let mut seen_from = false;
    for node in nodes {
        let ins = instruction(node)?;
        match ins {
            Instruction::From { .. } => seen_from = true,
            Instruction::Arg(_) => {}
            _ if !seen_from => return Err(err(node, format!("{} before the first FROM: a Dockerfile starts with FROM (only ARG may come before it)", node.instruction.to_uppercase()))),
            _ => {}
        }
        out.push(Located {
            node: node.clone(),
            instruction: ins,
        });
    }
    if !seen_from {
        return Err(DockerfileError {
            line: None,
            message: "no FROM instruction: a Dockerfile needs at least one stage".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::*;

    fn one(text: &str) -> Result<Instruction, DockerfileError> {
        let p = parse(text).unwrap();
        instruction(&p.nodes[0])
    }

    #[test]
    fn forms() {
        assert_eq!(
            one("CMD [\"a\", \"b\"]").unwrap(),
            Instruction::Cmd(Command::Exec(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            one("CMD echo hi").unwrap(),
            Instruction::Cmd(Command::Shell("echo hi".into()))
        );
        assert_eq!(
            one("ENV A=1 B=\"two words\"").unwrap(),
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"two words\"".into())
            ])
        );
        assert_eq!(
            one("ENV A one two").unwrap(),
            Instruction::Env(vec![("A".into(), "one two".into())])
        );
        match one("COPY --from=build --chown=app:app a b /dst/").unwrap() {
            Instruction::Copy(c) => {
                assert_eq!(
                    (
                        c.srcs.len(),
                        c.dest.as_str(),
                        c.from.as_deref(),
                        c.chown.as_deref()
                    ),
                    (2, "/dst/", Some("build"), Some("app:app"))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(one("FROM busybox AS Build").unwrap(), Instruction::From { name: Some(n), .. } if n == "build")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ns("30s"), Some(30_000_000_000));
        assert_eq!(duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(duration_ns("500ms"), Some(500_000_000));
        assert_eq!(duration_ns("1.5h"), Some(5_400_000_000_000));
        for bad in ["30", "5x", "s", "1m30"] {
            assert_eq!(duration_ns(bad), None, "{bad}");
        }
        let h = one("HEALTHCHECK --interval=5s --retries=3 CMD true").unwrap();
        let Instruction::Healthcheck(Some(h)) = h else {
            panic!("{h:?}")
        };
        assert_eq!((h.interval, h.retries), (Some(5_000_000_000), Some(3)));
        assert!(one("HEALTHCHECK --timeout=soon CMD true").is_err());
        assert!(one("HEALTHCHECK --retries=many CMD true").is_err());
    }

    #[test]
    fn mistakes_get_suggestions_and_lines() {
        let e = one("FROM x\n").and(one("RUNN echo")).unwrap_err();
        assert!(e.to_string().contains("did you mean RUN?"), "{e}");
        let e = one("COPY --chwon=1 a b").unwrap_err();
        assert!(e.to_string().contains("did you mean --chown?"), "{e}");
        let p = parse("FROM a\nRUN x\nCOPY onlyone\n").unwrap();
        let e = instructions(&p.nodes).unwrap_err();
        assert_eq!(e.line, Some(3));
        let p = parse("RUN x\n").unwrap();
        assert!(instructions(&p.nodes)
            .unwrap_err()
            .to_string()
            .contains("before the first FROM"));
    }
}
