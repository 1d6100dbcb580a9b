//! Real storage servers, started by the tests on free loopback ports with
//! their data in a scratch directory, and killed when dropped:
//!
//! | server | for | installed by |
//! | --- | --- | --- |
//! | MinIO | `s3://` | `make storage-servers` (Go module, pinned in fetch/storage-servers.sh) |
//! | fake-gcs-server | `gs://` | the same (Go module) |
//! | Azurite (blob) | `az://` | the same (npm package) |
//!
//! The binaries are looked for in `$FERRITE_STORAGE_BIN`, else in
//! `.cache/storage/bin` of the workspace. A missing one fails the test when
//! `CI=true`; elsewhere the test says loudly that it was skipped and how to
//! install the server, and returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path as StorePath;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use super::TempDir;

/// MinIO's root user and password in the tests.
pub const MINIO_USER: &str = "ferrite-test";
pub const MINIO_PASSWORD: &str = "ferrite-test-secret";
/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A storage server process; killed on drop.
pub struct Running {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn bin_dir() -> PathBuf {
    match std::env::var_os("FERRITE_STORAGE_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/storage/bin"),
    }
}

/// The server's binary, or None (after a loud message) where it is missing
/// outside CI. Under `CI=true` a missing server fails the test.
fn binary(name: &str, test: &str) -> Option<PathBuf> {
    let path = bin_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    let message = format!(
        "{name} not found at {}: install the storage servers with `make storage-servers` \
         (or set FERRITE_STORAGE_BIN)",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    // Straight to stderr, past the test harness's capture: a skip is seen.
    let _ =
        std::io::Write::write_all(&mut std::io::stderr(), format!("\n*** SKIPPED {test}: {message} ***\n").as_bytes());
    None
}

fn free_port() -> u16 {
    super::closed_port()
}

fn spawn(mut command: Command, name: &str, dir: TempDir, port: u16) -> Running {
    let log = dir.path().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Running { child, base: format!("http://127.0.0.1:{port}"), port, log, _dir: dir }
}

/// Waits until `url` answers with one of `ok` (any status when empty).
async fn wait_ready(server: &mut Running, name: &str, url: &str, ok: &[u16]) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(response) = client.get(url).send().await {
            if ok.is_empty() || ok.contains(&response.status().as_u16()) {
                return;
            }
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{name} exited ({status}) before it was ready:\n{}", server.log_tail());
        }
        assert!(Instant::now() < deadline, "{name} not ready after 90 s:\n{}", server.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// MinIO with `bucket` holding `objects`.
pub async fn minio(test: &str, bucket: &str, objects: &BTreeMap<String, Bytes>) -> Option<Running> {
    let binary = binary("minio", test)?;
    let dir = TempDir::new("minio");
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .arg("server")
        .arg(dir.path().join("data"))
        .args(["--address", &format!("127.0.0.1:{port}"), "--console-address", &format!("127.0.0.1:{}", free_port())])
        .env("MINIO_ROOT_USER", MINIO_USER)
        .env("MINIO_ROOT_PASSWORD", MINIO_PASSWORD)
        .env("MINIO_BROWSER", "off")
        .env("MINIO_UPDATE", "off")
        .env("HOME", dir.path());
    let mut server = spawn(command, "minio", dir, port);
    let ready = format!("{}/minio/health/ready", server.base);
    wait_ready(&mut server, "minio", &ready, &[200]).await;

    let store = AmazonS3Builder::new()
        .with_endpoint(&server.base)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(MINIO_USER)
        .with_secret_access_key(MINIO_PASSWORD)
        .with_bucket_name(bucket)
        .build()
        .unwrap();
    // object_store cannot create a bucket; a presigned PUT of the bucket's
    // root is S3's CreateBucket.
    let url = store.signed_url(reqwest::Method::PUT, &StorePath::from(""), Duration::from_secs(600)).await.unwrap();
    let response = reqwest::Client::new().put(url).send().await.unwrap();
    assert!(response.status().is_success(), "create bucket: {}", response.text().await.unwrap_or_default());
    upload(&store, objects).await;
    Some(server)
}

/// fake-gcs-server with `bucket` holding `objects` (loaded from a data
/// directory at start, as its users seed it).
pub async fn fake_gcs(test: &str, bucket: &str, objects: &BTreeMap<String, Bytes>) -> Option<Running> {
    let binary = binary("fake-gcs-server", test)?;
    let dir = TempDir::new("fake-gcs");
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join(bucket)).unwrap();
    for (key, bytes) in objects {
        let path = data.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string(), "-backend", "memory"])
        .args(["-public-host", &format!("127.0.0.1:{port}"), "-log-level", "warn"])
        .arg("-data")
        .arg(&data);
    let mut server = spawn(command, "fake-gcs-server", dir, port);
    let ready = format!("{}/storage/v1/b", server.base);
    wait_ready(&mut server, "fake-gcs-server", &ready, &[200]).await;
    Some(server)
}

/// Azurite's blob service with `container` holding `objects`.
pub async fn azurite(test: &str, container: &str, objects: &BTreeMap<String, Bytes>) -> Option<Running> {
    let binary = binary("azurite-blob", test)?;
    let dir = TempDir::new("azurite");
    let port = free_port();
    let mut command = Command::new(binary);
    command.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()]).current_dir(dir.path()).args([
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]);
    let mut server = spawn(command, "azurite", dir, port);
    let ready = format!("{}/{AZURITE_ACCOUNT}?comp=list", server.base);
    wait_ready(&mut server, "azurite", &ready, &[]).await;

    create_container(&server, container).await;
    let store = MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_endpoint(azurite_endpoint(&server))
        .with_allow_http(true)
        .with_container_name(container)
        .build()
        .unwrap();
    upload(&store, objects).await;
    Some(server)
}

/// The account URL of Azurite's development account (path style).
pub fn azurite_endpoint(server: &Running) -> String {
    format!("{}/{AZURITE_ACCOUNT}", server.base)
}

async fn upload(store: &dyn ObjectStore, objects: &BTreeMap<String, Bytes>) {
    for (key, bytes) in objects {
        store.put(&StorePath::from(key.as_str()), PutPayload::from(bytes.clone())).await.unwrap();
    }
}

/// Create Container, signed with the account key (Shared Key): object_store
/// does not create containers.
async fn create_container(server: &Running, container: &str) {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let date = httpdate_now();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
    );
    let signature = engine.encode(hmac_sha256(&engine.decode(AZURITE_KEY).unwrap(), to_sign.as_bytes()));
    let response = reqwest::Client::new()
        .put(format!("{}/{AZURITE_ACCOUNT}/{container}?restype=container", server.base))
        .header("x-ms-date", &date)
        .header("x-ms-version", version)
        .header("Authorization", format!("SharedKey {AZURITE_ACCOUNT}:{signature}"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert!(status.is_success(), "create container: {status} {}", response.text().await.unwrap_or_default());
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The current time as an HTTP date (RFC 7231), e.g. `Wed, 02 Dec 2026 08:00:00 GMT`.
fn httpdate_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(month - 1) as usize];
    format!("{weekday}, {day:02} {name} {year} {:02}:{:02}:{:02} GMT", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Settings that point object_store's S3 client at MinIO.
pub fn s3_options(server: &Running) -> Vec<(String, String)> {
    pairs(&[
        ("aws_endpoint", &server.base),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", MINIO_USER),
        ("aws_secret_access_key", MINIO_PASSWORD),
    ])
}

/// Settings that point object_store's GCS client at fake-gcs-server: a
/// service account "key" with its URL and OAuth turned off, as
/// fake-gcs-server's users configure clients.
pub fn gcs_options(server: &Running) -> Vec<(String, String)> {
    let key = format!(
        r#"{{"gcs_base_url": "{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
        server.base
    );
    pairs(&[("google_service_account_key", &key), ("allow_http", "true")])
}

/// Settings that point object_store's Azure client at Azurite's
/// development account.
pub fn azure_options(server: &Running) -> Vec<(String, String)> {
    pairs(&[
        ("azure_storage_account_name", AZURITE_ACCOUNT),
        ("azure_storage_account_key", AZURITE_KEY),
        ("azure_endpoint", &azurite_endpoint(server)),
        ("allow_http", "true"),
    ])
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
