//! Hostile callers of the shop's auth service: brute-forced logins,
//! hashing floods, registration floods, and signing keys that rotate under
//! them. (Message bounds and gzip bombs against a mesh server are
//! mesh-client's own tests: `crates/mesh-client/tests/message_limits.rs`.)

mod common;

use common::{Proc, free_addr, wait_serving};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_logins_hit_the_limit_while_another_caller_still_logs_in() {
    use shop_api::auth::v1::{
        LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("sqlite://{}", dir.path().join("auth.db").display());
    let _auth = Proc::spawn("auth", addr, &["--database-url".into(), url]);
    wait_serving(addr).await;
    let from = |ip: &str| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .local_address(Some(ip.parse().unwrap()))
            .connect_lazy()
    };
    let mut attacker = AuthServiceClient::new(from("127.0.0.1"));
    let mut owner = AuthServiceClient::new(from("127.0.0.2"));
    attacker
        .register(RegisterRequest {
            username: "victim".into(),
            password: "the-real-password".into(),
        })
        .await
        .unwrap();
    let login = |password: &str| LoginRequest {
        username: "victim".into(),
        password: password.into(),
    };
    let mut limited = None;
    for attempt in 0..10 {
        match attacker.login(login(&format!("guess-{attempt}"))).await {
            Err(s) if s.code() == Code::Unauthenticated => continue,
            Err(s) if s.code() == Code::ResourceExhausted => {
                limited = Some((attempt, s));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (attempt, status) = limited.expect("the limit was never hit");
    assert_eq!(
        attempt, 5,
        "five failures are allowed per account and caller"
    );
    assert!(
        status.message().contains("retry in"),
        "{}",
        status.message()
    );
    assert!(
        status.metadata().get("retry-after").is_some(),
        "a retry hint"
    );
    // Even the right password is refused from the limited caller...
    let err = attacker
        .login(login("the-real-password"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // ...while the owner, calling from elsewhere, gets in.
    owner
        .login(login("the-real-password"))
        .await
        .expect("another caller is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_old_tokens_verify_until_they_expire() {
    use shop_api::auth::v1::{
        GetPublicKeysRequest, LoginRequest, RegisterRequest, VerifyTokenRequest,
        auth_service_client::AuthServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("sqlite://{}", dir.path().join("auth.db").display());
    let _auth = Proc::spawn(
        "auth",
        addr,
        &[
            "--database-url".into(),
            url,
            "--signing-key-max-age-secs".into(),
            "2".into(),
        ],
    );
    wait_serving(addr).await;
    let mut auth = AuthServiceClient::new(common::channel(addr).await);
    auth.register(RegisterRequest {
        username: "rot".into(),
        password: "rotation-pass".into(),
    })
    .await
    .unwrap();
    let login = || LoginRequest {
        username: "rot".into(),
        password: "rotation-pass".into(),
    };
    let kid = |token: &str| {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&json).unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let old = auth.login(login()).await.unwrap().into_inner().access_token;
    let start = tokio::time::Instant::now();
    let new = loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let token = auth.login(login()).await.unwrap().into_inner().access_token;
        if kid(&token) != kid(&old) {
            break token;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the key never rotated"
        );
    };
    let published: Vec<String> = auth
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert!(
        published.contains(&kid(&old)) && published.contains(&kid(&new)),
        "old and new published: {published:?}"
    );
    for token in [old, new] {
        auth.verify_token(VerifyTokenRequest { token })
            .await
            .expect("tokens of both keys verify");
    }
}

/// An auth process on a fresh SQLite database with `extra` flags.
async fn auth_with(dir: &std::path::Path, extra: &[&str]) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let mut args = vec![
        "--database-url".to_string(),
        format!("sqlite://{}", dir.join("auth.db").display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = Proc::spawn("auth", addr, &args);
    wait_serving(addr).await;
    (proc, addr)
}

/// An auth client whose connection comes from loopback address `ip`, a
/// distinct end client for auth's limits.
fn auth_from(
    addr: std::net::SocketAddr,
    ip: &str,
) -> shop_api::auth::v1::auth_service_client::AuthServiceClient<tonic::transport::Channel> {
    shop_api::auth::v1::auth_service_client::AuthServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .local_address(Some(ip.parse().unwrap()))
            .connect_lazy(),
    )
}

/// Whether `status` is auth's refusal for being at its hashing bound, with
/// a retry hint.
fn busy_hashing(status: &tonic::Status) -> bool {
    let busy =
        status.code() == Code::ResourceExhausted && status.message().contains("passwords at once");
    if busy {
        assert!(
            status.metadata().get("retry-after").is_some(),
            "a retry hint: {status:?}"
        );
    }
    busy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_and_registrations_beyond_the_hashing_bound_are_refused_at_once() {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    let dir = tempfile::tempdir().unwrap();
    let (_auth, addr) = auth_with(dir.path(), &["--max-concurrent-hashes", "1"]).await;
    auth_from(addr, "127.0.0.1")
        .register(RegisterRequest {
            username: "keeper".into(),
            password: "keeper-password".into(),
        })
        .await
        .expect("one registration alone is hashed");
    let (mut busy_registers, mut busy_logins) = (0, 0);
    // Each round from a new client, so the per-client limits stay out of
    // the way; a round is enough unless the machine runs the calls one by
    // one, hence a few.
    for round in 0..5u32 {
        let client = auth_from(addr, &format!("127.0.0.{}", 10 + round));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..12 {
            let mut c = client.clone();
            calls.spawn(async move {
                let r = c
                    .register(RegisterRequest {
                        username: format!("r{round}x{i}"),
                        password: "a-fine-password".into(),
                    })
                    .await;
                (true, r.map(drop))
            });
            let mut c = client.clone();
            calls.spawn(async move {
                let r = c
                    .login(LoginRequest {
                        username: format!("nobody{round}x{i}"),
                        password: "a-wrong-password".into(),
                    })
                    .await;
                (false, r.map(drop))
            });
        }
        while let Some(done) = calls.join_next().await {
            match done.unwrap() {
                (_, Ok(())) => {}
                (false, Err(s)) if s.code() == Code::Unauthenticated => {}
                (register, Err(s)) if busy_hashing(&s) => {
                    if register {
                        busy_registers += 1
                    } else {
                        busy_logins += 1
                    }
                }
                (_, Err(s)) => panic!("unexpected {s:?}"),
            }
        }
        if busy_registers > 0 && busy_logins > 0 {
            break;
        }
    }
    assert!(
        busy_registers > 0 && busy_logins > 0,
        "over the bound some calls are refused: {busy_registers} registrations, {busy_logins} logins"
    );
    // Auth is alive and serving: the owner logs in (retrying a busy answer).
    let mut owner = auth_from(addr, "127.0.0.2");
    for attempt in 0.. {
        match owner
            .login(LoginRequest {
                username: "keeper".into(),
                password: "keeper-password".into(),
            })
            .await
        {
            Ok(_) => break,
            Err(s) if busy_hashing(&s) && attempt < 50 => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(s) => panic!("auth stopped serving: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_guesses_beyond_the_limit_are_refused() {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    let dir = tempfile::tempdir().unwrap();
    // Enough hashes at once that no guess is refused for that.
    let (_auth, addr) = auth_with(dir.path(), &["--max-concurrent-hashes", "64"]).await;
    let attacker = auth_from(addr, "127.0.0.1");
    attacker
        .clone()
        .register(RegisterRequest {
            username: "victim".into(),
            password: "the-real-password".into(),
        })
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut c = attacker.clone();
        calls.spawn(async move {
            c.login(LoginRequest {
                username: "victim".into(),
                password: format!("guess-{i}"),
            })
            .await
        });
    }
    let (mut tried, mut refused) = (0, 0);
    while let Some(done) = calls.join_next().await {
        match done.unwrap() {
            Err(s) if s.code() == Code::Unauthenticated => tried += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("too many failed logins"), "{s:?}");
                assert!(s.metadata().get("retry-after").is_some());
                refused += 1
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Before the fix every parallel guess passed a check that none had
    // counted yet.
    assert_eq!(
        (tried, refused),
        (5, 19),
        "five guesses per account and client, however parallel"
    );
}

/// Correct logins hash a password as wrong ones do: one client logging
/// in correctly in a loop is stopped at its limit (every login counts), so
/// a few addresses cannot hold the shared hashing permits, and another
/// client still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_that_succeed_are_limited_per_client_too() {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    let dir = tempfile::tempdir().unwrap();
    let (_auth, addr) = auth_with(dir.path(), &["--max-concurrent-hashes", "64"]).await;
    let looper = auth_from(addr, "127.0.0.1");
    looper
        .clone()
        .register(RegisterRequest {
            username: "looper".into(),
            password: "a-fine-password".into(),
        })
        .await
        .unwrap();
    let login = || LoginRequest {
        username: "looper".into(),
        password: "a-fine-password".into(),
    };
    // 130 logins, 5 at a time (an account's limit of logins in progress
    // from one client): the first 120 succeed, the rest are refused.
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..130 / 5 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let mut c = looper.clone();
            let request = login();
            calls.spawn(async move { c.login(request).await });
        }
        while let Some(done) = calls.join_next().await {
            match done.unwrap() {
                Ok(_) => ok += 1,
                Err(s) if s.code() == Code::ResourceExhausted => {
                    assert!(s.message().contains("too many logins from"), "{s:?}");
                    assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
                    refused += 1;
                }
                Err(s) => panic!("unexpected {s:?}"),
            }
        }
    }
    assert_eq!(
        (ok, refused),
        (120, 10),
        "every login counts, failed or not"
    );
    auth_from(addr, "127.0.0.2")
        .login(login())
        .await
        .expect("another client logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_client() {
    use shop_api::auth::v1::RegisterRequest;
    let dir = tempfile::tempdir().unwrap();
    let (_auth, addr) = auth_with(dir.path(), &[]).await;
    let mut spammer = auth_from(addr, "127.0.0.1");
    let register = |name: String| RegisterRequest {
        username: name,
        password: "a-fine-password".into(),
    };
    let mut limited = None;
    for i in 0..30 {
        match spammer.register(register(format!("spam{i}"))).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                limited = Some((i, s));
                break;
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    let (at, status) = limited.expect("registrations were never limited");
    assert_eq!(at, 20, "twenty registrations a minute per client");
    assert!(
        status.message().contains("too many registrations"),
        "{}",
        status.message()
    );
    assert!(status.metadata().get("retry-after").is_some());
    auth_from(addr, "127.0.0.2")
        .register(register("honest".into()))
        .await
        .expect("another client registers");
}

/// The `kid` in a JWT's header.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&json).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_rotate_once_and_never_sign_with_a_retired_key() {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    use sqlx::Row;
    let Some(db) = common::Db::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = db.create(dir.path(), "auth").await;
    let replica = || {
        let addr = free_addr();
        let args = ["--database-url", &url, "--signing-key-max-age-secs", "2"].map(String::from);
        (Proc::spawn("auth", addr, &args), addr)
    };
    let (_a, a) = replica();
    let (_b, b) = replica();
    wait_serving(a).await;
    wait_serving(b).await;
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let mut replicas = [auth_from(a, "127.0.0.1"), auth_from(b, "127.0.0.1")];
    replicas[0]
        .register(RegisterRequest {
            username: "rot".into(),
            password: "rotation-pass".into(),
        })
        .await
        .unwrap();
    let login = || LoginRequest {
        username: "rot".into(),
        password: "rotation-pass".into(),
    };
    let mut kids = std::collections::HashSet::new();
    let start = std::time::Instant::now();
    // Rotation every 2 s; logins on both replicas until five keys have
    // signed (four rotations), each checked against the database.
    while kids.len() < 5 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "only {} keys signed in 120 s",
            kids.len()
        );
        for (i, replica) in replicas.iter_mut().enumerate() {
            let before = shop_kit::time::now_millis();
            let token = replica
                .login(login())
                .await
                .unwrap()
                .into_inner()
                .access_token;
            let kid = kid_of(&token);
            let retired: Option<i64> =
                sqlx::query("SELECT retired_at FROM signing_keys WHERE kid = $1")
                    .bind(&kid)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .get("retired_at");
            // Before the fix, the replica that lost (or skipped) a rotation
            // kept signing with the key the other one had retired.
            assert!(
                retired.is_none_or(|at| at >= before),
                "replica {i} signed with {kid}, retired {} ms before the login began",
                before - retired.unwrap()
            );
            kids.insert(kid);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let rows = sqlx::query("SELECT kid, created_at, retired_at FROM signing_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    let active = rows
        .iter()
        .filter(|r| r.get::<Option<i64>, _>("retired_at").is_none())
        .count();
    assert_eq!(active, 1, "one active key after rotations");
    for row in &rows {
        if let Some(retired) = row.get::<Option<i64>, _>("retired_at") {
            let lived = retired - row.get::<i64, _>("created_at");
            // Concurrent rotations used to retire the key another replica
            // had just made.
            assert!(
                lived >= 2_000,
                "key {} retired after {lived} ms, younger than its max age",
                row.get::<String, _>("kid")
            );
        }
    }
    // Both replicas sign with the one active key (a rotation may fall
    // between the two logins: a few tries).
    for attempt in 0.. {
        let ka = kid_of(
            &replicas[0]
                .login(login())
                .await
                .unwrap()
                .into_inner()
                .access_token,
        );
        let kb = kid_of(
            &replicas[1]
                .login(login())
                .await
                .unwrap()
                .into_inner()
                .access_token,
        );
        let newest: String = sqlx::query(
            "SELECT kid FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, kid LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("kid");
        if ka == kb && kb == newest {
            break;
        }
        assert!(
            attempt < 10,
            "replicas sign with {ka} and {kb}, the active key is {newest}"
        );
    }
}
