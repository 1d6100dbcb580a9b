//! What a model URI names, and how it is shown.

use ferrite_fetch::{parse_source, redact_uri, Source, StoreKind};

#[test]
fn parses_object_store_uris() {
    let store = |uri: &str| match parse_source(uri).unwrap() {
        Source::Store { kind, bucket, key, prefix, .. } => (kind, bucket, key, prefix),
        other => panic!("{uri}: {other:?}"),
    };
    assert_eq!(
        store("s3://models/resnet50/1/model.onnx"),
        (StoreKind::S3, "models".into(), "resnet50/1/model.onnx".into(), false)
    );
    assert_eq!(store("s3a://models/resnet50/"), (StoreKind::S3, "models".into(), "resnet50".into(), true));
    assert_eq!(store("s3://models"), (StoreKind::S3, "models".into(), "".into(), true));
    assert_eq!(store("gs://bkt/a%20b/model.onnx"), (StoreKind::Gcs, "bkt".into(), "a b/model.onnx".into(), false));
    // object_store's own parser drops the first path segment of az:// URIs
    // (it reads them as az://account/container/path); ours keeps the key.
    assert_eq!(store("az://ctr/a/b/model.onnx"), (StoreKind::Azure, "ctr".into(), "a/b/model.onnx".into(), false));
    assert_eq!(store("azure://ctr/dir/"), (StoreKind::Azure, "ctr".into(), "dir".into(), true));
    assert!(parse_source("s3:///key").unwrap_err().contains("no bucket"));
    assert!(parse_source("az:///key").unwrap_err().contains("no container"));
    assert!(parse_source("s3://bucket:9000/key").unwrap_err().contains("not a host:port"));
}

#[test]
fn parses_other_uris() {
    assert!(parse_source("pvc://claim/path").unwrap_err().contains("operator mounts"));
    assert!(parse_source("ftp://host/m.onnx").unwrap_err().contains("unsupported URI scheme 'ftp'"));
    assert_eq!(
        parse_source("file:///models/m.onnx").unwrap(),
        Source::Local { path: "/models/m.onnx".into(), prefix: false }
    );
    assert_eq!(parse_source("models/dir/").unwrap(), Source::Local { path: "models/dir/".into(), prefix: true });
    // https is always a plain GET, even where object_store would see a bucket:
    // a presigned URL's query string is its signature.
    for uri in ["https://h/p/m.onnx?sig=1", "https://acct.blob.core.windows.net/c/m.onnx?sv=x"] {
        assert!(matches!(parse_source(uri).unwrap(), Source::Http { prefix: false, .. }), "{uri}");
    }
    assert!(matches!(parse_source("https://b.s3.amazonaws.com/m.onnx").unwrap(), Source::Http { .. }));
}

#[test]
fn redaction_keeps_scheme_host_and_path() {
    assert_eq!(redact_uri("s3://AKID:secretkey@bucket/k?x=y"), "s3://bucket/k");
    assert_eq!(redact_uri("https://u:p@host:8443/a/b?sig=1#f"), "https://host:8443/a/b");
    assert_eq!(redact_uri("relative/path?x"), "relative/path");
}
