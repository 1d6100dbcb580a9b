//! `gs://` against fake-gcs-server (started per test; see `common::servers`).

mod common;

use common::servers::{fake_gcs, gcs_options};
use common::{assert_no_temporaries, options, repository_objects, tree, under, TempDir};
use ferrite_fetch::fetch;

#[tokio::test]
async fn gcs_downloads_an_object_and_a_prefix() {
    let objects = repository_objects();
    let Some(server) = fake_gcs("gcs_downloads_an_object_and_a_prefix", "models", &objects).await else { return };
    let dest = TempDir::new("gcs");
    let mut opts = options("gs://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = gcs_options(&server);
    let report = fetch(&opts).await.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert_eq!(report.downloaded_files, 1);
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);

    // Again: present, not downloaded.
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, 1));

    let mut prefix = options("gs://models/resnet/", dest.path(), "copy");
    prefix.store_options = gcs_options(&server);
    let report = fetch(&prefix).await.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert_eq!(report.downloaded_files, 3);
    assert_eq!(tree(&dest.path().join("copy")), under(&objects, "resnet"));
    assert_no_temporaries(dest.path());

    // A missing object.
    let mut opts = options("gs://models/resnet/9/model.onnx", dest.path(), "m");
    opts.store_options = gcs_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch gs://models/resnet/9/model.onnx: not found"), "{error}");
}
