//! Mount points on the host file system for volumeMounts.
//!
//! A bind mount needs an existing mount point. Pods bind their volume directories in
//! private mount namespaces, but the mount point itself (e.g. `/etc/sluice`) lives on
//! the shared host file system. The agent creates missing ones before a container
//! starts, counts the pods using each, and removes the ones it created (only while
//! empty, up to the first directory it created) when the last such pod is gone.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Mount points created by the agent; see the module docs.
#[derive(Debug, Default)]
pub struct MountPoints {
    /// target → (first directory created for it, uids of the pods using it)
    created: Mutex<HashMap<PathBuf, (PathBuf, HashSet<String>)>>,
}

impl MountPoints {
    /// Makes sure `target` exists: a directory, or an empty file when `file` (a subPath
    /// mount of a file). Records it for pod `uid` when the agent created it.
    ///
    /// # Errors
    /// When the mount point cannot be created.
    pub fn ensure(&self, uid: &str, target: &Path, file: bool) -> Result<()> {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, users)) = created.get_mut(target) {
            users.insert(uid.to_string());
            return Ok(());
        }
        if fs::symlink_metadata(target).is_ok() {
            return Ok(());
        }
        let mut root = target.to_path_buf();
        while let Some(parent) = root.parent() {
            if parent.exists() {
                break;
            }
            root = parent.to_path_buf();
        }
        if file {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::File::create(target).map(drop)
        } else {
            fs::create_dir_all(target)
        }
        .with_context(|| format!("creating mount point {}", target.display()))?;
        created.insert(target.to_path_buf(), (root, HashSet::from([uid.to_string()])));
        Ok(())
    }

    /// Ends pod `uid`'s use of its mount points and removes those no pod uses anymore.
    pub fn release(&self, uid: &str) {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        let mut unused = Vec::new();
        for (target, (root, users)) in created.iter_mut() {
            if users.remove(uid) && users.is_empty() {
                unused.push((target.clone(), root.clone()));
            }
        }
        for (target, root) in unused {
            created.remove(&target);
            let removed = match fs::symlink_metadata(&target) {
                Ok(m) if m.is_file() && m.len() == 0 => fs::remove_file(&target).is_ok(),
                Ok(m) if m.is_dir() => fs::remove_dir(&target).is_ok(),
                _ => false,
            };
            if !removed || target == root {
                continue;
            }
            let mut dir = target.parent();
            while let Some(d) = dir {
                if fs::remove_dir(d).is_err() || d == root {
                    break;
                }
                dir = d.parent();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_what_it_created_when_unused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let existing = tmp.path().join("etc");
        fs::create_dir(&existing)?;
        let target = existing.join("sluice/conf");
        let m = MountPoints::default();
        m.ensure("a", &target, false)?;
        m.ensure("b", &target, false)?;
        m.ensure("a", &existing, false)?;
        m.release("a");
        assert!(target.is_dir(), "still used by b");
        m.release("b");
        assert!(!existing.join("sluice").exists(), "created dirs removed");
        assert!(existing.is_dir(), "pre-existing dir kept");
        Ok(())
    }
}
