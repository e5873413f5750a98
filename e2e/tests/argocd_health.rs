//! The Argo CD health check for ConnectionPool (`docs/argocd/.../health.lua`),
//! run the way Argo CD runs it: `obj` is the resource as a Lua table, the script
//! returns `{status, message}`; checked against `health_test.yaml` in Argo CD's
//! own test layout. Lua 5.1 semantics, as gopher-lua has.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaSerdeExt, Table};
use serde::Deserialize;

#[derive(Deserialize)]
struct HealthTests {
    tests: Vec<HealthTest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthTest {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize)]
struct Expected {
    status: String,
    message: String,
}

fn dir() -> PathBuf {
    sluice_e2e::fixture::repo_root().join("docs/argocd/sluice.dev/ConnectionPool")
}

/// Runs health.lua on one resource and returns (status, message).
fn health(script: &str, resource: &serde_json::Value) -> Result<(String, String)> {
    let lua = Lua::new();
    // Argo CD hands the object over as plain tables: JSON null is nil, not a sentinel.
    let opts = SerializeOptions::new().serialize_none_to_null(false).serialize_unit_to_null(false);
    let obj = lua.to_value_with(resource, opts)?;
    lua.globals().set("obj", obj)?;
    let hs: Table = lua.load(script).set_name("health.lua").eval()?;
    Ok((hs.get::<String>("status")?, hs.get::<Option<String>>("message")?.unwrap_or_default()))
}

#[test]
fn health_check_matches_argocd_testdata() -> Result<()> {
    let script = std::fs::read_to_string(dir().join("health.lua"))?;
    let tests: HealthTests =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("health_test.yaml"))?)?;
    assert!(tests.tests.len() >= 6, "every health state has a case");
    let mut failures = Vec::new();
    for t in &tests.tests {
        let input: serde_json::Value = serde_yaml::from_str(
            &std::fs::read_to_string(dir().join(&t.input_path)).context(t.input_path.clone())?,
        )?;
        let (status, message) = health(&script, &input)?;
        if status != t.health_status.status || message != t.health_status.message {
            failures.push(format!(
                "{}: got {status:?} {message:?}, want {:?} {:?}",
                t.input_path, t.health_status.status, t.health_status.message
            ));
        }
    }
    if !failures.is_empty() {
        bail!("health.lua disagrees with health_test.yaml:\n{}", failures.join("\n"));
    }
    Ok(())
}

#[test]
fn every_health_status_is_covered() -> Result<()> {
    let tests: HealthTests =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("health_test.yaml"))?)?;
    for want in ["Healthy", "Progressing", "Degraded"] {
        assert!(tests.tests.iter().any(|t| t.health_status.status == want), "no case for {want}");
    }
    Ok(())
}

#[test]
fn the_status_the_operator_writes_is_understood() -> Result<()> {
    // A status as the operator writes it (conditions from sluice_operator's types),
    // built here rather than read from testdata, so a renamed condition type fails.
    let script = std::fs::read_to_string(dir().join("health.lua"))?;
    let pool = serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "p", "generation": 7},
        "spec": {},
        "status": {"observedGeneration": 7, "conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "2/2 ready"},
            {"type": "BudgetExceeded", "status": "True", "reason": "Infeasible", "message": "no room"}
        ]}
    });
    assert_eq!(health(&script, &pool)?, ("Degraded".to_string(), "no room".to_string()));
    Ok(())
}
