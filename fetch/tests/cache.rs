//! The node model cache (`ferrite_fetch::cache`) against the HTTP stand-in:
//! hits and misses, one download for two fetches at once, scopes, read-only
//! entries, a bad download never published, LRU eviction that skips what
//! is in use or recently used.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::stand_in::{http_server, Files, Server};
use common::{generate, options, sha256_hex, tree, TempDir, MODEL_LEN};
use ferrite_fetch::cache::{
    entry_key, evict, fetch_cached, hold_shared, CacheOptions, CachedFetch, Outcome, CACHE_IN_USE_FILE,
};
use ferrite_fetch::FetchOptions;

const GIB: u64 = 1 << 30;

fn cache(dir: &Path, scope: &str) -> CacheOptions {
    CacheOptions::new(dir, GIB, scope)
}

fn is_hit(fetched: &CachedFetch) -> bool {
    matches!(fetched.outcome, Outcome::Hit)
}

/// Sets a key's last use (its lock file's mtime), `ago` in the past.
fn used_ago(dir: &Path, key: &str, ago: Duration) {
    let file = std::fs::File::options().write(true).open(dir.join(format!("locks/{key}.lock"))).unwrap();
    file.set_modified(SystemTime::now() - ago).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut keys: Vec<_> = std::fs::read_dir(dir.join("entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_second_fetch_is_a_hit_from_a_read_only_entry() {
    let (server, model) = http_server().await;
    let dir = TempDir::new("cache-hit");
    let dest = TempDir::new("cache-hit-dest");
    let opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "resnet");

    let first = fetch_cached(&opts, &cache(dir.path(), "ml")).await.unwrap();
    let Outcome::Miss(report) = &first.outcome else { panic!("the first fetch is a miss") };
    assert_eq!(report.bytes, MODEL_LEN as u64);
    assert_eq!(first.entry, dir.path().join("entries").join(&first.key));
    assert_eq!(first.key, entry_key("ml", &opts.uri, None, "resnet"));
    used_ago(dir.path(), &first.key, Duration::from_secs(3600));
    let second = fetch_cached(&opts, &cache(dir.path(), "ml")).await.unwrap();
    assert!(is_hit(&second), "{second:?}");
    let lock = dir.path().join(format!("locks/{}.lock", first.key));
    let last_use = std::fs::metadata(lock).unwrap().modified().unwrap();
    let since_use = SystemTime::now().duration_since(last_use).unwrap_or_default();
    assert!(since_use < Duration::from_secs(60), "a hit is a use: {since_use:?}");
    assert_eq!(server.count("GET", "/models/model.onnx"), 1, "a hit downloads nothing");

    // The entry is a model repository, nothing else, and --dest is not written.
    let files = tree(&first.entry);
    assert_eq!(files.keys().collect::<Vec<_>>(), [&format!("resnet/{CACHE_IN_USE_FILE}"), "resnet/1/model.onnx"]);
    assert!(files["resnet/1/model.onnx"] == model);
    assert!(tree(dest.path()).is_empty());
    assert!(tree(&dir.path().join("tmp")).is_empty(), "no staging left");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&first.entry.join("resnet/1/model.onnx")), 0o444);
    assert_eq!(mode(&first.entry.join("resnet/1")), 0o555);
    assert_eq!(mode(&first.entry), 0o555);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_fetches_at_once_download_once() {
    let (server, _) = http_server().await;
    let dir = TempDir::new("cache-race");
    let dest = TempDir::new("cache-race-dest");
    // Sent in ten parts over 2.5 s: the second fetch starts while the first downloads.
    let opts = options(&format!("{}/models/slow.onnx", server.base), dest.path(), "m");
    let (a, b) = tokio::join!(
        tokio::spawn({
            let (opts, cache) = (opts.clone(), cache(dir.path(), "ml"));
            async move { fetch_cached(&opts, &cache).await.unwrap() }
        }),
        tokio::spawn({
            let (opts, cache) = (opts.clone(), cache(dir.path(), "ml"));
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                fetch_cached(&opts, &cache).await.unwrap()
            }
        }),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(server.count("GET", "/models/slow.onnx"), 1);
    assert_eq!([is_hit(&a), is_hit(&b)], [false, true], "the second waited, then found the entry");
    assert_eq!(entries(dir.path()).len(), 1);
}

#[tokio::test]
async fn scopes_share_an_entry_only_with_a_sha256() {
    let (server, model) = http_server().await;
    let dir = TempDir::new("cache-scope");
    let dest = TempDir::new("cache-scope-dest");
    let uri = format!("{}/models/model.onnx", server.base);
    let plain = options(&uri, dest.path(), "m");
    let a = fetch_cached(&plain, &cache(dir.path(), "team-a")).await.unwrap();
    let b = fetch_cached(&plain, &cache(dir.path(), "team-b")).await.unwrap();
    assert!(!is_hit(&a) && !is_hit(&b), "no SHA-256: each namespace downloads its own");
    assert_ne!(a.key, b.key);
    assert_eq!(server.count("GET", "/models/model.onnx"), 2);

    let mut pinned = plain.clone();
    pinned.sha256 = Some(sha256_hex(&model));
    let c = fetch_cached(&pinned, &cache(dir.path(), "team-a")).await.unwrap();
    let d = fetch_cached(&pinned, &cache(dir.path(), "team-b")).await.unwrap();
    assert_eq!((is_hit(&c), is_hit(&d)), (false, true), "same content: shared");
    assert_eq!(c.key, d.key);
    assert_eq!(server.count("GET", "/models/model.onnx"), 3);
    assert_eq!(entries(dir.path()).len(), 3);
}

#[tokio::test]
async fn a_wrong_sha256_is_never_published() {
    let (server, _) = http_server().await;
    let dir = TempDir::new("cache-bad");
    let dest = TempDir::new("cache-bad-dest");
    let mut opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "m");
    opts.sha256 = Some("0".repeat(64));
    let error = fetch_cached(&opts, &cache(dir.path(), "ml")).await.unwrap_err();
    assert!(error.message().contains("SHA-256") || error.message().contains("sha256"), "{error}");
    assert!(entries(dir.path()).is_empty());
    assert!(tree(&dir.path().join("tmp")).is_empty(), "the staging is removed");
    // A retry downloads again rather than finding a half-made entry.
    let _ = fetch_cached(&opts, &cache(dir.path(), "ml")).await.unwrap_err();
    assert_eq!(server.count("GET", "/models/model.onnx"), 2);
}

/// Three 1000-byte models and a cache that holds two.
async fn three_models() -> (Server, Vec<FetchOptions>, TempDir) {
    let mut files = Files::default();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        files.files.insert(format!("/m/{name}.onnx"), generate(1000, i as u64 + 1));
    }
    let server = Server::start(files).await;
    let dest = TempDir::new("cache-lru-dest");
    let opts = ["a", "b", "c"].map(|n| options(&format!("{}/m/{n}.onnx", server.base), dest.path(), n)).to_vec();
    (server, opts, dest)
}

fn small_cache(dir: &Path) -> CacheOptions {
    let mut cache = CacheOptions::new(dir, 2500, "ml");
    cache.grace = Duration::ZERO;
    cache
}

#[tokio::test]
async fn eviction_removes_the_least_recently_used_entry_not_in_use() {
    let (_server, opts, _dest) = three_models().await;
    let dir = TempDir::new("cache-lru");
    let cache = small_cache(dir.path());
    let a = fetch_cached(&opts[0], &cache).await.unwrap().key;
    let b = fetch_cached(&opts[1], &cache).await.unwrap().key;
    // a used more recently than b: b is the least recently used.
    used_ago(dir.path(), &b, Duration::from_secs(60));
    used_ago(dir.path(), &a, Duration::from_secs(30));
    let c = fetch_cached(&opts[2], &cache).await.unwrap();
    assert_eq!(c.eviction.as_ref().unwrap().evicted, std::slice::from_ref(&b));
    assert_eq!(c.eviction.unwrap().remaining_bytes, 2000);
    assert_eq!(entries(dir.path()), {
        let mut k = vec![a.clone(), c.key.clone()];
        k.sort();
        k
    });

    // b again (a miss); a is now the least recently used, but a server holds it.
    used_ago(dir.path(), &a, Duration::from_secs(90));
    used_ago(dir.path(), &c.key, Duration::from_secs(60));
    let server_lock = hold_shared(&dir.path().join(format!("entries/{a}/a/{CACHE_IN_USE_FILE}"))).unwrap();
    let b2 = fetch_cached(&opts[1], &cache).await.unwrap();
    assert!(!is_hit(&b2));
    assert_eq!(b2.eviction.unwrap().evicted, std::slice::from_ref(&c.key), "a is in use: the next one goes");
    // The server exits: a can go now.
    drop(server_lock);
    used_ago(dir.path(), &b, Duration::from_secs(10));
    let cached = fetch_cached(&opts[2], &cache).await.unwrap();
    assert_eq!(cached.eviction.unwrap().evicted, [a]);
}

#[tokio::test]
async fn recently_used_entries_are_kept_over_the_bound() {
    let (_server, opts, _dest) = three_models().await;
    let dir = TempDir::new("cache-grace");
    let mut cache = small_cache(dir.path());
    cache.grace = Duration::from_secs(600);
    for opts in &opts {
        fetch_cached(opts, &cache).await.unwrap();
    }
    // Over the bound, but every entry may belong to a pod about to start.
    assert_eq!(entries(dir.path()).len(), 3);
    let report = evict(dir.path(), 2500, Duration::from_secs(600)).unwrap();
    assert!(report.evicted.is_empty());
    assert_eq!(report.remaining_bytes, 3000);
    // Past the grace period the oldest goes.
    let first = entry_key("ml", &opts[0].uri, None, "a");
    used_ago(dir.path(), &first, Duration::from_secs(700));
    assert_eq!(evict(dir.path(), 2500, Duration::from_secs(600)).unwrap().evicted, [first]);
}

#[tokio::test]
async fn a_model_bigger_than_the_cache_is_served_but_not_kept() {
    let (server, model) = http_server().await;
    let dir = TempDir::new("cache-big");
    let dest = TempDir::new("cache-big-dest");
    let opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "big");
    // The default grace: the pod about to start keeps its entry.
    let fetched = fetch_cached(&opts, &CacheOptions::new(dir.path(), 1000, "ml")).await.unwrap();
    assert!(fetched.eviction.unwrap().evicted.is_empty(), "just used, kept");
    // Still there while its server holds it, past the grace period...
    let lock = hold_shared(&fetched.entry.join("big").join(CACHE_IN_USE_FILE)).unwrap();
    assert!(std::fs::read(fetched.entry.join("big/1/model.onnx")).unwrap() == model);
    assert!(evict(dir.path(), 1000, Duration::ZERO).unwrap().evicted.is_empty());
    // ...and gone once no pod uses it, though nothing else needs the room.
    drop(lock);
    assert_eq!(evict(dir.path(), 1000, Duration::ZERO).unwrap().evicted, [fetched.key]);
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn a_leftover_directory_is_replaced_and_stale_staging_removed() {
    let (server, _) = http_server().await;
    let dir = TempDir::new("cache-leftover");
    let dest = TempDir::new("cache-leftover-dest");
    let opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "m");
    let key = entry_key("ml", &opts.uri, None, "m");
    // What a kubelet makes for a subPath that does not exist yet, and what a killed fetch leaves.
    std::fs::create_dir_all(dir.path().join("entries").join(&key)).unwrap();
    std::fs::create_dir_all(dir.path().join("tmp").join(format!("{key}.1.2/m/1"))).unwrap();
    std::fs::write(dir.path().join("tmp").join(format!("{key}.1.2/m/1/model.onnx")), Bytes::from_static(b"x")).unwrap();
    let fetched = fetch_cached(&opts, &cache(dir.path(), "ml")).await.unwrap();
    assert!(!is_hit(&fetched), "an entry without its in-use file is not published");
    assert!(fetched.entry.join("m/1/model.onnx").is_file());
    assert!(tree(&dir.path().join("tmp")).is_empty(), "the dead fetch's staging is removed");
}
