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
}

impl DataClient {
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_string(),
        }
    }

    async fn read(&self) -> anyhow::Result<AppsFile> {
        let text = tokio::fs::read_to_string(&self.path).await?;
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn app_metadata_get(&self, id: &str) -> anyhow::Result<Option<AppConfig>> {
        Ok(self
            .read()
            .await?
            .apps
            .into_iter()
            .find(|a| a.id == id)
            .map(|a| AppConfig {
                bundle_id: a.bundle_id,
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
        for app in self.read().await?.apps {
            for r in app.routes {
                if r.domain == domain {
                    map.insert(r.path_prefix, app.id.clone());
                }
            }
        }
        Ok(map)
    }
}
