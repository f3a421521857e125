//! The API over a real socket: HTTPS with a certificate made from the scheduler's key, clients
//! pinning it; plain HTTP only on loopback; timing knobs checked at start.

use std::net::SocketAddr;

use proto::Keypair;
use scheduler::{Config, SchedulerConfig, StartError};

fn config(dir: &tempfile::TempDir, http: SocketAddr, plain_http: bool, state: Config) -> SchedulerConfig {
    SchedulerConfig {
        http,
        plain_http,
        renter_limits: None,
        quic: SocketAddr::from(([127, 0, 0, 1], 0)),
        keypair: Keypair::generate(),
        providers: None,
        db: dir.path().join("db"),
        state,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_https_pinned_to_the_scheduler_key_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let l = scheduler::start(config(&dir, loopback(), false, Config::default())).await.unwrap();
    assert!(l.tls && l.url().starts_with("https://"), "{}", l.url());
    let renter = Keypair::generate();

    // A client pinning another key never gets to send its request.
    let wrong = quic::https::pinned_client(Keypair::generate().public()).unwrap().build().unwrap();
    let err = wrong.get(format!("{}/v1/info", l.url())).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    // Plain HTTP to the HTTPS port gets no API answer.
    // (Clients come from `quic::https`, which brings its TLS provider: reqwest here has none.)
    let client = quic::https::pinned_client(l.key).unwrap().build().unwrap();
    let plain = client.get(format!("http://{}/v1/info", l.http)).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // The right pin, a signed upload and submission, a signed read of the job.
    let http = quic::https::pinned_client(l.key).unwrap().build().unwrap();
    let info: serde_json::Value = http.get(format!("{}/v1/info", l.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!((info["key"].as_str(), info["tls"].as_bool()), (Some(l.key.to_string().as_str()), Some(true)));
    let module = b"\0asm\x01\0\0\0".to_vec();
    let rb = http.post(format!("{}/v1/modules", l.url()));
    let resp = crate::sign_reqwest(rb, &renter, "POST", "/v1/modules", &module).body(module).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let uploaded: proto::api::ModuleUploaded = resp.json().await.unwrap();
    let body = serde_json::to_vec(&serde_json::json!({ "module": uploaded.module })).unwrap();
    let rb = http.post(format!("{}/v1/jobs", l.url())).header("content-type", "application/json");
    let resp = crate::sign_reqwest(rb, &renter, "POST", "/v1/jobs", &body).body(body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let submitted: proto::api::Submitted = resp.json().await.unwrap();
    let path = format!("/v1/jobs/{}", submitted.id);
    let rb = http.get(format!("{}{path}", l.url()));
    let resp = crate::sign_reqwest(rb, &renter, "GET", &path, b"").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Unsigned, the same read is refused.
    let resp = http.get(format!("{}{path}", l.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_is_served_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        scheduler::start(config(&dir, SocketAddr::from(([0, 0, 0, 0], 0)), true, Config::default())).await.unwrap_err();
    assert!(matches!(err, StartError::PlainHttp(_)), "{err}");
    assert!(err.to_string().contains("only on a loopback address"), "{err}");
    let l = scheduler::start(config(&dir, loopback(), true, Config::default())).await.unwrap();
    assert!(!l.tls && l.url().starts_with("http://"));
    let client = quic::https::pinned_client(l.key).unwrap().build().unwrap();
    let resp = client.get(format!("{}/v1/providers", l.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn a_provider_timeout_under_three_heartbeats_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = Config { heartbeat_interval_ms: 1_000, heartbeat_timeout_ms: 500, ..Config::default() };
    let err = scheduler::start(config(&dir, loopback(), false, state)).await.unwrap_err();
    assert!(err.to_string().contains("must be at least 3 heartbeat intervals"), "{err}");
}
