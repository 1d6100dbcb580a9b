//! The node model cache's entry key: which directory of the cache holds a
//! model. `ferrite-server fetch --cache-dir` writes the entry there and the
//! operator mounts that directory (and only it) into the server container,
//! so both compute it with this one function.

use sha2::{Digest, Sha256};

/// The cache's directory of published entries: an entry's path relative to
/// the cache root is `entries/<key>` ([`entry_sub_path`]).
pub const CACHE_ENTRIES_DIR: &str = "entries";

/// The key of a model's cache entry (a file name: `s-` or `p-` and 40 hex
/// digits).
///
/// - With a SHA-256 the key depends on the SHA-256, the model name and
///   whether the URI names an archive (`.tar`, `.tar.gz`, `.tgz`: unpacked,
///   else stored as one file), not on the URI nor the scope: the same bytes
///   are the same model wherever they come from, so namespaces share it
///   (`s-`, shared).
/// - Without one, on the scope (the namespace), the URI and the model name:
///   nothing proves two namespaces' downloads equal, so each has its own
///   (`p-`, private), and one namespace cannot plant files another serves.
///
/// The model name is part of the key because the entry is a model
/// repository (`<model-name>/1/model.onnx`). A SHA-256 is compared in lower
/// case, trimmed. Fields are length-prefixed, so no two inputs share a key.
pub fn entry_key(scope: &str, uri: &str, sha256: Option<&str>, model_name: &str) -> String {
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(b"ferrite-model-cache-v1");
    let prefix = match sha256 {
        Some(sha256) => {
            field(b"shared");
            field(sha256.trim().to_ascii_lowercase().as_bytes());
            field(archive_layout(uri).as_bytes());
            "s-"
        }
        None => {
            field(b"private");
            field(scope.as_bytes());
            field(uri.as_bytes());
            "p-"
        }
    };
    field(model_name.as_bytes());
    let digest = hash.finalize();
    let mut key = String::with_capacity(42);
    key.push_str(prefix);
    for byte in &digest[..20] {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The entry's path relative to the cache root: `entries/<key>`, the
/// `subPath` of the server container's mount.
pub fn entry_sub_path(key: &str) -> String {
    format!("{CACHE_ENTRIES_DIR}/{key}")
}

/// How the fetch lays out a single object: unpacked (by archive kind) or as
/// one file; a prefix URI (ending with `/`) is a directory copy.
fn archive_layout(uri: &str) -> &'static str {
    let path = uri.split(['?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    if path.ends_with('/') {
        "prefix"
    } else if path.ends_with(".tar.gz") || path.ends_with(".tgz") {
        "tar.gz"
    } else if path.ends_with(".tar") {
        "tar"
    } else {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sha256_shares_the_entry_across_scopes_and_uris() {
        let sha = "ab".repeat(32);
        let a = entry_key("team-a", "https://a/m.onnx", Some(&sha), "m");
        assert_eq!(a, entry_key("team-b", "s3://b/other.onnx", Some(&sha.to_uppercase()), "m"));
        assert!(a.starts_with("s-") && a.len() == 42, "{a}");
        assert_ne!(a, entry_key("team-a", "https://a/m.onnx", Some(&sha), "n"), "the model name is the layout");
        assert_ne!(a, entry_key("team-a", "https://a/m.tar.gz", Some(&sha), "m"), "an archive is unpacked");
    }

    #[test]
    fn without_a_sha256_each_scope_has_its_own_entry() {
        let a = entry_key("team-a", "https://h/m.onnx", None, "m");
        assert!(a.starts_with("p-"), "{a}");
        assert_ne!(a, entry_key("team-b", "https://h/m.onnx", None, "m"));
        assert_ne!(a, entry_key("team-a", "https://h/n.onnx", None, "m"));
        assert_eq!(a, entry_key("team-a", "https://h/m.onnx", None, "m"));
        // Length prefixes: moving a character between fields changes the key.
        assert_ne!(entry_key("ab", "c", None, "m"), entry_key("a", "bc", None, "m"));
        assert_eq!(entry_sub_path(&a), format!("entries/{a}"));
    }
}
