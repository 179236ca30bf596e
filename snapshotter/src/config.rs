//! `/etc/strata/snapshotter.toml`: the daemon's settings. Command-line flags override the file.
//!
//! ```toml
//! root = "/var/lib/strata"
//! address = "/run/strata/snapshotter.sock"
//! group = ""         # socket mode 0660 for this group; empty: 0600, root only
//! async_remove = false
//!
//! [log]
//! level = "info"     # or a tracing filter such as "strata_snapshotter=debug"
//! format = "text"    # or "json"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/strata";
pub const DEFAULT_ADDRESS: &str = "/run/strata/snapshotter.sock";
pub const DEFAULT_CONFIG: &str = "/etc/strata/snapshotter.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    /// Group allowed to use the socket (mode 0660); empty: root only (0600).
    pub group: String,
    pub async_remove: bool,
    pub log: Log,
    pub lazy: LazyConfig,
}

/// `[lazy]`: zstd:chunked and eStargz layers mounted from the registry (remote snapshots).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LazyConfig {
    pub enabled: bool,
    /// Serve layers whose TOC has no checksum annotation (unverifiable). Off: they are refused.
    pub allow_unverified: bool,
    /// Registries reached over plain HTTP (localhost and 127.0.0.1 always are).
    pub insecure_registries: Vec<String>,
    /// A read whose chunk the registry does not deliver in this long fails with EIO.
    pub fetch_timeout_secs: u64,
    pub fetch_retries: u32,
    /// Bound of the chunk cache shared by all lazy layers.
    pub cache_max_bytes: u64,
    /// Fetch the rest of each layer after mounting it.
    pub background_fetch: bool,
    pub fetch_concurrency: usize,
    /// Let the kernel read fully fetched files straight from the cache (FUSE passthrough,
    /// Linux 6.9+; without it reads go through the serving process).
    pub passthrough: bool,
    /// `HOST:PORT` for Prometheus metrics (`/metrics`); empty: none.
    pub metrics_address: String,
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            enabled: true,
            allow_unverified: false,
            insecure_registries: Vec::new(),
            fetch_timeout_secs: 10,
            fetch_retries: 1,
            cache_max_bytes: 10 << 30,
            background_fetch: true,
            fetch_concurrency: 4,
            passthrough: true,
            metrics_address: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            group: String::new(),
            async_remove: false,
            log: Log::default(),
            lazy: LazyConfig::default(),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default location means defaults, anywhere else it is an
    /// error (a typo in `--config` must not silently run with defaults).
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "config file {}: {e}\nsee `strata-snapshotter --help` for the keys",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(anyhow::anyhow!(
                "cannot read config file {}: {e}",
                path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c: Config = toml::from_str("root = \"/x\"\n[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(c.root, PathBuf::from("/x"));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.log.format, LogFormat::Json);
        let err = toml::from_str::<Config>("rooot = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rooot"), "{err}");
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_explicit_file_is_an_error() {
        let missing = Path::new("/nonexistent/strata.toml");
        assert_eq!(Config::load(missing, false).unwrap(), Config::default());
        assert!(Config::load(missing, true).is_err());
    }
}
