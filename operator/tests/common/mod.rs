//! Setup shared by the operator's control-plane tests.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use sluice_operator::crd_yaml;
use sluice_testkit::ControlPlane;

/// Polls `f` every 200 ms until it yields a value; panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane with the ConnectionPool CRD applied and Established, or `None` (the
/// test is skipped, loudly) when the control-plane binaries are not built. Under `make`,
/// which sets `SLUICE_BIN_DIR`, missing binaries fail the test instead.
pub async fn control_plane_with_crd() -> Option<(ControlPlane, kube::Client)> {
    if let Err(e) = sluice_testkit::k8s_bin_dir() {
        assert!(
            std::env::var_os("SLUICE_BIN_DIR").is_none(),
            "control plane binaries missing: {e}"
        );
        eprintln!("SKIPPED: control plane binaries missing ({e}); run `make tools`");
        return None;
    }
    let cp = ControlPlane::start().await.unwrap();
    let client = cp.client().await.unwrap();
    // The CRD is accepted (CEL rules compile) and becomes Established.
    let crd: CustomResourceDefinition = serde_yaml::from_str(&crd_yaml().unwrap()).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "connectionpools.sluice.dev",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    eventually("CRD established", Duration::from_secs(30), || async {
        let c = crds.get("connectionpools.sluice.dev").await.ok()?;
        c.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
    Some((cp, client))
}
