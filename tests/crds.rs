//! The committed CRDs are exactly what the code generates (`fljob-operator crd --out-dir crds`), and the chart
//! ships the same files. No cluster needed.

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_code() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (name, yaml) in fljob_operator::api::crd_files().expect("render CRDs") {
        for dir in ["crds", "charts/fljob-operator/crds"] {
            let path = root.join(dir).join(&name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} differs from the generated CRD: run `cargo run -- crd --out-dir crds` and copy crds/*.yaml to \
                 charts/fljob-operator/crds/, then commit",
                path.display()
            );
        }
    }
}
