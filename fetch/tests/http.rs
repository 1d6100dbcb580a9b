//! `http(s)://` sources against the stand-in (`common::stand_in`): a
//! byte-identical atomic download, retries, resume with a range request,
//! clear errors, SHA-256 checks, skipping what is present, credentials kept
//! out of messages, archives, and what `fetch` refuses.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::stand_in::{http_server, Files, Server};
use common::{assert_no_temporaries, generate, options, sha256_hex, tree, TempDir, MODEL_LEN};
use ferrite_fetch::{fetch, redact_uri, TEMP_MARKER};

/// A gzip tar of an LLM model directory wrapped in one top-level directory,
/// as `tar czf smollm2.tgz smollm2/` makes it.
fn llm_archive(files: &[(&str, &[u8])]) -> Bytes {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, format!("smollm2/{name}"), *data).unwrap();
    }
    Bytes::from(builder.into_inner().unwrap().finish().unwrap())
}

#[tokio::test]
async fn http_download_is_byte_identical_and_atomic() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("http");
    let uri = format!("{}/models/model.onnx", server.base);
    let report = fetch(&options(&uri, dest.path(), "resnet")).await.unwrap();

    let target = dest.path().join("resnet/1/model.onnx");
    assert_eq!(report.files, vec![target.clone()]);
    assert_eq!(report.model_dir, dest.path().join("resnet"));
    assert_eq!((report.downloaded_files, report.skipped_files, report.bytes), (1, 0, MODEL_LEN as u64));
    assert!(std::fs::read(&target).unwrap() == model, "content differs");
    // The only file in the repository is the model: no temporary left.
    assert_eq!(tree(dest.path()).into_keys().collect::<Vec<_>>(), vec!["resnet/1/model.onnx"]);
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);
}

#[tokio::test]
async fn http_custom_model_file_name_and_sha256() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("http-name");
    let mut opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "m");
    opts.model_file = "other.onnx".into();
    opts.sha256 = Some(sha256_hex(&model).to_uppercase());
    fetch(&opts).await.unwrap();
    assert!(std::fs::read(dest.path().join("m/1/other.onnx")).unwrap() == model);
}

#[tokio::test]
async fn http_retries_after_503() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("flaky");
    let uri = format!("{}/models/flaky.onnx", server.base);
    let report = fetch(&options(&uri, dest.path(), "m")).await.unwrap();
    assert_eq!(report.downloaded_files, 1);
    assert_eq!(server.count("GET", "/models/flaky.onnx"), 2, "one 503, then the download");
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);
    assert_no_temporaries(dest.path());

    // With no retries allowed, the 503 is the answer.
    let (server, _) = http_server().await;
    let mut opts = options(&format!("{}/models/flaky.onnx", server.base), dest.path(), "n");
    opts.retries = 0;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("HTTP 503"), "{error}");
    assert!(!dest.path().join("n/1/model.onnx").exists());
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn http_resumes_a_cut_download_with_a_range_request() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("cut");
    let uri = format!("{}/models/cut.onnx", server.base);
    fetch(&options(&uri, dest.path(), "m")).await.unwrap();
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model, "content differs");
    assert_eq!(server.count("GET", "/models/cut.onnx"), 2);
    let ranges = server.state.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let resumed_at: u64 = ranges[0].trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(resumed_at > 0 && resumed_at < MODEL_LEN as u64, "{ranges:?}");
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn http_404_fails_with_a_clear_message() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("404");
    let uri = format!("{}/models/missing.onnx", server.base);
    let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err();
    let text = error.to_string();
    assert_eq!(text, format!("fetch {uri}: not found (HTTP 404)"));
    assert_eq!(server.count("GET", "/models/missing.onnx"), 1, "a 404 is not retried");
    assert!(tree(dest.path()).is_empty(), "{:?}", tree(dest.path()).keys());
}

#[tokio::test]
async fn sha256_mismatch_deletes_the_download_and_fails() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("sha");
    let uri = format!("{}/models/model.onnx", server.base);
    let mut opts = options(&uri, dest.path(), "m");
    let wrong = "0".repeat(64);
    opts.sha256 = Some(wrong.clone());
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("sha256 mismatch"), "{error}");
    assert!(error.contains(&wrong) && error.contains(&sha256_hex(&model)), "{error}");
    assert!(!dest.path().join("m/1/model.onnx").exists());
    assert_no_temporaries(dest.path());

    // A malformed hash is refused before anything is downloaded.
    opts.sha256 = Some("abc".into());
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("64 hex digits"), "{error}");
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // A file that is present but has other content is replaced.
    std::fs::create_dir_all(dest.path().join("m/1")).unwrap();
    std::fs::write(dest.path().join("m/1/model.onnx"), vec![0u8; MODEL_LEN]).unwrap();
    opts.sha256 = Some(sha256_hex(&model));
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (1, 0));
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);
}

#[tokio::test]
async fn skips_a_file_that_is_already_present() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("skip");
    let uri = format!("{}/models/model.onnx", server.base);
    let opts = options(&uri, dest.path(), "m");
    fetch(&opts).await.unwrap();
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // Same size: only a HEAD, no download.
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files, report.bytes), (0, 1, 0));
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);
    assert_eq!(server.count("HEAD", "/models/model.onnx"), 1);

    // With a hash, the hash decides and the source is not even asked.
    let mut with_hash = opts.clone();
    with_hash.sha256 = Some(sha256_hex(&model));
    let report = fetch(&with_hash).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, 1));
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // Another size: downloaded again.
    std::fs::write(dest.path().join("m/1/model.onnx"), b"short").unwrap();
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (1, 0));
    assert_eq!(server.count("GET", "/models/model.onnx"), 2);
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);

    // A temporary left by an interrupted earlier run is cleaned up.
    let stale = dest.path().join(format!("m/1/.model.onnx{TEMP_MARKER}1-0"));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::remove_file(dest.path().join("m/1/model.onnx")).unwrap();
    fetch(&opts).await.unwrap();
    assert!(!stale.exists());
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn credentials_in_the_url_never_appear_in_errors() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("creds");
    let secrets = ["hunter2secret", "X-Amz-Signature", "sigvalue123", "opaque-token"];
    // A 404 from a reachable server.
    let uri = format!(
        "http://admin:hunter2secret@127.0.0.1:{}/models/missing.onnx?X-Amz-Signature=sigvalue123#opaque-token",
        server.port
    );
    let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err().to_string();
    assert!(error.contains("not found"), "{error}");
    assert!(error.contains(&format!("http://127.0.0.1:{}/models/missing.onnx", server.port)), "{error}");
    for secret in secrets.iter().chain(&["admin"]) {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    // The user info went to the server as basic auth, not in the path.
    let authorizations = server.state.authorizations.lock().unwrap().clone();
    assert_eq!(authorizations, vec!["Basic YWRtaW46aHVudGVyMnNlY3JldA==".to_string()]);

    // A connection refused: the client's own error mentions the URL.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let uri = format!("https://admin:hunter2secret@127.0.0.1:{closed}/m.onnx?X-Amz-Signature=sigvalue123");
    let mut opts = options(&uri, dest.path(), "m");
    opts.retries = 1;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("cannot connect"), "{error}");
    assert!(error.starts_with(&format!("fetch https://127.0.0.1:{closed}/m.onnx: ")), "{error}");
    for secret in secrets.iter().chain(&["admin"]) {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    assert_eq!(redact_uri("s3://AKID:secretkey@bucket/k?x=y"), "s3://bucket/k");
}

#[tokio::test]
async fn an_http_archive_is_unpacked_into_version_1() {
    let weights = generate(300_000, 3);
    let files: [(&str, &[u8]); 3] = [("model.onnx", &weights), ("llm.json", b"{}"), ("tokenizer.json", b"{\"v\":1}")];
    let mut served = Files::default();
    served.files.insert("/llm/smollm2.tgz".into(), llm_archive(&files));
    let server = Server::start(served).await;
    let dest = TempDir::new("archive");
    let report = fetch(&options(&format!("{}/llm/smollm2.tgz", server.base), dest.path(), "chat")).await.unwrap();
    let expected: BTreeMap<String, Vec<u8>> =
        files.iter().map(|(name, data)| (format!("chat/1/{name}"), data.to_vec())).collect();
    assert_eq!(tree(dest.path()), expected);
    assert_eq!(report.files.len(), 3);
}

#[tokio::test]
async fn refuses_what_it_cannot_fetch() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("refuse");
    let cases = [
        (format!("{}/models/", server.base), "cannot be listed"),
        (format!("{}/models/bundle.tar.gz", server.base), "archive"),
        (format!("{}/models/bundle.zip", server.base), "zip archives are not unpacked"),
        ("pvc://models-claim/resnet/model.onnx".to_string(), "operator mounts the claim"),
        ("ftp://host/model.onnx".to_string(), "unsupported URI scheme 'ftp'"),
        ("".to_string(), "empty"),
    ];
    for (uri, expected) in cases {
        let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err().to_string();
        assert!(error.contains(expected), "{uri}: {error}");
        assert!(!error.contains('\n'));
    }
    let error = fetch(&options(&format!("{}/models/model.onnx", server.base), dest.path(), "../evil"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("invalid model name"), "{error}");
    assert!(tree(dest.path()).is_empty());
    assert!(!dest.path().parent().unwrap().join("evil").exists());
}

#[tokio::test]
async fn an_endless_body_stops_at_max_bytes() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("endless");
    // Credentials in the URI stay out of the cap's message too.
    let uri = format!("http://admin:hunter2secret@127.0.0.1:{}/models/endless.onnx?sig=sigvalue123", server.port);
    let mut opts = options(&uri, dest.path(), "m");
    opts.max_bytes = 8 << 20;
    let started = std::time::Instant::now();
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("larger than --max-bytes (8388608 bytes)"), "{error}");
    assert!(error.contains("stopped after"), "{error}");
    for secret in ["admin", "hunter2secret", "sigvalue123"] {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    // A cap is not a transient failure: no retry, one GET.
    assert_eq!(server.count("GET", "/models/endless.onnx"), 1);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(tree(dest.path()).is_empty(), "partial output left: {:?}", tree(dest.path()).keys());
}

#[tokio::test]
async fn a_content_length_over_max_bytes_is_refused_before_the_download() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("announced");
    let mut opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "m");
    opts.max_bytes = 1 << 20;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains(&format!("the source announces {MODEL_LEN} bytes, more than --max-bytes")), "{error}");
    assert!(tree(dest.path()).is_empty());
    // Exactly the model's size is allowed.
    opts.max_bytes = MODEL_LEN as u64;
    fetch(&opts).await.unwrap();
}

/// A gzip tar whose entries expand far past their compressed size.
fn bomb(entries: usize, entry_len: u64) -> Bytes {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for i in 0..entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(entry_len);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("bomb/part{i}.bin"), std::io::Read::take(std::io::repeat(0), entry_len))
            .unwrap();
    }
    Bytes::from(builder.into_inner().unwrap().finish().unwrap())
}

#[tokio::test]
async fn a_tar_bomb_stops_at_max_bytes_and_max_files() {
    // 48 MiB of zeros in 12 entries, about 50 KiB on the wire.
    let archive = bomb(12, 4 << 20);
    assert!(archive.len() < 1 << 20);
    let mut served = Files::default();
    served.files.insert("/bomb.tar.gz".into(), archive);
    let server = Server::start(served).await;
    let dest = TempDir::new("bomb");
    let mut opts = options(&format!("{}/bomb.tar.gz", server.base), dest.path(), "m");
    opts.max_bytes = 16 << 20;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("--max-bytes (16777216 bytes)"), "{error}");
    assert!(tree(dest.path()).is_empty(), "partial output left: {:?}", tree(dest.path()).keys());

    opts.max_bytes = 1 << 30;
    opts.max_files = 5;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("more files than --max-files (5)"), "{error}");
    assert!(tree(dest.path()).is_empty(), "partial output left: {:?}", tree(dest.path()).keys());

    // Under both caps it unpacks: the caps count what is there, not more.
    opts.max_files = 12;
    let report = fetch(&opts).await.unwrap();
    assert_eq!(report.files.len(), 12);
}
