//! The activator (`ferrite-operator activator`, the built binary) against a
//! real API server and a real ferrite-server: requests for a ModelDeployment
//! with no ready pod are held - HTTP KServe v2, OpenAI SSE streaming, h2c,
//! gRPC unary and bidirectional streaming - the held gauge shows them, and
//! once the test (playing kubelet) marks a pod Ready at the server's address,
//! every one of them is answered by the server. Beyond `--max-held`: 429 /
//! RESOURCE_EXHAUSTED; a short `grpc-timeout`: DEADLINE_EXCEEDED; an unknown
//! model: 404 / NOT_FOUND (also for a held request whose ModelDeployment is
//! deleted); a stale ready pod that refuses connections: the request goes to
//! another ready pod; SIGTERM: unready, and a held request is still forwarded
//! during the drain.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrite_operator::resources::INSTANCE_LABEL;
use ferrite_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ferrite_proto::inference::model_infer_request::InferInputTensor;
use ferrite_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::json;
use support::{create, eventually, free_port, make_ready, model_deployment, repo_root, setup};
use tonic::transport::{Channel, Endpoint};

/// The ModelDeployment every request is for.
const MD: &str = "zero";
/// The tensor model and the LLM the server behind it serves.
const TENSOR_MODEL: &str = "add_sub";
const LLM: &str = "smollm";
/// Held at once: one of each kind, and a burst of plain HTTP requests.
const BURST: usize = 100;
const MAX_HELD: usize = 6 + BURST;

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1" | "yes"))
}

/// What the server needs (binary, ONNX Runtime, Python for the test
/// models, the SmolLM2 directory); `None`, said loudly, when something is
/// missing outside CI.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    let root = repo_root();
    let ort =
        std::env::var("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or(root.join(".cache/onnxruntime/libonnxruntime.so"));
    let llm = root.join(".cache/models/smollm2-135m-instruct-int4");
    let needed = [
        (root.join(".venv/bin/python"), "make venv"),
        (root.join("target/debug/ferrite-server"), "make build"),
        (ort.clone(), "make ort"),
        (llm.clone(), "make models"),
    ];
    for (path, how) in needed {
        if !path.exists() {
            let message = format!("{} is missing: run `{how}`", path.display());
            assert!(!in_ci(), "CI=true: {message}");
            eprintln!("\n!!!!!!!! SKIPPED, NOT PASSED: {message} !!!!!!!!\n");
            return None;
        }
    }
    Some((ort, llm))
}

/// A repository with the add_sub model only.
fn model_repository() -> PathBuf {
    let root = repo_root();
    let all = std::env::temp_dir().join(format!("ferrite-activator-models-{}", std::process::id()));
    let status = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/make_test_models.py"))
        .arg(&all)
        .stdout(Stdio::null())
        .status()
        .expect("run make_test_models.py");
    assert!(status.success(), "make_test_models.py failed");
    let repo = all.join("only-add-sub");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::rename(all.join(TENSOR_MODEL), repo.join(TENSOR_MODEL)).unwrap();
    repo
}

/// The ports of one process.
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    grpc: u16,
    metrics: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports { http: free_port(), grpc: free_port(), metrics: free_port() }
    }
}

fn start_server(ports: Ports, repo: &Path, ort: &Path, llm: &Path) -> Process {
    let log = std::fs::File::create(std::env::temp_dir().join("ferrite-activator-test-server.log")).unwrap();
    let child = Command::new(repo_root().join("target/debug/ferrite-server"))
        .args(["serve", "--host", "127.0.0.1"])
        .args(["--http-port", &ports.http.to_string(), "--grpc-port", &ports.grpc.to_string()])
        .args(["--metrics-port", &ports.metrics.to_string()])
        .arg("--model-repository")
        .arg(repo)
        .arg("--model")
        .arg(format!("{LLM}={}", llm.display()))
        .env("ORT_DYLIB_PATH", ort)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrite-server");
    Process(child)
}

fn start_activator(kubeconfig: &Path, ns: &str, own: Ports, pod: Ports, log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ferrite-operator"))
        .args(["--log-format", "text", "activator", "--host", "127.0.0.1"])
        .args(["--http-port", &own.http.to_string(), "--grpc-port", &own.grpc.to_string()])
        .args(["--metrics-port", &own.metrics.to_string()])
        .args(["--pod-http-port", &pod.http.to_string(), "--pod-grpc-port", &pod.grpc.to_string()])
        .args(["--max-held", &MAX_HELD.to_string(), "--hold-timeout-seconds", "60"])
        .args(["--namespace", ns, "--shutdown-delay-seconds", "0"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrite-operator activator");
    Process(child)
}

/// A sample of the activator's `/metrics`: the value of `metric` for the
/// ModelDeployment.
async fn metric(ports: Ports, metric: &str, ns: &str) -> Option<f64> {
    metric_of(ports, metric, ns, MD).await
}

/// The value of `metric` for ModelDeployment `ns/name`.
async fn metric_of(ports: Ports, metric: &str, ns: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", ports.metrics)).await.ok()?.text().await.ok()?;
    let series = format!("{metric}{{name=\"{name}\",namespace=\"{ns}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&series)).and_then(|v| v.trim().parse().ok())
}

const A: [f32; 16] = [1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15., 16.];
const B: [f32; 16] = [0.5; 16];

fn kserve_request() -> serde_json::Value {
    json!({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": A},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": B},
    ]})
}

/// Checks a KServe v2 JSON answer of add_sub.
fn check_kserve_answer(what: &str, status: reqwest::StatusCode, body: &str) {
    assert_eq!(status, 200, "{what}: {body}");
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    let sum = body["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "OUTPUT0").unwrap();
    let expected: Vec<f64> = A.iter().zip(B).map(|(a, b)| f64::from(a + b)).collect();
    let got: Vec<f64> = sum["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got, expected, "{what}");
}

fn grpc_request(id: &str) -> ModelInferRequest {
    let input = |name: &str, values: &[f32]| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        contents: Some(InferTensorContents { fp32_contents: values.to_vec(), ..Default::default() }),
        ..Default::default()
    };
    ModelInferRequest {
        model_name: TENSOR_MODEL.into(),
        id: id.into(),
        inputs: vec![input("INPUT0", &A), input("INPUT1", &B)],
        ..Default::default()
    }
}

/// OUTPUT0 (INPUT0 + INPUT1) of a gRPC answer, raw or typed.
fn check_grpc_answer(what: &str, response: &ModelInferResponse) {
    let index = response.outputs.iter().position(|o| o.name == "OUTPUT0").expect("OUTPUT0");
    let got: Vec<f32> = match response.raw_output_contents.get(index) {
        Some(raw) => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        None => response.outputs[index].contents.as_ref().unwrap().fp32_contents.clone(),
    };
    let expected: Vec<f32> = A.iter().zip(B).map(|(a, b)| a + b).collect();
    assert_eq!(got, expected, "{what}");
}

/// A gRPC channel to the activator that names `authority` as `:authority`.
async fn channel(ports: Ports, authority: &str) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{}", ports.grpc))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .expect("connect to the activator's gRPC port")
}

/// A gRPC ModelInfer call over a plain h2c connection to the activator,
/// with `:authority` and `grpc-timeout` as given: its `grpc-status` and
/// `grpc-message` (a trailers-only answer: in the headers).
async fn raw_grpc_infer(ports: Ports, authority: &str, timeout: &str) -> (String, String) {
    use http_body_util::{BodyExt, Full};
    use prost::Message;

    let socket = tokio::net::TcpStream::connect(("127.0.0.1", ports.grpc)).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(socket),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let message = grpc_request("raw").encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let request = hyper::Request::post(format!("http://{authority}/inference.GRPCInferenceService/ModelInfer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200, "gRPC answers are HTTP 200");
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let (code, message) = (header("grpc-status"), header("grpc-message"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "trailers-only: no message");
    (code.expect("grpc-status in the headers"), message.unwrap_or_default())
}

fn pod_object(name: &str) -> Pod {
    pod_of(MD, name)
}

/// A pod of ModelDeployment `model`.
fn pod_of(model: &str, name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {INSTANCE_LABEL: model}},
        "spec": {"containers": [{"name": "server", "image": "ferrite-server:test"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn holds_requests_until_a_pod_is_ready_then_forwards_every_kind() {
    let Some((plane, client, ns)) = setup("activator").await else { return };
    let Some((ort, llm)) = prerequisites() else { return };
    let started = Instant::now();
    // The "pod": a real server on loopback, loading while the test goes on.
    let server_ports = Ports::free();
    let _server = start_server(server_ports, &model_repository(), &ort, &llm);

    let md = create(&client, &ns, &model_deployment(MD, json!({"model": {"uri": "s3://models/add_sub.onnx"}}))).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": MD, "labels": {INSTANCE_LABEL: MD}},
        "spec": {"ports": [
            {"name": "http", "port": 8000}, {"name": "grpc", "port": 8001}, {"name": "metrics", "port": 8002},
        ]},
    }))
    .unwrap();
    let service = services.create(&PostParams::default(), &service).await.expect("create the Service");
    let cluster_ip = service.spec.unwrap().cluster_ip.expect("the API server gives the Service a ClusterIP");
    assert!(md.metadata.uid.is_some());

    let own = Ports::free();
    let log_path = std::env::temp_dir().join(format!("ferrite-activator-{ns}.log"));
    let mut activator = start_activator(&plane.kubeconfig, &ns, own, server_ports, &log_path);
    let readyz = format!("http://127.0.0.1:{}/readyz", own.metrics);
    eventually("the activator is ready", Duration::from_secs(30), || async {
        let status = reqwest::get(&readyz).await.ok()?.status();
        status.is_success().then_some(())
    })
    .await;

    let http = reqwest::Client::new();
    let infer_url = format!("http://127.0.0.1:{}/v2/models/{TENSOR_MODEL}/infer", own.http);

    // Unknown models: 404 / NOT_FOUND, with a reason.
    let unknown = http
        .post(&infer_url)
        .header("host", format!("nope.{ns}"))
        .header("content-type", "application/json")
        .body(kserve_request().to_string())
        .send()
        .await;
    let unknown = unknown.unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().await.unwrap().contains("no ModelDeployment matches"));
    let mut nope = GrpcInferenceServiceClient::new(channel(own, "nope.elsewhere:8001").await);
    let status = nope.model_infer(grpc_request("nope")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // A short grpc-timeout: held, then DEADLINE_EXCEEDED from the activator
    // (a raw h2c call: tonic's channel would give up on its own at the same
    // moment and hide the activator's answer).
    let mut grpc = GrpcInferenceServiceClient::new(channel(own, &format!("{MD}.{ns}.svc:8001")).await);
    let asked = Instant::now();
    let (code, message) = raw_grpc_infer(own, &format!("{MD}.{ns}.svc:8001"), "700m").await;
    let waited = asked.elapsed();
    assert_eq!(code, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(message.contains("became ready within"), "the activator's answer: {message}");
    assert!(waited >= Duration::from_millis(650) && waited < Duration::from_secs(5), "{waited:?}");

    // A ModelDeployment deleted while a request waits for it: 404 at once.
    let doomed = model_deployment("doomed", json!({"model": {"uri": "s3://models/x.onnx"}}));
    create(&client, &ns, &doomed).await;
    let waiting = tokio::spawn({
        let (http, url, host) = (http.clone(), infer_url.clone(), format!("doomed.{ns}"));
        async move {
            let body = kserve_request().to_string();
            let response = http.post(url).header("host", host).header("content-type", "application/json").body(body);
            let response = response.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    });
    eventually("the request for doomed is held", Duration::from_secs(10), || async {
        (metric_of(own, "ferrite_activator_held_requests", &ns, "doomed").await? == 1.0).then_some(())
    })
    .await;
    let models: Api<ferrite_operator::crd::ModelDeployment> = Api::namespaced(client.clone(), &ns);
    models.delete("doomed", &Default::default()).await.expect("delete doomed");
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("answered").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("was deleted"), "{body}");

    // MAX_HELD requests of every kind, held while no pod is ready.
    let mut held = tokio::task::JoinSet::new();
    {
        let (http, url, host) = (http.clone(), infer_url.clone(), format!("{MD}.{ns}.svc.cluster.local:8000"));
        held.spawn(async move {
            let response = http
                .post(url)
                .header("host", host)
                .header("content-type", "application/json")
                .body(kserve_request().to_string())
                .send()
                .await
                .unwrap();
            let status = response.status();
            check_kserve_answer("HTTP/1.1 KServe v2", status, &response.text().await.unwrap());
            "http"
        });
    }
    {
        let (http, url, host) = (http.clone(), infer_url.clone(), format!("{cluster_ip}:8000"));
        held.spawn(async move {
            let response = http
                .post(url)
                .header("host", host)
                .header("content-type", "application/json")
                .body(kserve_request().to_string())
                .send()
                .await
                .unwrap();
            let status = response.status();
            check_kserve_answer("by ClusterIP", status, &response.text().await.unwrap());
            "cluster-ip"
        });
    }
    {
        // h2c on the HTTP port, with the name in :authority.
        let name = format!("{MD}.{ns}.svc.cluster.local");
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .resolve(&name, format!("127.0.0.1:{}", own.http).parse().unwrap())
            .build()
            .unwrap();
        let url = format!("http://{name}:{}/v2/models/{TENSOR_MODEL}/infer", own.http);
        held.spawn(async move {
            let response = h2
                .post(url)
                .header("content-type", "application/json")
                .body(kserve_request().to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            let status = response.status();
            check_kserve_answer("h2c KServe v2", status, &response.text().await.unwrap());
            "h2c"
        });
    }
    {
        let (http, url) = (http.clone(), format!("http://127.0.0.1:{}/v1/chat/completions", own.http));
        held.spawn(async move {
            let body = json!({"model": LLM, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4, "stream": true});
            let response = http
                .post(url)
                .header("host", MD)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
            assert!(content_type.starts_with("text/event-stream"), "{content_type}");
            let text = response.text().await.unwrap();
            let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
            assert!(events.len() >= 3, "several SSE chunks: {text}");
            let first: serde_json::Value = serde_json::from_str(events[0]).unwrap();
            assert_eq!(first["object"], "chat.completion.chunk");
            "sse"
        });
    }
    {
        let mut grpc = grpc.clone();
        held.spawn(async move {
            let response = grpc.model_infer(grpc_request("unary")).await.expect("gRPC ModelInfer");
            check_grpc_answer("gRPC unary", response.get_ref());
            "grpc-unary"
        });
    }
    {
        // Bidirectional streaming: the call is held as a whole, then all
        // three messages go through.
        let mut grpc = grpc.clone();
        held.spawn(async move {
            let requests = futures::stream::iter((0..3).map(|i| grpc_request(&format!("stream-{i}"))));
            let mut stream = grpc.model_stream_infer(requests).await.expect("ModelStreamInfer").into_inner();
            let mut responses = 0;
            while let Some(message) = stream.message().await.expect("stream message") {
                assert!(message.error_message.is_empty(), "{}", message.error_message);
                check_grpc_answer("gRPC stream", message.infer_response.as_ref().expect("a response"));
                responses += 1;
            }
            assert_eq!(responses, 3);
            "grpc-stream"
        });
    }
    for _ in 0..BURST {
        let (http, url, host) = (http.clone(), infer_url.clone(), format!("{MD}.{ns}"));
        held.spawn(async move {
            let body = kserve_request().to_string();
            let response = http.post(url).header("host", host).header("content-type", "application/json").body(body);
            let response = response.send().await.unwrap();
            let status = response.status();
            check_kserve_answer("burst", status, &response.text().await.unwrap());
            "burst"
        });
    }
    assert_eq!(held.len(), MAX_HELD);
    eventually("the held gauge shows every held request", Duration::from_secs(10), || async {
        (metric(own, "ferrite_activator_held_requests", &ns).await? == MAX_HELD as f64).then_some(())
    })
    .await;

    // Full: the next ones are refused at once.
    let full = http
        .post(&infer_url)
        .header("host", format!("{MD}.{ns}"))
        .header("content-type", "application/json")
        .body(kserve_request().to_string())
        .send()
        .await;
    let full = full.unwrap();
    assert_eq!(full.status(), 429);
    assert!(full.text().await.unwrap().contains("--max-held"));
    let status = grpc.model_infer(grpc_request("full")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.try_join_next().is_none(), "nothing is answered while no pod is ready");

    // Play kubelet: a pod of the ModelDeployment, Ready at the server's
    // address once the server serves.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod_object("zero-1")).await.expect("create pod");
    let server_ready = format!("http://127.0.0.1:{}/v2/health/ready", server_ports.http);
    eventually("the server is ready", Duration::from_secs(60), || async {
        reqwest::get(&server_ready).await.ok()?.status().is_success().then_some(())
    })
    .await;
    let marked_ready = Instant::now();
    make_ready(&pods, "zero-1", "127.0.0.1").await;

    let mut answered = Vec::new();
    let all = async {
        while let Some(done) = held.join_next().await {
            answered.push(done.expect("a held request was answered correctly"));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all).await.expect("held requests answered after the pod is ready");
    answered.sort();
    assert_eq!(answered.iter().filter(|kind| **kind == "burst").count(), BURST);
    answered.retain(|kind| *kind != "burst");
    assert_eq!(answered, ["cluster-ip", "grpc-stream", "grpc-unary", "h2c", "http", "sse"]);
    let released_after = marked_ready.elapsed();
    eprintln!("all {MAX_HELD} held requests answered {released_after:?} after the pod was marked Ready");
    assert_eq!(metric(own, "ferrite_activator_held_requests", &ns).await, Some(0.0));

    // With a ready pod: forwarded at once, never held.
    let response = grpc.model_infer(grpc_request("at-once")).await.expect("gRPC ModelInfer");
    check_grpc_answer("gRPC at once", response.get_ref());
    let response = http
        .post(&infer_url)
        .header("host", MD)
        .header("content-type", "application/json")
        .body(kserve_request().to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    check_kserve_answer("forwarded at once", status, &response.text().await.unwrap());

    // A stale ready pod (nothing listens at its address): requests that
    // pick it go to the other ready pod instead.
    pods.create(&PostParams::default(), &pod_object("zero-stale")).await.expect("create pod");
    make_ready(&pods, "zero-stale", "127.0.0.2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..4 {
        let response = http
            .post(&infer_url)
            .header("host", MD)
            .header("content-type", "application/json")
            .body(kserve_request().to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        check_kserve_answer(&format!("with a stale pod, request {i}"), status, &response.text().await.unwrap());
    }

    // Every request for the ModelDeployment counted: 1 deadline, MAX_HELD
    // held, 2 refused as full, 2 at once, 4 with a stale pod.
    let expected = (1 + MAX_HELD + 2 + 2 + 4) as f64;
    assert_eq!(metric(own, "ferrite_activator_requests_total", &ns).await, Some(expected));

    // SIGTERM while a request is held: not ready any more, but the held
    // request still counts in /metrics, and is forwarded when a pod becomes
    // Ready during the drain. Then it exits (waited for without blocking
    // this runtime, whose clients must answer the HTTP/2 GOAWAY handshake).
    create(&client, &ns, &model_deployment("late", json!({"model": {"uri": "s3://models/add_sub.onnx"}}))).await;
    let late = tokio::spawn({
        let (http, url, host) = (http.clone(), infer_url.clone(), format!("late.{ns}"));
        async move {
            let body = kserve_request().to_string();
            let response = http.post(url).header("host", host).header("content-type", "application/json").body(body);
            let response = response.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    });
    eventually("the request for late is held", Duration::from_secs(10), || async {
        (metric_of(own, "ferrite_activator_held_requests", &ns, "late").await? == 1.0).then_some(())
    })
    .await;
    let _ = Command::new("kill").args(["-TERM", &activator.0.id().to_string()]).status();
    eventually("the activator is not ready after SIGTERM", Duration::from_secs(10), || async {
        (reqwest::get(&readyz).await.ok()?.status() == 503).then_some(())
    })
    .await;
    assert_eq!(metric_of(own, "ferrite_activator_held_requests", &ns, "late").await, Some(1.0));
    pods.create(&PostParams::default(), &pod_of("late", "late-1")).await.expect("create pod");
    make_ready(&pods, "late-1", "127.0.0.1").await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), late).await.expect("answered").unwrap();
    check_kserve_answer("held across SIGTERM", status, &body);
    let exit = eventually("the activator exits on SIGTERM", Duration::from_secs(15), || {
        let exit = activator.0.try_wait().unwrap();
        async move { exit }
    })
    .await;
    assert!(exit.success(), "the activator exits cleanly on SIGTERM: {exit:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("hold started").count(), 3 + MAX_HELD, "{log}");
    assert_eq!(log.matches("hold released: ModelDeployment deleted").count(), 1, "{log}");
    assert_eq!(log.matches("hold released: pod ready, forwarding").count(), MAX_HELD + 1, "{log}");
    assert_eq!(log.matches("hold released: deadline passed").count(), 1, "{log}");
    assert!(log.contains("wait_ms="), "{log}");
    assert!(log.contains("trying another ready pod"), "{log}");
    assert!(!log.contains("INPUT0") && !log.contains("\"messages\""), "no request bodies in the log");
    eprintln!("activator test took {:?}", started.elapsed());
}
