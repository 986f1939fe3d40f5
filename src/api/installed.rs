//! Is the CRD installed in the cluster as new as the one this operator was built with? Helm never upgrades the CRDs
//! in a chart's `crds/`: a site that runs `helm upgrade` alone keeps the old schema, which silently prunes new fields
//! and refuses the operator's own status writes. The operator checks at startup and refuses to run, saying how to
//! fix it (README, "Upgrading").

use serde_json::Value;
use std::collections::BTreeSet;

/// Every property path (`spec.podPolicy.allowHostPath`, `status.conditions[].type`) of an OpenAPI v3 schema, below
/// `spec` and `status` (metadata is the API server's).
pub fn property_paths(schema: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for top in ["spec", "status"] {
        if let Some(s) = schema.pointer(&format!("/properties/{top}")) {
            walk(s, top.to_string(), &mut out);
        }
    }
    out
}

fn walk(schema: &Value, path: String, out: &mut BTreeSet<String>) {
    // The published document can wrap a schema in allOf (a $ref with a description next to it).
    for inner in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        walk(inner, path.clone(), out);
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = format!("{path}.{name}");
            out.insert(p.clone());
            walk(sub, p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(items, format!("{path}[]"), out);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(extra, format!("{path}{{}}"), out);
    }
}

/// The paths the operator's schema has and the installed one lacks. A newer installed CRD (more paths) is fine.
pub fn missing(compiled: &Value, installed: &Value) -> Vec<String> {
    let have = property_paths(installed);
    property_paths(compiled).into_iter().filter(|p| !have.contains(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn compiled<K: CustomResourceExt>() -> Value {
        serde_json::to_value(K::crd().spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn the_same_schema_lacks_nothing_and_an_older_one_is_caught() {
        let job = compiled::<crate::api::FLJob>();
        assert!(property_paths(&job).contains("spec.podTemplate.spec.volumes[].name"), "{:?}", property_paths(&job));
        assert!(missing(&job, &job).is_empty());
        let mut old = job.clone();
        old["properties"]["spec"]["properties"].as_object_mut().unwrap().remove("pendingTimeoutSeconds");
        old["properties"]["status"]["properties"]["abort"]["properties"].as_object_mut().unwrap().remove("podDeletedAt");
        assert_eq!(missing(&job, &old), ["spec.pendingTimeoutSeconds", "status.abort.podDeletedAt"]);
        assert!(missing(&old, &job).is_empty(), "a newer installed CRD is fine");
    }
}
