//! Binary entry point (placeholder until the crate lands).
fn main() {}
