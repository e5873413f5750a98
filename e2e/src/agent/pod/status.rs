//! The pod's status as the kubelet reports it: phase, conditions, container statuses.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::{PodRun, key, now};
use crate::agent::BRIDGE_IP;

impl PodRun {
    pub(super) fn condition(&mut self, ty: &'static str, status: bool) -> Value {
        let entry = self.transitions.entry(ty).or_insert_with(|| (status, now()));
        if entry.0 != status {
            *entry = (status, now());
        }
        json!({
            "type": ty,
            "status": if status { "True" } else { "False" },
            "lastTransitionTime": entry.1.clone(),
        })
    }

    pub(super) fn status(&mut self) -> Value {
        let c = self.container().cloned().unwrap_or_default();
        let running = self.c.child.is_some();
        let ready = running && self.c.ready && self.pod.metadata.deletion_timestamp.is_none();
        let phase = match self.c.finished {
            Some(p) => p,
            None if running || self.c.restart_count > 0 => "Running",
            None => "Pending",
        };
        let state = if running {
            json!({"running": {"startedAt": self.c.started_at.clone()}})
        } else if let (Some(_), Some(t)) = (self.c.finished, &self.c.last_terminated) {
            t.clone()
        } else {
            let (reason, message) = self
                .c
                .waiting_reason
                .clone()
                .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
            json!({"waiting": {"reason": reason, "message": message}})
        };
        let ip = self.ip().map(|i| i.to_string());
        let host_ip = match self.ip() {
            Some(i) if i.is_loopback() => "127.0.0.1".to_string(),
            _ => BRIDGE_IP.to_string(),
        };
        let conditions = vec![
            self.condition("PodScheduled", true),
            self.condition("Initialized", true),
            self.condition("ContainersReady", ready),
            self.condition("Ready", ready),
        ];
        let mut status = json!({
            "phase": phase,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": self.start_time.clone(),
            "conditions": conditions,
            "containerStatuses": [{
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "containerID": self.c.pid.map(|p| format!("sluice://{p}")),
                "ready": ready,
                "started": running,
                "restartCount": self.c.restart_count,
                "state": state,
                "lastState": self.c.last_terminated.clone().unwrap_or(json!({})),
            }],
        });
        if let Some(ip) = ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        status
    }

    /// Patches `/status` when it changed (timestamps of unchanged conditions are kept).
    pub(super) async fn report(&mut self) {
        let status = self.status();
        if status == self.last_status {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client(), &self.ns());
        let patch = json!({"status": status});
        match api.patch_status(&self.name(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => self.last_status = status,
            Err(e) => tracing::warn!(pod = %key(&self.pod), "status patch failed: {e}"),
        }
    }
}
