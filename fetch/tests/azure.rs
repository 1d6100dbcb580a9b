//! `az://` against Azurite's blob service (started per test; see
//! `common::servers`), with its well-known development account.

mod common;

use common::servers::{azure_options, azurite, AZURITE_KEY};
use common::{assert_no_temporaries, options, repository_objects, tree, under, TempDir};
use ferrite_fetch::fetch;

#[tokio::test]
async fn azure_downloads_an_object_and_a_prefix() {
    let objects = repository_objects();
    let Some(server) = azurite("azure_downloads_an_object_and_a_prefix", "models", &objects).await else { return };
    let dest = TempDir::new("azure");
    let mut opts = options("az://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = azure_options(&server);
    let report = fetch(&opts).await.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert_eq!(report.downloaded_files, 1);
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);

    // Again: present, not downloaded.
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, 1));

    // azure:// is the same; a prefix copies the layout.
    let mut prefix = options("azure://models/resnet/", dest.path(), "copy");
    prefix.store_options = azure_options(&server);
    let report = fetch(&prefix).await.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert_eq!(report.downloaded_files, 3);
    assert_eq!(tree(&dest.path().join("copy")), under(&objects, "resnet"));
    assert_no_temporaries(dest.path());

    // A missing blob, and a wrong key.
    let mut opts = options("az://models/resnet/9/model.onnx", dest.path(), "m");
    opts.store_options = azure_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch az://models/resnet/9/model.onnx: not found"), "{error}");
    let mut opts = options("az://models/resnet/1/model.onnx", dest.path(), "m");
    opts.store_options = azure_options(&server);
    let wrong = AZURITE_KEY.replace('E', "F");
    opts.store_options[1].1 = wrong.clone();
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch az://models/resnet/1/model.onnx: "), "{error}");
    assert!(!error.contains(&wrong) && !error.contains('\n'), "{error}");
}

#[tokio::test]
async fn azure_without_an_account_is_said_plainly() {
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_some() || std::env::var_os("AZURE_ACCOUNT_NAME").is_some() {
        eprintln!(
            "*** SKIPPED azure_without_an_account_is_said_plainly: an Azure account is set in the environment ***"
        );
        return;
    }
    let dest = TempDir::new("azure-none");
    let mut opts = options("az://models/resnet/1/model.onnx", dest.path(), "x");
    opts.store_options = vec![("azure_skip_signature".into(), "true".into())];
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch az://models/resnet/1/model.onnx: cannot configure the azure client"), "{error}");
}
