//! Pod volumes as directories: configMap, secret, projected (configMap, secret,
//! downwardAPI name/namespace, serviceAccountToken) and emptyDir.
//!
//! File volumes use the kubelet's atomic layout so updates are seen whole: the files
//! live in a timestamped directory `..<n>_<nanos>`, `..data` is a symlink to it, and each
//! top-level entry is a symlink through `..data`. An update writes a new timestamped
//! directory, renames a fresh `..data_tmp` symlink over `..data` (atomic), then fixes
//! the top-level links and removes the old directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, KeyToPath, Pod, Secret, SecretProjection, Volume,
};
use kube::{Api, Client};

/// File name → contents of one volume.
pub type Files = BTreeMap<String, Vec<u8>>;

/// What a volume is in this agent.
#[derive(Debug, PartialEq)]
pub enum Content {
    /// A directory of files, refreshed when the source objects change.
    Files(Files),
    /// An empty, writable directory (emptyDir) or an unsupported type (logged).
    Empty,
}

/// Resolves the files of `vol` from the API (and the pod's ServiceAccount `token`).
///
/// # Errors
/// When a referenced, non-optional ConfigMap or Secret (or one of its keys) is missing.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    vol: &Volume,
    token: Option<&str>,
) -> Result<Content> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if let Some(cm) = &vol.config_map {
        let files =
            config_map_files(client, ns, &cm.name, cm.items.as_deref(), cm.optional).await?;
        return Ok(Content::Files(files));
    }
    if let Some(s) = &vol.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let files = secret_files(client, ns, &name, s.items.as_deref(), s.optional).await?;
        return Ok(Content::Files(files));
    }
    if let Some(p) = &vol.projected {
        let mut files = Files::new();
        for src in p.sources.iter().flatten() {
            if let Some(ConfigMapProjection { name, items, optional }) = &src.config_map {
                files
                    .extend(config_map_files(client, ns, name, items.as_deref(), *optional).await?);
            }
            if let Some(SecretProjection { name, items, optional }) = &src.secret {
                files.extend(secret_files(client, ns, name, items.as_deref(), *optional).await?);
            }
            if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    if let Some(f) = &item.field_ref {
                        let v = super::fields::field_value(pod, &f.field_path, None);
                        files.insert(item.path.clone(), v.into_bytes());
                    }
                }
            }
            if let Some(t) = &src.service_account_token
                && let Some(token) = token
            {
                files.insert(t.path.clone(), token.as_bytes().to_vec());
            }
        }
        return Ok(Content::Files(files));
    }
    if vol.empty_dir.is_none() {
        tracing::warn!(volume = %vol.name, "unsupported volume type; giving an empty directory");
    }
    Ok(Content::Empty)
}

async fn config_map_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
) -> Result<Files> {
    object_files(client, "configmap", ns, name, items, optional, |cm: ConfigMap| {
        let binary = cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0));
        let text = cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes()));
        text.chain(binary).collect()
    })
    .await
}

async fn secret_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
) -> Result<Files> {
    object_files(client, "secret", ns, name, items, optional, |s: Secret| {
        let data = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0));
        let text = s.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes()));
        data.chain(text).collect()
    })
    .await
}

/// The files of ConfigMap or Secret `name` (all keys, or `items`), or none when it is
/// missing and `optional`.
async fn object_files<K>(
    client: &Client,
    kind: &str,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    files: impl FnOnce(K) -> Files,
) -> Result<Files>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let what = format!("{kind} {ns}/{name}");
    let Some(obj) = Api::<K>::namespaced(client.clone(), ns).get_opt(name).await? else {
        if optional == Some(true) {
            return Ok(Files::new());
        }
        anyhow::bail!("{what} not found");
    };
    select_items(files(obj), items, &what)
}

fn select_items(all: Files, items: Option<&[KeyToPath]>, what: &str) -> Result<Files> {
    let Some(items) = items.filter(|i| !i.is_empty()) else { return Ok(all) };
    let mut out = Files::new();
    for item in items {
        let v = all.get(&item.key).with_context(|| format!("{what} has no key {}", item.key))?;
        out.insert(item.path.clone(), v.clone());
    }
    Ok(out)
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `files` into `dir` with the atomic layout described in the module docs.
///
/// # Errors
/// On I/O errors.
pub fn write_atomic(dir: &Path, files: &Files) -> Result<()> {
    fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let ts_name = format!("..{}_{nanos}", SEQ.fetch_add(1, Ordering::Relaxed));
    let ts_dir = dir.join(&ts_name);
    fs::create_dir(&ts_dir)?;
    for (path, data) in files {
        let target = ts_dir.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&target, data)?;
    }
    let old = fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts_name, &tmp)?;
    fs::rename(&tmp, dir.join("..data"))?;

    let top: std::collections::BTreeSet<String> =
        files.keys().filter_map(|p| p.split('/').next().map(str::to_string)).collect();
    for name in &top {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(PathBuf::from("..data").join(name), &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !top.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&ts_name)
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_layout_updates_and_removes_keys() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("vol");
        let mut files = Files::new();
        files.insert("a.conf".into(), b"one".to_vec());
        files.insert("b.conf".into(), b"bee".to_vec());
        write_atomic(&dir, &files)?;
        assert_eq!(fs::read(dir.join("a.conf"))?, b"one");
        files.insert("a.conf".into(), b"two".to_vec());
        files.remove("b.conf");
        write_atomic(&dir, &files)?;
        assert_eq!(fs::read(dir.join("a.conf"))?, b"two");
        assert!(fs::symlink_metadata(dir.join("b.conf")).is_err());
        let hidden = fs::read_dir(&dir)?
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("..")))
            .count();
        assert_eq!(hidden, 2, "one timestamped dir and ..data");
        Ok(())
    }
}
