//! End-to-end test support for Sluice.
