//! The Cloud Foundry application manifest (`manifest.yml`): the keys a build needs. Keys that
//! only matter to a platform (routes, services, instances, ...) are accepted and ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub applications: Vec<App>,
}

#[derive(Debug, Deserialize)]
pub struct App {
    pub name: String,
    pub memory: Option<String>,
    pub disk_quota: Option<String>,
    pub buildpack: Option<String>,
    #[serde(default)]
    pub buildpacks: Vec<String>,
    pub command: Option<String>,
    pub stack: Option<String>,
    /// The app's directory, relative to the manifest's.
    pub path: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, serde_yaml::Value>,
}

impl Manifest {
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let m: Manifest = serde_yaml::from_str(text)
            .map_err(|e| anyhow::anyhow!("manifest.yml: {e}; see https://docs.cloudfoundry.org/devguide/deploy-apps/manifest-attributes.html"))?;
        if m.applications.is_empty() {
            anyhow::bail!("manifest.yml: no applications; add `applications:` with at least one `- name: APP`");
        }
        Ok(m)
    }

    /// The app `target` names (`--target`), or the only one.
    pub fn app(&self, target: Option<&str>) -> anyhow::Result<&App> {
        let names = || {
            self.applications
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match target {
            Some(t) => self
                .applications
                .iter()
                .find(|a| a.name == t)
                .ok_or_else(|| {
                    anyhow::anyhow!("manifest.yml: no application {t:?} (have: {})", names())
                }),
            None if self.applications.len() == 1 => Ok(&self.applications[0]),
            None => anyhow::bail!(
                "manifest.yml has {} applications ({}): choose one with --target NAME",
                self.applications.len(),
                names()
            ),
        }
    }
}

impl App {
    /// The buildpack named by `buildpack:` or the first of `buildpacks:`.
    pub fn buildpack(&self) -> Option<&str> {
        self.buildpack
            .as_deref()
            .or(self.buildpacks.first().map(String::as_str))
    }

    /// `env:` values as strings (YAML numbers and booleans as written).
    pub fn env(&self) -> Vec<String> {
        self.env
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim_end()
                        .to_string(),
                };
                format!("{k}={v}")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cloud_foundry_form() {
        let m = Manifest::parse(
            "# syntax = strata/buildpacks\n---\napplications:\n- name: hello\n  memory: 128M\n  disk_quota: 256M\n  buildpack: python_buildpack\n  command: python app.py\n  instances: 2\n  env:\n    GREETING: hi\n    WORKERS: 4\n",
        )
        .unwrap();
        let a = m.app(None).unwrap();
        assert_eq!(a.name, "hello");
        assert_eq!(a.memory.as_deref(), Some("128M"));
        assert_eq!(a.buildpack(), Some("python_buildpack"));
        assert_eq!(a.env(), vec!["GREETING=hi", "WORKERS=4"]);
        assert!(m
            .app(Some("other"))
            .unwrap_err()
            .to_string()
            .contains("hello"));
    }

    #[test]
    fn refuses_empty_and_ambiguous_manifests() {
        assert!(Manifest::parse("applications: []\n").is_err());
        assert!(Manifest::parse("applications: {name: x}\n").is_err());
        let m = Manifest::parse("applications:\n- name: a\n- name: b\n").unwrap();
        let e = m.app(None).unwrap_err().to_string();
        assert!(e.contains("--target"), "{e}");
        assert_eq!(m.app(Some("b")).unwrap().name, "b");
    }
}
