//! Pure helpers of the node agent: pod keys, downward-API field values, image names,
//! `$(VAR)` expansion and shell quoting, as the kubelet computes them.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;

/// `<namespace>/<name>` of a pod.
pub fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The value of a downward-API field path.
pub fn field_value(pod: &Pod, path: &str, ip: Option<Ipv4Addr>) -> String {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => {
            spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default()
        }
        "status.podIP" | "status.podIPs" => ip.map(|i| i.to_string()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => super::BRIDGE_IP.to_string(),
        p => {
            if let Some(k) = p.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']"))
            {
                return m.labels.as_ref().and_then(|l| l.get(k).cloned()).unwrap_or_default();
            }
            if let Some(k) =
                p.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']"))
            {
                return m.annotations.as_ref().and_then(|l| l.get(k).cloned()).unwrap_or_default();
            }
            tracing::warn!(field = p, "unsupported fieldRef");
            String::new()
        }
    }
}

/// Image reference → the name used in the image map: last path segment without tag or
/// digest (`registry.local/x/sluice-pooler:1.2@sha256:..` → `sluice-pooler`).
pub fn image_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

/// Expands `$(VAR)` references from `env`, as the kubelet does; `$$(VAR)` escapes.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = a;
        } else if let Some(a) = after.strip_prefix('(') {
            match a.find(')') {
                Some(j) => {
                    let name = &a[..j];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &a[j + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(image_name("sluice-pooler"), "sluice-pooler");
        assert_eq!(image_name("ghcr.io/sluice-dev/sluice-pooler:0.1.0"), "sluice-pooler");
        assert_eq!(image_name("localhost:5000/echo@sha256:abc"), "echo");
    }

    #[test]
    fn expands_vars() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y$(B)$$(A)$", &env), "x1y$(B)$(A)$");
    }
}
