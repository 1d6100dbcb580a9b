//! `s3://` against MinIO (a real S3-compatible server, started per test;
//! see `common::servers`), plus the S3 client's own retry of a 503 against
//! the stand-in, which MinIO cannot be made to answer.

mod common;

use common::servers::{minio, s3_options, MINIO_PASSWORD};
use common::stand_in::{Files, Server};
use common::{assert_no_temporaries, closed_port, generate, options, repository_objects, tree, under, TempDir};
use ferrite_fetch::fetch;

#[tokio::test]
async fn s3_downloads_an_object_and_a_prefix_from_minio() {
    let objects = repository_objects();
    let Some(server) = minio("s3_downloads_an_object_and_a_prefix_from_minio", "models", &objects).await else {
        return;
    };
    let dest = TempDir::new("s3");
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = s3_options(&server);
    let report = fetch(&opts).await.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert_eq!(report.downloaded_files, 1);
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);

    // Again: present with the right size, not downloaded.
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files, report.bytes), (0, 1, 0));

    // A prefix: listed, then every object under it, in its layout.
    let mut prefix = options("s3://models/resnet/", dest.path(), "copy");
    prefix.store_options = s3_options(&server);
    let report = fetch(&prefix).await.unwrap();
    assert_eq!(report.downloaded_files, 3);
    assert_eq!(tree(&dest.path().join("copy")), under(&objects, "resnet"));

    // The whole bucket is a prefix too.
    let mut bucket = options("s3://models", dest.path(), "all");
    bucket.store_options = s3_options(&server);
    assert_eq!(fetch(&bucket).await.unwrap().downloaded_files, objects.len());
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn s3_errors_from_minio_are_reported_cleanly() {
    let objects = repository_objects();
    let Some(server) = minio("s3_errors_from_minio_are_reported_cleanly", "models", &objects).await else { return };
    let dest = TempDir::new("s3-errors");

    // A missing object.
    let mut opts = options("s3://models/resnet/9/model.onnx", dest.path(), "m");
    opts.store_options = s3_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/9/model.onnx: not found"), "{error}");
    assert!(!error.contains(MINIO_PASSWORD) && !error.contains('\n'), "{error}");

    // A missing bucket.
    let mut opts = options("s3://nobucket/m.onnx", dest.path(), "m");
    opts.store_options = s3_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://nobucket/m.onnx: not found"), "{error}");

    // An empty prefix.
    let mut opts = options("s3://models/nothing/", dest.path(), "m");
    opts.store_options = s3_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("no objects under this prefix"), "{error}");

    // A wrong secret: refused by the server.
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.store_options = s3_options(&server);
    opts.store_options[4].1 = "not-the-secret".into();
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/1/model.onnx: "), "{error}");
    assert!(error.contains("SignatureDoesNotMatch") || error.contains("denied"), "{error}");
    assert!(!error.contains("not-the-secret"), "{error}");

    // No credentials: the client asks the instance metadata endpoint
    // (pointed at MinIO, which has none) and gives up.
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.retries = 1;
    opts.store_options = s3_options(&server)[..3].to_vec();
    opts.store_options.push(("aws_metadata_endpoint".into(), server.base.clone()));
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/1/model.onnx: "), "{error}");
    assert!(error.contains("no usable AWS credentials"), "{error}");
    assert!(!error.contains('\n'), "{error}");

    // An endpoint nobody listens on.
    let closed = closed_port();
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.retries = 1;
    opts.store_options = s3_options(&server);
    opts.store_options[0].1 = format!("http://127.0.0.1:{closed}");
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/1/model.onnx: "), "{error}");
    assert!(error.contains(&format!("127.0.0.1:{closed}")), "{error}");
    assert!(!error.contains(MINIO_PASSWORD), "{error}");
    assert!(tree(dest.path()).is_empty(), "{:?}", tree(dest.path()).keys());
}

#[tokio::test]
async fn unknown_store_settings_are_refused() {
    let dest = TempDir::new("s3-setting");
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.store_options = vec![("aws_no_such_setting".into(), "1".into())];
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("unknown s3 store option 'aws_no_such_setting'"), "{error}");
    let mut opts = options("az://models/m.onnx", dest.path(), "m");
    opts.store_options = vec![("aws_endpoint".into(), "http://x".into())];
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("unknown azure store option 'aws_endpoint'"), "{error}");
    assert!(tree(dest.path()).is_empty());
}

/// object_store retries a 503 itself (its RetryConfig comes from
/// `FetchOptions::retries`): only the stand-in answers 503 on demand.
#[tokio::test]
async fn the_s3_client_retries_a_503() {
    let model = generate(100_000, 5);
    let mut files = Files::default();
    files.files.insert("/models/flaky/model.onnx".into(), model.clone());
    files.flaky.push("/models/flaky/model.onnx".into());
    let server = Server::start(files).await;
    let dest = TempDir::new("s3-503");
    let mut opts = options("s3://models/flaky/model.onnx", dest.path(), "flaky");
    opts.store_options = [
        ("aws_endpoint", server.base.as_str()),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "AKIDTESTONLY"),
        ("aws_secret_access_key", "s3cr3t-test-key"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    fetch(&opts).await.unwrap();
    assert_eq!(server.count("GET", "/models/flaky/model.onnx"), 2, "path-style GET /bucket/key, a 503, then 200");
    assert!(std::fs::read(dest.path().join("flaky/1/model.onnx")).unwrap() == model);
}
