//! Apps and routes from a JSON file, in place of rusty-workers' database.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize, Debug, Clone, Default)]
pub struct AppsFile {
    #[serde(default)]
    pub apps: Vec<AppEntry>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct AppEntry {
    pub id: String,
    /// Changing it is an app change: the proxy evicts the app from its cache.
    pub bundle_id: String,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Route {
    pub domain: String,
    pub path_prefix: String,
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub bundle_id: String,
}

pub struct DataClient {
    path: String,
    /// The file as last parsed, while its inode, modification time and length stay the same (a
    /// test with 100,000 apps must not parse megabytes of JSON for every app load). The
    /// harness replaces the file by a rename: a new inode for every version.
    parsed: std::sync::Mutex<Option<Parsed>>,
}

struct Parsed {
    stamp: (u64, std::time::SystemTime, u64),
    file: std::sync::Arc<AppsFile>,
    by_id: std::sync::Arc<std::collections::HashMap<String, usize>>,
}

impl DataClient {
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_string(),
            parsed: std::sync::Mutex::new(None),
        }
    }

    async fn read_indexed(
        &self,
    ) -> anyhow::Result<(
        std::sync::Arc<AppsFile>,
        std::sync::Arc<std::collections::HashMap<String, usize>>,
    )> {
        let meta = tokio::fs::metadata(&self.path).await?;
        let stamp = (
            std::os::unix::fs::MetadataExt::ino(&meta),
            meta.modified()?,
            meta.len(),
        );
        if let Some(p) = self.parsed.lock().unwrap().as_ref() {
            if p.stamp == stamp {
                return Ok((p.file.clone(), p.by_id.clone()));
            }
        }
        let text = tokio::fs::read_to_string(&self.path).await?;
        let file: AppsFile = serde_json::from_str(&text)?;
        let by_id: std::collections::HashMap<String, usize> = file
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        let (file, by_id) = (std::sync::Arc::new(file), std::sync::Arc::new(by_id));
        *self.parsed.lock().unwrap() = Some(Parsed {
            stamp,
            file: file.clone(),
            by_id: by_id.clone(),
        });
        Ok((file, by_id))
    }

    async fn read(&self) -> anyhow::Result<std::sync::Arc<AppsFile>> {
        Ok(self.read_indexed().await?.0)
    }

    pub async fn app_metadata_get(&self, id: &str) -> anyhow::Result<Option<AppConfig>> {
        let (file, by_id) = self.read_indexed().await?;
        Ok(by_id.get(id).map(|i| AppConfig {
            bundle_id: file.apps[*i].bundle_id.clone(),
        }))
    }

    pub async fn app_bundle_get(&self, bundle_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(Some(format!("// bundle {bundle_id}\n").into_bytes()))
    }

    pub async fn route_mapping_list_for_domain(
        &self,
        domain: &str,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut map = BTreeMap::new();
        for app in &self.read().await?.apps {
            for r in &app.routes {
                if r.domain == domain {
                    map.insert(r.path_prefix.clone(), app.id.clone());
                }
            }
        }
        Ok(map)
    }
}
