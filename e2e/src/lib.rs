//! End-to-end test support for Sluice: the process-backed node agent ([`agent`]) that,
//! with the control plane from `sluice_testkit::cluster`, makes a local Kubernetes
//! test platform (see `docs/test-platform.md`), and the [`fixture`] the end-to-end
//! tests, benchmarks and `make demo` share.

pub mod agent;
pub mod fixture;
