//! The HTTP API through the router: every request that creates or reads a renter's work is
//! signed; forged, stale, replayed, altered and unsigned requests are refused with the reason;
//! a job or session reads as not found to anyone but its renter; renters over their rate or
//! their job cap are told when to come back. Each refusal is followed by a request served.

use axum::Router;
use axum::http::StatusCode;
use proto::Keypair;
use proto::msg::{Price, hash_hex};
use scheduler::server::{TestOptions, test_router};
use scheduler::{Config, MemoryStore, RenterLimits, State};
use serde_json::Value;

use crate::{error_of, nonce, now_secs, send, signed, signed_as};

const WASM: &[u8] = b"\0asm\x01\0\0\0";

/// A router over a state with one provider (serving sessions) and one module; the module's hash.
fn app(config: Config, renter_limits: Option<RenterLimits>) -> (Router, String) {
    let mut state = State::load(config, Box::new(MemoryStore::default()), 0).unwrap();
    let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
    let provider = Keypair::generate().public();
    let addr = Some("127.0.0.1:9".to_string());
    state.register(provider, "p".into(), "eu".into(), vec![crate::gpu()], price, 1, addr, 4, 0).unwrap();
    let module = hash_hex(&state.put_module(WASM).unwrap());
    (test_router(state, TestOptions { renter_limits, ..TestOptions::default() }), module)
}

fn job_body(module: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "module": module, "input_base64": "aW4=" })).unwrap()
}

async fn submit(app: &Router, key: &Keypair, module: &str) -> String {
    let (status, _, body) = send(app, signed(key, "POST", "/v1/jobs", &job_body(module))).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn unsigned_forged_stale_replayed_and_altered_requests_get_401_with_the_reason() {
    let (app, module) = app(Config::default(), None);
    let renter = Keypair::generate();
    let id = submit(&app, &renter, &module).await;
    let path = format!("/v1/jobs/{id}");

    // Unsigned: refused, saying how to sign.
    let unsigned = axum::http::Request::builder().uri(&path).body(axum::body::Body::empty()).unwrap();
    let (status, headers, body) = send(&app, unsigned).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).contains("not signed: header x-wasmgrid-key is missing"), "{}", error_of(&body));
    assert!(headers.get("www-authenticate").is_some());

    // Forged: someone else's key named over the forger's signature.
    let forger = Keypair::generate();
    let mut forged = signed(&forger, "GET", &path, b"");
    forged.headers_mut().insert("x-wasmgrid-key", renter.public().to_string().parse().unwrap());
    let (status, _, body) = send(&app, forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).starts_with("bad signature"), "{}", error_of(&body));

    // Stale: signed two minutes ago.
    let stale = signed_as(&renter, "GET", &path, b"", b"", now_secs() - 120, nonce());
    let (status, _, body) = send(&app, stale).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).starts_with("stale timestamp"), "{}", error_of(&body));

    // Altered: the body changed after signing.
    let honest = job_body(&module);
    let mut altered = honest.clone();
    altered.extend_from_slice(b" ");
    let req = signed_as(&renter, "POST", "/v1/jobs", &honest, &altered, now_secs(), nonce());
    let (status, _, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).contains("changed after it was signed"), "{}", error_of(&body));

    // Replayed: the same signed request twice.
    let (ts, n) = (now_secs(), nonce());
    let (status, _, _) = send(&app, signed_as(&renter, "GET", &path, b"", b"", ts, n)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = send(&app, signed_as(&renter, "GET", &path, b"", b"", ts, n)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).starts_with("replayed nonce"), "{}", error_of(&body));

    // A path other than the one signed.
    let mut moved = signed(&renter, "GET", &path, b"");
    *moved.uri_mut() = format!("{path}/log").parse().unwrap();
    let (status, _, _) = send(&app, moved).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // And a good request is served.
    let (status, _, body) = send(&app, signed(&renter, "GET", &path, b"")).await;
    assert_eq!(status, StatusCode::OK);
    let view: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(view["renter"], renter.public().to_string());
}

#[tokio::test]
async fn a_job_or_session_reads_as_not_found_to_everyone_but_its_renter() {
    let (app, module) = app(Config::default(), None);
    let (owner, other) = (Keypair::generate(), Keypair::generate());
    let id = submit(&app, &owner, &module).await;
    assert!(id.starts_with("job-") && id.len() == 4 + 32, "{id}");
    let unknown = format!("job-{}", "0".repeat(32));
    for suffix in ["", "/output", "/log"] {
        let (status, _, theirs) = send(&app, signed(&other, "GET", &format!("/v1/jobs/{id}{suffix}"), b"")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{suffix}");
        let (_, _, none) = send(&app, signed(&other, "GET", &format!("/v1/jobs/{unknown}{suffix}"), b"")).await;
        assert_eq!(
            error_of(&theirs),
            error_of(&none).replace(&unknown, &id),
            "no different from a job that does not exist"
        );
    }
    let pay = br#"{"transaction":"AA=="}"#;
    let (status, _, _) = send(&app, signed(&other, "POST", &format!("/v1/jobs/{id}/payment"), pay)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Nobody else can cancel it, and trying says no more than for a job that does not exist.
    let cancel = |key: &Keypair, id: &str| signed(key, "POST", &format!("/v1/jobs/{id}/cancel"), b"{}");
    let (status, _, theirs) = send(&app, cancel(&other, &id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, _, none) = send(&app, cancel(&other, &unknown)).await;
    assert_eq!(error_of(&theirs), error_of(&none).replace(&unknown, &id));
    // The owner reads it (no output yet: it has not run).
    let (status, _, _) = send(&app, signed(&owner, "GET", &format!("/v1/jobs/{id}"), b"")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&app, signed(&owner, "GET", &format!("/v1/jobs/{id}/output"), b"")).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Sessions: granted to the signer only, read by it only.
    let open = |renter: &Keypair| {
        serde_json::to_vec(&serde_json::json!({ "module": module, "renter": renter.public() })).unwrap()
    };
    let (status, _, body) = send(&app, signed(&owner, "POST", "/v1/sessions", &open(&other))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("not the key that signed"), "{}", error_of(&body));
    let (status, _, body) = send(&app, signed(&owner, "POST", "/v1/sessions", &open(&owner))).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let grant: proto::api::SessionGrant = serde_json::from_slice(&body).unwrap();
    let sid: String = grant.ticket.session_id.iter().map(|b| format!("{b:02x}")).collect();
    let (status, _, _) = send(&app, signed(&other, "GET", &format!("/v1/sessions/{sid}"), b"")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = send(&app, signed(&owner, "GET", &format!("/v1/sessions/{sid}"), b"")).await;
    assert_eq!(status, StatusCode::OK);
    let record: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(record["renter"], owner.public().to_string());
}

#[tokio::test]
async fn a_renter_over_its_rate_gets_429_with_retry_after_and_others_are_served() {
    let limits = RenterLimits { requests_per_second: 1.0, burst: 2 };
    let (app, module) = app(Config::default(), Some(limits));
    let (busy, calm) = (Keypair::generate(), Keypair::generate());
    let id = submit(&app, &busy, &module).await;
    let path = format!("/v1/jobs/{id}");
    let (status, _, _) = send(&app, signed(&busy, "GET", &path, b"")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = send(&app, signed(&busy, "GET", &path, b"")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["retry_after_secs"], 1);
    assert!(v["error"].as_str().unwrap().contains("retry in 1 s"), "{v}");
    // Another renter is not held back, and public endpoints are not counted.
    submit(&app, &calm, &module).await;
    let public = axum::http::Request::builder().uri("/v1/providers").body(axum::body::Body::empty()).unwrap();
    assert_eq!(send(&app, public).await.0, StatusCode::OK);
    // After the wait it said, the busy renter is served again.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, _, _) = send(&app, signed(&busy, "GET", &path, b"")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_renter_at_its_job_cap_gets_429_and_others_are_served() {
    let (app, module) = app(Config { max_jobs_per_renter: 1, ..Config::default() }, None);
    let (renter, other) = (Keypair::generate(), Keypair::generate());
    let first = submit(&app, &renter, &module).await;
    let (status, headers, body) = send(&app, signed(&renter, "POST", "/v1/jobs", &job_body(&module))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers.get("retry-after").unwrap(), "5");
    let error = error_of(&body);
    assert!(error.contains("1 jobs queued or running") && error.contains("retry in 5 s"), "{error}");
    submit(&app, &other, &module).await;
    // Cancelling its job makes room: the next submission is taken. A second cancel of the
    // same job is a conflict that says the job already ended.
    let path = format!("/v1/jobs/{first}/cancel");
    let (status, _, body) = send(&app, signed(&renter, "POST", &path, b"{}")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let view: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((view["state"].as_str(), view["error"].as_str()), (Some("failed"), Some("cancelled by its renter")));
    let (status, _, body) = send(&app, signed(&renter, "POST", &path, b"{}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("already ended"), "{}", error_of(&body));
    submit(&app, &renter, &module).await;
}

#[tokio::test]
async fn public_endpoints_need_no_signature_and_the_openapi_document_describes_signing() {
    let (app, _) = app(Config::default(), None);
    for path in ["/v1/providers", "/v1/info", "/openapi.json"] {
        let req = axum::http::Request::builder().uri(path).body(axum::body::Body::empty()).unwrap();
        let (status, _, body) = send(&app, req).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let _: Value = serde_json::from_slice(&body).unwrap();
    }
    let req = axum::http::Request::builder().uri("/openapi.json").body(axum::body::Body::empty()).unwrap();
    let doc: Value = serde_json::from_slice(&send(&app, req).await.2).unwrap();
    let schemes = &doc["components"]["securitySchemes"];
    for header in proto::httpsig::HEADERS {
        assert!(schemes.to_string().contains(header), "{header} is not described: {schemes}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let public = ["/v1/providers", "/v1/info", "/openapi.json"].contains(&path.as_str());
            assert_eq!(op.get("security").is_some_and(|s| s == &serde_json::json!([])), public, "{method} {path}");
            if !public {
                for code in ["401", "429"] {
                    assert!(op["responses"].get(code).is_some(), "{method} {path} lacks {code}");
                }
            }
        }
    }
    assert_eq!(doc["security"], serde_json::json!([{ "renterSignature": [] }]));
}

#[tokio::test]
async fn cluster_plans_are_signed_checked_and_say_why_none_fits() {
    let (app, _) = app(Config::default(), None);
    let key = Keypair::generate();
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    // Unsigned: refused like every renter request.
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/plan")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body(serde_json::json!({ "gpus": 1 }))))
        .unwrap();
    let (status, _, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Not JSON, an unknown field, a size no job may have: 4xx with the reason.
    for (bad, why) in [
        (b"{not json".to_vec(), ""),
        (body(serde_json::json!({ "gpus": 1, "nodes": 2 })), "unknown field"),
        (body(serde_json::json!({ "gpus": 100000 })), "at most"),
        (body(serde_json::json!({ "gpus": 0 })), "at least one GPU"),
    ] {
        let (status, _, resp) = send(&app, signed(&key, "POST", "/v1/plan", &bad)).await;
        assert!(status.is_client_error(), "{status}");
        assert!(error_of(&resp).contains(why), "{}", error_of(&resp));
    }
    // More than there is: 409, why, with counts.
    let (status, _, resp) = send(&app, signed(&key, "POST", "/v1/plan", &body(serde_json::json!({ "gpus": 2 })))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let no: proto::api::NoPlan = serde_json::from_slice(&resp).unwrap();
    assert_eq!(no.error, "2 GPUs wanted: 1 free that fit, on 1 provider(s)");
    assert_eq!((no.no_match.total, no.no_match.matching), (1, 1));
    // And the one that fits is planned right after.
    let (status, _, resp) = send(&app, signed(&key, "POST", "/v1/plan", &body(serde_json::json!({ "gpus": 1 })))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let plan: proto::api::GangPlan = serde_json::from_slice(&resp).unwrap();
    assert_eq!((plan.members.len(), plan.slowest_link_ms, plan.price_per_second), (1, Some(0), 1));
}

#[tokio::test]
async fn hostile_cluster_submissions_get_4xx_with_the_reason_and_members_read_only_to_their_renter() {
    // Two providers; a renter's cluster of two already placed on them.
    let mut state = State::load(Config::default(), Box::new(MemoryStore::default()), 0).unwrap();
    let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
    for (name, addr) in [("a", "10.0.0.1:7000"), ("b", "10.0.0.2:7000")] {
        let key = Keypair::generate().public();
        // Each takes its peers' connections (a session endpoint): a cluster may span both.
        let addr = Some(addr.to_string());
        state.register(key, name.into(), "eu".into(), vec![crate::gpu()], price, 1, addr, 1, 0).unwrap();
    }
    let module = hash_hex(&state.put_module(WASM).unwrap());
    let (owner, other) = (Keypair::generate(), Keypair::generate());
    let scheduler_key = Keypair::generate();
    state.set_signer(std::sync::Arc::new(Keypair::from_seed(scheduler_key.seed())));
    let two = Some(proto::api::ClusterRequest { gpus: 2, ..Default::default() });
    let reqs = proto::msg::Requirements::default();
    let id = state.submit_job(owner.public(), &module, vec![], reqs, Default::default(), None, two, 0).unwrap().id;
    let placed = state.assign(1).unwrap();
    assert_eq!(placed.len(), 2);
    let app = test_router(state, TestOptions { keypair: Some(scheduler_key), ..TestOptions::default() });

    let body =
        |cluster: Value| serde_json::to_vec(&serde_json::json!({ "module": module, "cluster": cluster })).unwrap();
    for (bad, code, why) in [
        (body(serde_json::json!({ "gpus": 0 })), 400, "at least 2 GPUs"),
        (body(serde_json::json!({ "gpus": 100000 })), 400, "at most 64 members"),
        (body(serde_json::json!({ "gpus": 1, "nodes": 4 })), 422, "unknown field"),
        (body(serde_json::json!({ "gpus": -1 })), 422, "gpus"),
        (body(serde_json::json!({ "gpus": 2, "max_link_rtt_ms": "fast" })), 422, "max_link_rtt_ms"),
        (body(serde_json::json!("four")), 422, ""),
        (
            serde_json::to_vec(&serde_json::json!({
                "module": module, "requirements": { "gpu_count": 2 }, "cluster": { "gpus": 2 }
            }))
            .unwrap(),
            400,
            "cluster.gpus",
        ),
    ] {
        let (status, _, resp) = send(&app, signed(&owner, "POST", "/v1/jobs", &bad)).await;
        assert_eq!(status.as_u16(), code, "{}", String::from_utf8_lossy(&bad));
        assert!(error_of(&resp).contains(why), "{}", error_of(&resp));
    }
    // A good one right after: queued, saying with counts why no gang fits now (both busy).
    let (status, _, resp) =
        send(&app, signed(&owner, "POST", "/v1/jobs", &body(serde_json::json!({ "gpus": 2 })))).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp));
    let queued: proto::api::Submitted = serde_json::from_slice(&resp).unwrap();
    let why = queued.no_match.unwrap();
    assert_eq!(why.summary, "2 GPUs wanted: 0 free that fit, on 0 provider(s) (busy: 2)");
    let (status, _, resp) = send(&app, signed(&owner, "GET", &format!("/v1/jobs/{}", queued.id), b"")).await;
    assert_eq!(status, StatusCode::OK);
    let view: proto::api::JobView = serde_json::from_slice(&resp).unwrap();
    assert_eq!((view.state, view.no_match.map(|n| n.summary)), (proto::api::JobState::Queued, Some(why.summary)));
    assert_eq!(view.cluster.map(|c| (c.request.gpus, c.tries)), Some((2, 0)));

    // The placed cluster and each member: the owner's, 404 to anyone else.
    let (status, _, resp) = send(&app, signed(&owner, "GET", &format!("/v1/jobs/{id}"), b"")).await;
    assert_eq!(status, StatusCode::OK);
    let view: proto::api::JobView = serde_json::from_slice(&resp).unwrap();
    let members = view.cluster.unwrap().members;
    assert_eq!(
        members.iter().map(|m| m.job_id.clone()).collect::<Vec<_>>(),
        vec![scheduler::state::member_id(&id, 1, 0), scheduler::state::member_id(&id, 1, 1)]
    );
    for m in &members {
        let path = format!("/v1/jobs/{}", m.job_id);
        let (status, _, resp) = send(&app, signed(&owner, "GET", &path, b"")).await;
        assert_eq!(status, StatusCode::OK);
        let child: proto::api::JobView = serde_json::from_slice(&resp).unwrap();
        assert_eq!(child.member_of.as_deref(), Some(id.as_str()));
    }
    let unknown = format!("job-{}", "0".repeat(32));
    for target in [id.clone(), members[0].job_id.clone(), members[1].job_id.clone()] {
        for suffix in ["", "/output", "/log"] {
            let (status, _, theirs) =
                send(&app, signed(&other, "GET", &format!("/v1/jobs/{target}{suffix}"), b"")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{target}{suffix}");
            let (_, _, none) = send(&app, signed(&other, "GET", &format!("/v1/jobs/{unknown}{suffix}"), b"")).await;
            assert_eq!(error_of(&theirs), error_of(&none).replace(&unknown, &target));
        }
    }
}
