//! echo-client binary (placeholder).
fn main() {}
