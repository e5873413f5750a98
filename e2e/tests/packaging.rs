//! Packaging: the Helm chart and the kustomize config render, validate, agree on
//! RBAC, and install a working operator into the real control plane.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_e2e::fixture::{Fixture, Options};

fn root() -> PathBuf {
    sluice_e2e::fixture::repo_root()
}

fn tool(name: &str) -> Result<PathBuf> {
    Ok(sluice_testkit::k8s_bin_dir()?.join(name))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.current_dir(root()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn helm_template(args: &[&str]) -> Result<String> {
    run(Command::new(tool("helm")?)
        .args(["template", "sluice", "charts/sluice", "--namespace", "sluice-system"])
        .args(args))
}

fn docs(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Compares with a checked-in golden file; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &str) -> Result<()> {
    let path = root().join("e2e/tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, actual)?;
    }
    let expected = std::fs::read_to_string(&path)
        .with_context(|| format!("{} (run with UPDATE_GOLDEN=1)", path.display()))?;
    ensure!(
        expected == actual,
        "{} differs from the rendered output; review and rerun with UPDATE_GOLDEN=1",
        path.display()
    );
    Ok(())
}

#[test]
fn helm_lint_strict() -> Result<()> {
    let out = run(Command::new(tool("helm")?).args(["lint", "--strict", "charts/sluice"]))?;
    ensure!(out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

#[test]
fn helm_template_matches_golden_output() -> Result<()> {
    for (name, args) in [
        ("default", vec![]),
        ("ha", vec!["--set", "replicaCount=2", "--set", "podDisruptionBudget.enabled=true"]),
        ("namespaced", vec!["--set", "watchNamespaces[0]=apps"]),
        (
            "monitoring",
            vec!["--set", "metrics.serviceMonitor.enabled=true", "--set", "logging.level=debug"],
        ),
        (
            "secure-metrics",
            vec![
                "--set",
                "metrics.secure.enabled=true",
                "--set",
                "metrics.secure.certSecret=sluice-metrics-tls",
                "--set",
                "metrics.serviceMonitor.enabled=true",
            ],
        ),
    ] {
        golden(&format!("helm-{name}.yaml"), &helm_template(&args)?)?;
    }
    Ok(())
}

#[test]
fn helm_values_are_validated() -> Result<()> {
    for (args, needle) in [
        (vec!["--set", "replicaCount=0"], "replicaCount"),
        (vec!["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (vec!["--set", "unknownKey=1"], "unknownKey"),
        (vec!["--set", "discoveryInterval=soon"], "discoveryInterval"),
    ] {
        let err = helm_template(&args).unwrap_err();
        ensure!(format!("{err:#}").contains(needle), "{args:?} rejected naming {needle}: {err:#}");
    }
    Ok(())
}

#[test]
fn helm_leader_election_follows_replicas() -> Result<()> {
    let one = helm_template(&["--set", "replicaCount=1"])?;
    ensure!(!one.contains("--leader-election"), "one replica: no leader election");
    let two = helm_template(&[])?;
    ensure!(
        two.contains("--leader-election") && two.contains("leader-election"),
        "two replicas (the default): leader election + Lease RBAC"
    );
    ensure!(two.contains("kind: PodDisruptionBudget"), "and a PodDisruptionBudget");
    Ok(())
}

/// All rules of the objects of `kind`, normalised (lists sorted) for comparison.
fn rules_of(docs: &[Value], kind: &str) -> Vec<Value> {
    let mut rules: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    for r in &mut rules {
        for k in ["apiGroups", "resources", "verbs"] {
            if let Some(a) = r[k].as_array_mut() {
                a.sort_by_key(|v| v.to_string());
            }
        }
    }
    rules.sort_by_key(|r| r.to_string());
    rules
}

#[test]
fn chart_and_kustomize_rbac_are_equal() -> Result<()> {
    // With leader election on, the chart grants the same as config/rbac/role.yaml,
    // with Leases in a namespaced Role instead of the ClusterRole.
    let chart_docs = docs(&helm_template(&["--set", "replicaCount=2"])?)?;
    let mut chart = rules_of(&chart_docs, "ClusterRole");
    chart.extend(rules_of(&chart_docs, "Role"));
    chart.sort_by_key(|r| r.to_string());
    let mut kustomize = rules_of(
        &docs(&std::fs::read_to_string(root().join("config/rbac/role.yaml"))?)?,
        "ClusterRole",
    );
    kustomize.extend(rules_of(
        &docs(&std::fs::read_to_string(root().join("config/rbac/leader_election_role.yaml"))?)?,
        "Role",
    ));
    kustomize.sort_by_key(|r| r.to_string());
    ensure!(!kustomize.is_empty(), "config/rbac/role.yaml has rules");
    ensure!(
        chart == kustomize,
        "chart rules:\n{chart:#?}\nconfig/rbac/role.yaml rules:\n{kustomize:#?}"
    );
    Ok(())
}

#[test]
fn kustomize_default_renders() -> Result<()> {
    let out = run(Command::new(tool("kubectl")?).args(["kustomize", "config/default"]))?;
    let d = docs(&out)?;
    let deploy = d.iter().find(|d| d["kind"] == "Deployment").context("a Deployment")?;
    ensure!(
        deploy["metadata"]["name"] == "sluice-operator"
            && deploy["metadata"]["namespace"] == "sluice-system",
        "{deploy}"
    );
    ensure!(d.iter().any(|d| d["kind"] == "CustomResourceDefinition"), "the CRD");
    ensure!(d.iter().any(|d| d["kind"] == "ClusterRoleBinding"), "RBAC binding");
    golden("kustomize-default.yaml", &out)
}

async fn wait_operator_ready(fx: &Fixture, ns: &str) -> Result<()> {
    let out = fx.kubectl_ns(
        ns,
        &[
            "wait",
            "--for=condition=Available",
            "deploy",
            "-l",
            "app.kubernetes.io/component=operator",
            "--timeout=180s",
        ],
    )?;
    ensure!(out.contains("condition met"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_upgrade_uninstall() -> Result<()> {
    let mut fx = Fixture::start_with(Options {
        local_operator: false,
        install_crds: false,
        ..Options::default()
    })
    .await?;
    let helm = tool("helm")?;
    let kubeconfig = fx.cp.kubeconfig_path();
    let helm_cmd = |args: &[&str]| -> Result<String> {
        run(Command::new(&helm).arg(format!("--kubeconfig={}", kubeconfig.display())).args(args))
    };
    // The README's install block, with the image tag our node agent maps.
    helm_cmd(&[
        "install",
        "sluice",
        "charts/sluice",
        "--namespace",
        "sluice-system",
        "--create-namespace",
        "--set",
        "image.tag=e2e",
        "--wait",
        "--timeout",
        "3m",
    ])?;
    wait_operator_ready(&fx, "sluice-system").await?;
    fx.apply_sample(1).await?;
    let c = fx.wait_converged(1, Duration::from_secs(180)).await?;
    println!(
        "[helm] operator installed by helm reconciled the sample: limit {} budget {} in {:.1}s",
        c.limit, c.available, c.secs
    );
    helm_cmd(&[
        "upgrade",
        "sluice",
        "charts/sluice",
        "--namespace",
        "sluice-system",
        "--set",
        "image.tag=e2e",
        "--set",
        "logging.level=debug",
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let deploy = fx.kubectl_ns(
        "sluice-system",
        &["get", "deploy", "-o", "jsonpath={.items[0].spec.template.spec.containers[0].env}"],
    )?;
    ensure!(deploy.contains("debug"), "upgrade applied the new value: {deploy}");
    wait_operator_ready(&fx, "sluice-system").await?;
    helm_cmd(&["uninstall", "sluice", "--namespace", "sluice-system", "--wait"])?;
    let left = fx.kubectl_ns("sluice-system", &["get", "deploy", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "operator Deployment removed: {left}");
    let crd = fx.kubectl_cluster(&["get", "crd", "connectionpools.sluice.dev", "-o", "name"])?;
    ensure!(crd.contains("connectionpools.sluice.dev"), "CRD kept on uninstall");
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kustomize_apply_installs_a_working_operator() -> Result<()> {
    let mut fx = Fixture::start_with(Options {
        local_operator: false,
        install_crds: false,
        ..Options::default()
    })
    .await?;
    // The README's kustomize block; the image is the one config/manager names.
    let kustomization = root().join("config/default").display().to_string();
    fx.kubectl_cluster(&["apply", "--server-side", "-k", &kustomization])?;
    wait_operator_ready(&fx, "sluice-system").await?;
    fx.apply_sample(1).await?;
    let c = fx.wait_converged(1, Duration::from_secs(180)).await?;
    println!("[kustomize] operator installed by kustomize reconciled the sample in {:.1}s", c.secs);
    fx.shutdown().await
}
