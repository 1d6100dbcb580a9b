//! Reading a ferrite-server pod's load from its Prometheus metrics.
//!
//! The text exposition format is simple enough to parse here: one sample
//! per line, `name{label="value",...} value [timestamp]`, `#` comments.
//! Why not a parser crate: the one made for this, `prometheus-parse` 0.2.5,
//! run on this module's test table, silently drops malformed samples of our
//! own families (`ferrite_queue_depth{model="m"} one`, an unterminated label
//! set), so a broken reading would look like an idle pod and scale it down;
//! it takes `1 2 3` as the value 1, drops a valid sample whose label value
//! holds an escaped quote, and does not see a family declared by `# TYPE`
//! alone. An error here counts the pod as failed instead: the load is then
//! a lower bound, and with no pod read the replica count holds.

use std::time::Duration;

/// Metric family of requests waiting in a model's queue (the contract's).
pub const QUEUE_DEPTH: &str = ferrite_contract::metrics::QUEUE_DEPTH;
/// Metric family of requests executing on a model's sessions (the contract's).
pub const INFLIGHT: &str = ferrite_contract::metrics::INFLIGHT_REQUESTS;
/// Counter family of requests received, by model and outcome (the contract's).
pub const REQUESTS_TOTAL: &str = ferrite_contract::metrics::REQUESTS_TOTAL;
/// The label that names the model in both families (the contract's).
const MODEL_LABEL: &str = ferrite_contract::metrics::MODEL_LABEL;

/// Largest metrics body read: a server with many models exports tens of KiB;
/// anything far beyond that is not a ferrite-server and is not buffered.
const MAX_BODY: usize = 8 << 20;

/// One pod's load for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLoad {
    /// Sum of `ferrite_queue_depth{model=...}`.
    pub queued: u64,
    /// Sum of `ferrite_inflight_requests{model=...}`.
    pub inflight: u64,
    /// Sum of `ferrite_requests_total{model=...}` over every outcome: a
    /// counter whose movement means the model is not idle (0 when absent: a
    /// counter is exported from its first request on).
    pub requests: u64,
}

/// Why a pod's load could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request did not finish within the scrape timeout.
    #[error("scrape timed out after {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, DNS, TLS and the like.
    #[error("scrape failed: {0}")]
    Http(#[source] reqwest::Error),
    /// The server answered with an error status.
    #[error("metrics endpoint answered HTTP {0}")]
    Status(u16),
    /// The body exceeded the size limit.
    #[error("metrics body larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not the text format, or a sample of ours is malformed.
    #[error("malformed metrics, line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A family the autoscaler needs is absent: not a ferrite-server, or an
    /// incompatible version. Not read as zero, which would scale down.
    #[error("metric family {0} missing (not a ferrite-server?)")]
    MissingFamily(&'static str),
}

/// GETs a ferrite-server's metrics (`http://<podIP>:8002/metrics`) and sums
/// the queue depth and in-flight requests of `model`. `timeout` bounds the
/// whole exchange, connection to last byte.
pub async fn scrape(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    timeout: Duration,
) -> Result<PodLoad, ScrapeError> {
    let text = match tokio::time::timeout(timeout, fetch(client, url, timeout)).await {
        Ok(result) => result?,
        Err(_) => return Err(ScrapeError::Timeout(timeout)),
    };
    parse_load(&text, model)
}

/// GETs a pod's metrics text (`http://<podIP>:8002/metrics`), with the same
/// bounds as [`scrape`]: `timeout` over the whole exchange, at most 8 MiB.
pub async fn fetch_metrics(client: &reqwest::Client, url: &str, timeout: Duration) -> Result<String, ScrapeError> {
    match tokio::time::timeout(timeout, fetch(client, url, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

/// Every sample of `family` in Prometheus text, as `(labels, value)`. Lines
/// of other families are skipped unchecked; a malformed sample of `family`
/// is an error, as in [`parse_load`]. An absent family gives no samples.
pub fn family_samples(text: &str, family: &str) -> Result<Vec<(Labels, f64)>, ScrapeError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_len = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
        if &line[..name_len] != family {
            continue;
        }
        let sample =
            parse_sample(&line[name_len..]).map_err(|message| ScrapeError::Parse { line: index + 1, message })?;
        if !sample.value.is_finite() {
            return Err(ScrapeError::Parse {
                line: index + 1,
                message: format!("{} is not a finite number", sample.value),
            });
        }
        samples.push((sample.labels, sample.value));
    }
    Ok(samples)
}

async fn fetch(client: &reqwest::Client, url: &str, timeout: Duration) -> Result<String, ScrapeError> {
    let http_err =
        |e: reqwest::Error| if e.is_timeout() { ScrapeError::Timeout(timeout) } else { ScrapeError::Http(e) };
    // reqwest's own timeout as well as the outer one: it also covers the
    // client's connection pool wait, and gives a clean error either way.
    let mut response = client
        .get(url)
        .header(reqwest::header::ACCEPT, "text/plain;version=0.0.4")
        .timeout(timeout)
        .send()
        .await
        .map_err(http_err)?;
    let status = response.status();
    if !status.is_success() {
        return Err(ScrapeError::Status(status.as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_err)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ScrapeError::TooLarge(MAX_BODY));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|e| ScrapeError::Parse { line: 0, message: format!("not UTF-8: {e}") })
}

/// Sums `ferrite_queue_depth` and `ferrite_inflight_requests` samples whose
/// `model` label is `model`, from Prometheus text.
///
/// A family with no sample for the model counts as zero (the model is idle or
/// has not been loaded yet); a family that is absent altogether is an error.
/// Lines of other families are skipped without being checked, so a quirk in
/// an unrelated metric cannot stop autoscaling.
pub fn parse_load(text: &str, model: &str) -> Result<PodLoad, ScrapeError> {
    let mut seen = [false; 2];
    let mut sums = [0f64; 2];
    let families = [QUEUE_DEPTH, INFLIGHT];
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            // `# HELP name ...` and `# TYPE name ...` declare a family even
            // when it has no samples.
            let mut words = comment.split_whitespace();
            if let (Some("HELP" | "TYPE"), Some(name)) = (words.next(), words.next()) {
                if let Some(i) = families.iter().position(|f| *f == name) {
                    seen[i] = true;
                }
            }
            continue;
        }
        let name_len = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
        let Some(i) = families.iter().position(|f| *f == &line[..name_len]) else {
            continue;
        };
        seen[i] = true;
        let parse_err = |message: String| ScrapeError::Parse { line: index + 1, message };
        let sample = parse_sample(&line[name_len..]).map_err(parse_err)?;
        if sample.labels.iter().any(|(k, v)| k == MODEL_LABEL && v == model) {
            if !sample.value.is_finite() {
                return Err(parse_err(format!("{} is not a finite number", sample.value)));
            }
            sums[i] += sample.value;
        }
    }
    for (i, family) in families.iter().enumerate() {
        if !seen[i] {
            return Err(ScrapeError::MissingFamily(family));
        }
    }
    // Gauges of counts: a negative sum would be a server bug; read it as idle.
    let count = |v: f64| v.max(0.0).round() as u64;
    let requests = family_samples(text, REQUESTS_TOTAL)?
        .into_iter()
        .filter(|(labels, _)| labels.iter().any(|(k, v)| k == MODEL_LABEL && v == model))
        .map(|(_, value)| count(value))
        .fold(0u64, u64::saturating_add);
    Ok(PodLoad { queued: count(sums[0]), inflight: count(sums[1]), requests })
}

/// Label names and unescaped values, in the order written.
pub type Labels = Vec<(String, String)>;

/// A sample's labels and value.
#[derive(Debug, PartialEq)]
struct Sample {
    labels: Labels,
    value: f64,
}

/// Parses what follows a metric name: `{labels}` (optional), the value and
/// an optional timestamp.
fn parse_sample(rest: &str) -> Result<Sample, String> {
    let mut labels = Vec::new();
    let mut rest = rest.trim_start();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the timestamp"));
    }
    Ok(Sample { labels, value })
}

/// Parses `name="value", ...}` (the opening brace already consumed) and
/// returns the labels and the text after the closing brace. Label values may
/// hold `\\`, `\"` and `\n` escapes, and so commas and braces.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let name_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).ok_or("unterminated label set")?;
        if name_len == 0 {
            return Err(format!("bad label name at {:?}", truncate(rest)));
        }
        let name = &rest[..name_len];
        rest = rest[name_len..].trim_start();
        rest = rest.strip_prefix('=').ok_or_else(|| format!("expected '=' after label {name}"))?.trim_start();
        rest = rest.strip_prefix('"').ok_or_else(|| format!("expected '\"' to open label {name}'s value"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    // The format defines only the three escapes; keep others
                    // verbatim, as Prometheus itself does.
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err(format!("unterminated value of label {name}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {name}"));
        }
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    // Rust's float parser takes "inf"/"NaN" spellings too; the format's
    // "+Inf" needs the sign stripped.
    let s2 = s.strip_prefix('+').unwrap_or(s);
    s2.parse::<f64>().map_err(|_| format!("bad value {s:?}"))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(20) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `curl :8002/metrics` of `ferrite-server serve` (embedded demo model)
    /// after one inference, captured verbatim.
    const SERVER_METRICS: &str = include_str!("testdata/ferrite_server_metrics.txt");

    #[test]
    fn parses_real_server_output() {
        assert!(SERVER_METRICS.contains("ferrite_queue_depth{model=\"demo\"} 0"));
        assert_eq!(parse_load(SERVER_METRICS, "demo").unwrap(), PodLoad { queued: 0, inflight: 0, requests: 1 });
        // Another model: both families exist, no series -> idle, not an error.
        assert_eq!(parse_load(SERVER_METRICS, "other").unwrap(), PodLoad::default());
    }

    #[test]
    fn real_output_with_load() {
        let text = SERVER_METRICS
            .replace("ferrite_queue_depth{model=\"demo\"} 0", "ferrite_queue_depth{model=\"demo\"} 30")
            .replace("ferrite_inflight_requests{model=\"demo\"} 0", "ferrite_inflight_requests{model=\"demo\"} 7");
        assert_eq!(parse_load(&text, "demo").unwrap(), PodLoad { queued: 30, inflight: 7, requests: 1 });
    }

    #[test]
    fn sums_series_and_ignores_other_models_and_lookalikes() {
        let text = r#"# HELP ferrite_queue_depth Requests waiting
# TYPE ferrite_queue_depth gauge
ferrite_queue_depth{model="a",version="1"} 3
ferrite_queue_depth{version="2",model="a"} 4
ferrite_queue_depth{model="b"} 100
ferrite_queue_depth_total{model="a"} 1000
ferrite_queue_depth{model="ab"} 1000
ferrite_inflight_requests{ model = "a" , } 2 1712345678000
ferrite_inflight_requests{model="a"} 1.0e0
"#;
        assert_eq!(parse_load(text, "a").unwrap(), PodLoad { queued: 7, inflight: 3, ..PodLoad::default() });
        assert_eq!(parse_load(text, "b").unwrap(), PodLoad { queued: 100, inflight: 0, ..PodLoad::default() });
    }

    #[test]
    fn escaped_label_values() {
        let text = r#"ferrite_queue_depth{note="say \"hi\", {ok}",model="we\"ird\\name"} 5
ferrite_queue_depth{model="line\nbreak"} 6
ferrite_inflight_requests{model="we\"ird\\name",other="\\"} 1
"#;
        assert_eq!(
            parse_load(text, "we\"ird\\name").unwrap(),
            PodLoad { queued: 5, inflight: 1, ..PodLoad::default() }
        );
        assert_eq!(parse_load(text, "line\nbreak").unwrap(), PodLoad { queued: 6, inflight: 0, ..PodLoad::default() });
    }

    #[test]
    fn family_declared_without_samples_is_zero() {
        let text =
            "# HELP ferrite_queue_depth x\n# TYPE ferrite_queue_depth gauge\n# TYPE ferrite_inflight_requests gauge\n";
        assert_eq!(parse_load(text, "m").unwrap(), PodLoad::default());
    }

    #[test]
    fn missing_family_is_an_error() {
        let text = "# TYPE ferrite_queue_depth gauge\nferrite_queue_depth{model=\"m\"} 1\nsome_other_metric 1\n";
        assert!(matches!(parse_load(text, "m"), Err(ScrapeError::MissingFamily(INFLIGHT))));
        assert!(matches!(parse_load("", "m"), Err(ScrapeError::MissingFamily(QUEUE_DEPTH))));
        assert!(matches!(parse_load("<html>not metrics</html>", "m"), Err(ScrapeError::MissingFamily(QUEUE_DEPTH))));
    }

    #[test]
    fn malformed_samples_of_ours_are_errors() {
        let ok = "ferrite_inflight_requests{model=\"m\"} 0\n";
        for bad in [
            "ferrite_queue_depth{model=\"m\"}\n",
            "ferrite_queue_depth{model=\"m\" 1\n",
            "ferrite_queue_depth{model=\"m} 1\n",
            "ferrite_queue_depth{model=m} 1\n",
            "ferrite_queue_depth{model=\"m\"} one\n",
            "ferrite_queue_depth{model=\"m\"} 1 2 3\n",
            "ferrite_queue_depth{model=\"m\"} NaN\n",
            "ferrite_queue_depth{model=\"m\"} +Inf\n",
        ] {
            let text = format!("{bad}{ok}");
            match parse_load(&text, "m") {
                Err(ScrapeError::Parse { line: 1, .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Garbage in unrelated families is skipped.
        let text = format!("ferrite_queue_depth{{model=\"m\"}} 2\nweird{{{{ ??? \n# random comment\n{ok}");
        assert_eq!(parse_load(&text, "m").unwrap(), PodLoad { queued: 2, inflight: 0, ..PodLoad::default() });
        // NaN of another model does not matter.
        let text = format!("ferrite_queue_depth{{model=\"x\"}} NaN\n{ok}");
        assert_eq!(parse_load(&text, "m").unwrap(), PodLoad::default());
    }

    #[test]
    fn negative_gauges_read_as_zero_and_values_round() {
        let text = "ferrite_queue_depth{model=\"m\"} -3\nferrite_inflight_requests{model=\"m\"} 2.6\n";
        assert_eq!(parse_load(text, "m").unwrap(), PodLoad { queued: 0, inflight: 3, ..PodLoad::default() });
    }
}
