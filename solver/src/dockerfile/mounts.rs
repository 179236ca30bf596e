//! `RUN --mount=type=...,key=value` with BuildKit's keys and defaults: `type` defaults to bind;
//! `target|dst|destination`, `source|src`, `readonly|ro`, `rw|readwrite`, `from`, `id`,
//! `sharing`, `mode` (octal), `uid`, `gid`, `required`, `size`, `env`. Variables expand in every
//! value except `from`; misspelled keys and values get "did you mean"; keys a type does not take
//! are refused by name.

use super::suggest;
use super::WordError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

/// One parsed `--mount`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunMount {
    pub kind: Option<Kind>,
    pub target: Option<String>,
    pub source: Option<String>,
    pub from: Option<String>,
    pub readonly: Option<bool>,
    pub id: Option<String>,
    pub sharing: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    pub size: Option<i64>,
    pub env: Option<String>,
}

const KEYS: &[&str] = &[
    "type",
    "target",
    "dst",
    "destination",
    "source",
    "src",
    "from",
    "readonly",
    "ro",
    "rw",
    "readwrite",
    "id",
    "sharing",
    "mode",
    "uid",
    "gid",
    "required",
    "size",
    "env",
];
const TYPES: &[&str] = &["bind", "cache", "tmpfs", "secret", "ssh"];

fn allowed(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Bind => &[
            "type",
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "readonly",
            "ro",
            "rw",
            "readwrite",
        ],
        Kind::Cache => &[
            "type",
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "readonly",
            "ro",
            "rw",
            "readwrite",
            "id",
            "sharing",
            "mode",
            "uid",
            "gid",
        ],
        Kind::Tmpfs => &["type", "target", "dst", "destination", "size"],
        Kind::Secret => &[
            "type",
            "target",
            "dst",
            "destination",
            "id",
            "source",
            "src",
            "required",
            "mode",
            "uid",
            "gid",
            "env",
        ],
        Kind::Ssh => &[
            "type",
            "target",
            "dst",
            "destination",
            "id",
            "source",
            "src",
            "required",
            "mode",
            "uid",
            "gid",
        ],
    }
}

fn bool_value(key: &str, v: Option<&str>) -> Result<bool, WordError> {
    match v {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!("--mount {key}={other}: use true or false").into()),
    }
}

/// `128m`, `1g`, `4096` in bytes.
fn size(v: &str) -> Result<i64, WordError> {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("--mount size={v}: use bytes or k, m, g"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return Err(format!("--mount size={v}: unit must be k, m or g").into()),
    };
    Ok(n * mult)
}

/// Parses one `--mount` value; `expand` expands variables in a value.
pub fn parse(
    spec: &str,
    expand: &dyn Fn(&str) -> Result<String, WordError>,
) -> Result<RunMount, WordError> {
    let mut m = RunMount::default();
    let mut seen: Vec<String> = Vec::new();
    for field in spec.split(',').filter(|f| !f.is_empty()) {
        let (key, value) = key_value(field, expand)?;
        set(&mut m, &key, value)?;
        seen.push(key);
    }
    check(m, &seen)
}

/// One `key=value` field: the key checked and lowercased, the value expanded.
fn key_value(
    field: &str,
    expand: &dyn Fn(&str) -> Result<String, WordError>,
) -> Result<(String, Option<String>), WordError> {
    let (key, raw) = match field.split_once('=') {
        Some((k, v)) => (
            k.trim().to_ascii_lowercase(),
            Some(v.trim().trim_matches('"')),
        ),
        None => (field.trim().to_ascii_lowercase(), None),
    };
    if !KEYS.contains(&key.as_str()) {
        let hint = suggest(&key, KEYS)
            .map(|s| format!(" (did you mean {s}?)"))
            .unwrap_or_default();
        return Err(format!("--mount: unknown key {key:?}{hint}").into());
    }
    let value = match (key.as_str(), raw) {
        ("from", Some(v)) if v.contains('$') => {
            return Err(format!(
                "--mount from={v}: from= does not expand variables; name a stage or an image"
            )
            .into())
        }
        ("from", Some(v)) => Some(v.to_string()),
        (_, Some(v)) => Some(expand(v)?),
        (_, None) => None,
    };
    Ok((key, value))
}

/// Sets field `key` of `m`.
fn set(m: &mut RunMount, key: &str, value: Option<String>) -> Result<(), WordError> {
    let need = || {
        value
            .clone()
            .ok_or_else(|| format!("--mount {key} needs a value: {key}=..."))
    };
    let number = |v: String| {
        v.parse()
            .map_err(|_| format!("--mount {key}={v}: use a number"))
    };
    match key {
        "type" => m.kind = Some(kind(&need()?)?),
        "target" | "dst" | "destination" => m.target = Some(need()?),
        "source" | "src" => m.source = Some(need()?),
        "from" => m.from = Some(need()?),
        "readonly" | "ro" => m.readonly = Some(bool_value(key, value.as_deref())?),
        "rw" | "readwrite" => m.readonly = Some(!bool_value(key, value.as_deref())?),
        "id" => m.id = Some(need()?),
        "sharing" => m.sharing = Some(sharing(need()?)?),
        "mode" => {
            let v = need()?;
            let mode = u32::from_str_radix(&v, 8)
                .map_err(|_| format!("--mount mode={v}: use an octal mode such as 0755"))?;
            m.mode = Some(mode);
        }
        "uid" => m.uid = Some(number(need()?)?),
        "gid" => m.gid = Some(number(need()?)?),
        "required" => m.required = bool_value(key, value.as_deref())?,
        "size" => m.size = Some(size(&need()?)?),
        "env" => m.env = Some(need()?),
        _ => unreachable!("checked against KEYS"),
    }
    Ok(())
}

fn kind(t: &str) -> Result<Kind, WordError> {
    Ok(match t {
        "bind" => Kind::Bind,
        "cache" => Kind::Cache,
        "tmpfs" => Kind::Tmpfs,
        "secret" => Kind::Secret,
        "ssh" => Kind::Ssh,
        other => {
            let hint = suggest(other, TYPES)
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            return Err(format!("--mount type={other} is not a mount type{hint}; use bind, cache, tmpfs, secret or ssh").into());
        }
    })
}

fn sharing(s: String) -> Result<String, WordError> {
    const SHARING: [&str; 3] = ["shared", "private", "locked"];
    if SHARING.contains(&s.as_str()) {
        return Ok(s);
    }
    let hint = suggest(&s, &SHARING)
        .map(|x| format!(" (did you mean {x}?)"))
        .unwrap_or_default();
    Err(format!("--mount sharing={s}{hint}: use shared, private or locked").into())
}

/// The checks across fields (the keys `seen` are allowed for the type, a target where one is
/// needed, never the root), and secrets' and ssh's `source` as another name for `id`.
fn check(mut m: RunMount, seen: &[String]) -> Result<RunMount, WordError> {
    let kind = *m.kind.get_or_insert(Kind::Bind);
    let name = TYPES[kind as usize];
    if let Some(k) = seen.iter().find(|k| !allowed(kind).contains(&k.as_str())) {
        return Err(
            format!("--mount type={name}: option {k:?} is not allowed for this type").into(),
        );
    }
    let named = matches!(kind, Kind::Secret | Kind::Ssh);
    if m.env.is_none() && m.target.is_none() && !named {
        return Err(format!("--mount type={name} needs target=PATH").into());
    }
    let root = m
        .target
        .as_deref()
        .filter(|t| crate::pattern::clean(t).is_empty());
    if let Some(t) = root {
        return Err(format!(
            "--mount type={name} target={t}: a mount cannot replace the root filesystem; mount it at a directory such as /cache"
        ).into());
    }
    if named {
        match (&m.id, m.source.take()) {
            (Some(id), Some(src)) if *id != src => {
                return Err(format!(
                    "--mount type={name}: conflicting id={id} and source={src}: give one of them"
                )
                .into())
            }
            (None, Some(src)) => m.id = Some(src),
            _ => {}
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<RunMount, String> {
        parse(s, &|v| Ok(v.replace("$HOME", "/root"))).map_err(|e| e.0)
    }

    #[test]
    fn defaults_and_keys() {
        let m = p("target=/src,from=build,source=/out").unwrap();
        assert_eq!(m.kind, Some(Kind::Bind));
        let m =
            p("type=cache,dst=$HOME/.cache,sharing=locked,mode=0751,uid=1001,gid=1002").unwrap();
        assert_eq!(
            (m.target.as_deref(), m.mode, m.uid, m.sharing.as_deref()),
            (
                Some("/root/.cache"),
                Some(0o751),
                Some(1001),
                Some("locked")
            )
        );
        for sharing in ["shared", "private", "locked"] {
            let m = p(&format!("type=cache,target=/c,sharing={sharing}")).unwrap();
            assert_eq!(m.sharing.as_deref(), Some(sharing));
        }
        let m = p("type=secret,id=tok,required,env=TOKEN").unwrap();
        assert!(m.required);
        assert_eq!(
            p("type=tmpfs,target=/t,size=128m").unwrap().size,
            Some(128 << 20)
        );
        assert!(p("type=bind,target=/x,from=$HOME")
            .unwrap_err()
            .contains("does not expand variables"));
        assert_eq!(
            p("type=bind,target=/x,from=build").unwrap().from.as_deref(),
            Some("build")
        );
    }

    #[test]
    fn mistakes() {
        for root in ["/", "//", "/.", "/a/.."] {
            let e = p(&format!("type=cache,target={root}")).unwrap_err();
            assert!(
                e.contains("cannot replace the root filesystem"),
                "{root}: {e}"
            );
        }
        assert!(p("type=cahce,target=/x")
            .unwrap_err()
            .contains("did you mean cache?"));
        assert!(p("type=cache,targte=/x")
            .unwrap_err()
            .contains("did you mean target?"));
        assert!(p("type=bind,target=/x,mode=0644")
            .unwrap_err()
            .contains("\"mode\" is not allowed"));
        assert!(p("type=cache,target=/x,sharing=lockd")
            .unwrap_err()
            .contains("did you mean locked?"));
        assert!(p("type=tmpfs").unwrap_err().contains("needs target"));
        assert!(p("type=cache,target=/x,mode=9")
            .unwrap_err()
            .contains("octal"));
        assert!(p("type=secret,id=a,source=b")
            .unwrap_err()
            .contains("conflicting id=a and source=b"));
        assert_eq!(p("type=secret,src=tok").unwrap().id.as_deref(), Some("tok"));
    }
}
