//! `s3://` configured only through the environment, as the operator's init
//! container configures it (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, ...), against
//! MinIO. A file of its own: the variables are process-wide.

mod common;

use common::servers::{minio, MINIO_PASSWORD, MINIO_USER};
use common::{options, repository_objects, TempDir};
use ferrite_fetch::fetch;

#[tokio::test]
async fn s3_settings_come_from_the_environment() {
    let objects = repository_objects();
    let Some(server) = minio("s3_settings_come_from_the_environment", "models", &objects).await else { return };
    for (key, value) in [
        ("AWS_ENDPOINT", server.base.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", MINIO_USER),
        ("AWS_SECRET_ACCESS_KEY", MINIO_PASSWORD),
    ] {
        // The only test in this process: nothing reads the environment concurrently.
        std::env::set_var(key, value);
    }
    let dest = TempDir::new("s3-env");
    let report = fetch(&options("s3://models/resnet/", dest.path(), "resnet")).await.unwrap();
    assert_eq!(report.downloaded_files, 3);
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);
}
