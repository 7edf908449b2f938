//! echo-server binary (placeholder).
fn main() {}
