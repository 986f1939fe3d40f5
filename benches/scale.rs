//! Placeholder: the scale benchmark is being written (issue 12).
fn main() {}
