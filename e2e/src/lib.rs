//! End-to-end test support for Sluice: the process-backed node agent ([`agent`]) that,
//! with the control plane from `sluice_testkit::cluster`, makes a local Kubernetes
//! test platform (see `docs/test-platform.md`).

pub mod agent;
