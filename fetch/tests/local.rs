//! Local sources: a directory copied as a prefix, a plain path, a file, and
//! the errors of a prefix with a hash, an empty directory, a missing path.

mod common;

use std::collections::BTreeMap;

use common::{assert_no_temporaries, generate, options, tree, TempDir};
use ferrite_fetch::fetch;

#[tokio::test]
async fn copies_a_local_directory_prefix() {
    let source = TempDir::new("src");
    let files: BTreeMap<String, Vec<u8>> = [
        ("1/model.onnx", generate(2 * 1024 * 1024 + 3, 1).to_vec()),
        ("2/model.onnx", generate(1000, 2).to_vec()),
        ("ferrite.json", br#"{"max_batch_size": 8}"#.to_vec()),
        ("tokenizer/vocab.txt", b"a\nb\n".to_vec()),
        ("empty.bin", Vec::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (relative, data) in &files {
        let path = source.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let dest = TempDir::new("dest");
    let uri = format!("file://{}/", source.path().display());
    let report = fetch(&options(&uri, dest.path(), "llm")).await.unwrap();
    assert_eq!(report.downloaded_files, files.len());
    assert_eq!(tree(&dest.path().join("llm")), files);

    // Again: everything is present.
    let report = fetch(&options(&uri, dest.path(), "llm")).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, files.len()));

    // A plain path to a directory is a prefix too; one to a file is a model.
    let plain = dest.path().join("plain");
    fetch(&options(&source.path().display().to_string(), &plain, "x")).await.unwrap();
    assert_eq!(tree(&plain.join("x")), files);
    let single = source.path().join("1/model.onnx");
    fetch(&options(&single.display().to_string(), &plain, "y")).await.unwrap();
    assert_eq!(std::fs::read(plain.join("y/1/model.onnx")).unwrap(), files["1/model.onnx"]);
    assert_no_temporaries(dest.path());

    // A prefix with a hash, an empty directory, a missing path.
    let mut opts = options(&uri, dest.path(), "z");
    opts.sha256 = Some("0".repeat(64));
    assert!(fetch(&opts).await.unwrap_err().to_string().contains("not to a prefix"));
    let empty = TempDir::new("empty");
    let error = fetch(&options(&format!("file://{}/", empty.path().display()), dest.path(), "z"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no objects under this prefix"), "{error}");
    let error = fetch(&options("/nonexistent/ferrite/model.onnx", dest.path(), "z")).await.unwrap_err().to_string();
    assert!(error.contains("cannot read /nonexistent/ferrite/model.onnx"), "{error}");
}

#[tokio::test]
async fn a_prefix_over_the_caps_is_refused_before_copying() {
    let source = TempDir::new("many");
    for i in 0..6 {
        std::fs::write(source.path().join(format!("part{i}.bin")), generate(1000, i)).unwrap();
    }
    let dest = TempDir::new("many-dest");
    let uri = format!("{}/", source.path().display());
    let mut opts = options(&uri, dest.path(), "m");
    opts.max_files = 5;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("more files than --max-files (5)"), "{error}");
    opts.max_files = 6;
    opts.max_bytes = 5999;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("the objects under this prefix hold 6000 bytes, more than --max-bytes (5999"), "{error}");
    assert!(tree(dest.path()).is_empty());
    opts.max_bytes = 6000;
    assert_eq!(fetch(&opts).await.unwrap().downloaded_files, 6);
}
