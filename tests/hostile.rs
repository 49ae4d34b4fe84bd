//! Hostile input: message bounds checked from the length prefix, a gzip bomb
//! stopped while decompressing, and the server keeps answering honest
//! clients afterwards.

mod common;

use common::{Proc, free_addr, wait_serving};
use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
use tonic::{Code, codec::CompressionEncoding};

/// A payload whose encoded EchoRequest is exactly `size` bytes (for sizes
/// between 131 and 16 386: one tag byte and a two-byte length).
fn request_of(size: usize) -> EchoRequest {
    EchoRequest {
        payload: vec![b'x'; size - 3],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_limits_hold_at_the_edge_over_it_far_over_it_and_gzipped() {
    use prost::Message;
    assert_eq!(request_of(1024).encoded_len(), 1024);
    let addr = free_addr();
    let _server = Proc::spawn(
        "mesh-echo",
        addr,
        &["--max-request-bytes".into(), "1024".into()],
    );
    wait_serving(addr).await;
    let mut client = EchoServiceClient::new(common::channel(addr).await)
        .max_decoding_message_size(64 * 1024 * 1024);

    client
        .echo(request_of(1024))
        .await
        .expect("exactly the limit is accepted");
    let err = client.echo(request_of(1025)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message()
            .contains("found 1025 bytes, the limit is: 1024 bytes"),
        "{}",
        err.message()
    );
    let err = client
        .echo(EchoRequest {
            payload: vec![0; 16 * 1024 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // 512 KiB of zeros gzips to about 520 bytes: under the limit on the
    // wire, 500 times over it once decompressed.
    let mut gzip = EchoServiceClient::new(common::channel(addr).await)
        .send_compressed(CompressionEncoding::Gzip);
    let err = gzip
        .echo(EchoRequest {
            payload: vec![0; 512 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("exceeded while decompressing"),
        "{}",
        err.message()
    );
    // A small compressed request is fine.
    gzip.echo(request_of(500))
        .await
        .expect("gzip within the limit");

    // And honest clients are still served.
    client.echo(request_of(200)).await.unwrap();
}

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
