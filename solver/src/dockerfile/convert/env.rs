//! The variables an instruction sees: the image's environment (`KEY=VALUE` entries, indexed by
//! name so that lookups and ENV stay O(1) however long it grows) and the ARGs in scope. ENV wins
//! over an ARG of the same name, as in Docker.

use std::collections::HashMap;

use super::State;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An environment entry's name and value (`None` without `=`).
fn split(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (entry, None),
    }
}

/// Gives a stage's starting environment a PATH when it has none, and indexes it.
pub(super) fn init(st: &mut State) {
    let env = &mut st.config.config.env;
    if env.is_empty() {
        env.push(DEFAULT_PATH.into());
    }
    // A name's first entry is the one that counts, as in BuildKit.
    let mut at = HashMap::new();
    for (i, e) in env.iter().enumerate() {
        at.entry(split(e).0.to_string()).or_insert(i);
    }
    st.env_at = at;
}

/// The value of variable `n`: ENV first, then ARG.
pub(super) fn variable(st: &State, n: &str) -> Option<String> {
    let env = &st.config.config.env;
    let from_env = st.env_at.get(n).and_then(|&i| split(&env[i]).1);
    from_env
        .map(str::to_string)
        .or_else(|| st.args.get(n).cloned())
}

/// Sets `key`, in place when it is there (as BuildKit does).
pub(super) fn set(st: &mut State, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    let env = &mut st.config.config.env;
    match st.env_at.get(key) {
        Some(&i) => env[i] = entry,
        None => {
            st.env_at.insert(key.to_string(), env.len());
            env.push(entry);
        }
    }
}

/// The environment a RUN step gets: the image's, then the ARGs it does not set.
pub(super) fn for_run(st: &State) -> Vec<String> {
    let mut env = st.config.config.env.clone();
    let args = st.args.iter().filter(|(k, _)| !st.env_at.contains_key(*k));
    env.extend(args.map(|(k, v)| format!("{k}={v}")));
    env
}
