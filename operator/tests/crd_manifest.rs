//! `manifests/crd.yaml` must be what `ferrite-operator crdgen` prints now.

#[test]
fn crd_manifest_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd.yaml");
    let committed = std::fs::read_to_string(&path).expect("manifests/crd.yaml");
    let generated = ferrite_operator::crd::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "manifests/crd.yaml is out of date: run `make manifests` (ferrite-operator crdgen > manifests/crd.yaml)"
    );
}
