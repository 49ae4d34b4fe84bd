//! Certificate rotation from disk, proven with real rustls handshakes over
//! an in-memory duplex pipe: what a new handshake presents after the files
//! change, that an established connection is unaffected, and that material
//! which does not validate is refused while the last good one stays.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    MeshTls, TlsError, TlsFiles,
    dev::{DevCa, Issued, LeafSpec, write_file, write_workload},
};

const DOMAIN: &str = "shop.test";

fn ca() -> DevCa {
    DevCa::generate(DOMAIN, Duration::from_secs(24 * 3600)).unwrap()
}

fn spec(workload: &str) -> LeafSpec {
    LeafSpec::local(
        format!("spiffe://{DOMAIN}/ns/shop/sa/{workload}")
            .parse()
            .unwrap(),
    )
}

fn issue(ca: &DevCa, workload: &str) -> Issued {
    ca.issue(&spec(workload)).unwrap()
}

fn leaf(issued: &Issued) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
}

/// A workload directory holding `issued` and `ca`'s bundle, and its identity.
fn workload(dir: &Path, ca: &DevCa, issued: &Issued) -> Arc<MeshTls> {
    write_workload(dir, issued, &ca.cert_pem).unwrap();
    MeshTls::load(TlsFiles::in_dir(dir)).unwrap()
}

/// A server (`inventory`) and a caller (`orders`) with certificates from
/// one CA, each from its own directory.
struct Bed {
    ca: DevCa,
    server_dir: tempfile::TempDir,
    _caller_dir: tempfile::TempDir,
    /// The server's first certificate.
    first: Issued,
    server: Arc<MeshTls>,
    caller: Arc<MeshTls>,
}

fn bed() -> Bed {
    let ca = ca();
    let (server_dir, caller_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = issue(&ca, "inventory");
    let server = workload(server_dir.path(), &ca, &first);
    let caller = workload(caller_dir.path(), &ca, &issue(&ca, "orders"));
    Bed {
        ca,
        server_dir,
        _caller_dir: caller_dir,
        first,
        server,
        caller,
    }
}

type Connection = (
    client::TlsStream<DuplexStream>,
    server::TlsStream<DuplexStream>,
);

/// A full mutual TLS handshake from `caller` to `server`, in memory.
async fn handshake(caller: &MeshTls, server: &MeshTls) -> Result<Connection, String> {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(caller.client_config(None).map_err(|e| e.to_string())?);
    let acceptor = TlsAcceptor::from(server.server_config());
    let name = ServerName::try_from("localhost").unwrap();
    let (dialled, accepted) = tokio::join!(connector.connect(name, near), acceptor.accept(far));
    match (dialled, accepted) {
        (Ok(c), Ok(s)) => Ok((c, s)),
        (c, s) => Err(format!("client: {:?}, server: {:?}", c.err(), s.err())),
    }
}

/// The leaf certificate the server presented on `connection`.
fn presented(connection: &Connection) -> CertificateDer<'static> {
    connection.0.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Bytes still flow both ways over an established connection.
async fn still_works(connection: &mut Connection) {
    let (c, s) = connection;
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").await.unwrap();
    s.flush().await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn a_rotated_certificate_is_presented_in_new_handshakes_and_old_connections_keep_working() {
    let Bed {
        ca,
        server_dir,
        first,
        server,
        caller,
        _caller_dir,
    } = bed();

    let mut before = handshake(&caller, &server).await.unwrap();
    assert_eq!(presented(&before), leaf(&first));
    // The server saw the caller's identity.
    let seen = before.1.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(seen, caller.material().chain[0]);
    assert!(!server.reload().unwrap(), "unchanged files: nothing to do");

    let second = issue(&ca, "inventory");
    write_workload(server_dir.path(), &second, &ca.cert_pem).unwrap();
    let old_serial = server.serial();
    assert!(server.reload().unwrap(), "the new pair is taken");
    assert_ne!(server.serial(), old_serial);

    let after = handshake(&caller, &server).await.unwrap();
    assert_eq!(
        presented(&after),
        leaf(&second),
        "new handshakes use the new pair"
    );
    // The connection made before the rotation keeps its session.
    still_works(&mut before).await;
}

#[tokio::test]
async fn a_broken_or_mismatched_pair_is_refused_and_the_last_good_one_stays() {
    let Bed {
        ca,
        server_dir,
        first: good,
        server,
        caller,
        _caller_dir,
    } = bed();
    let serial = server.serial();
    let (cert, key) = (
        server_dir.path().join("tls.crt"),
        server_dir.path().join("tls.key"),
    );

    let other = issue(&ca, "inventory");
    let foreign = issue(&self::ca(), "inventory");
    let expired = ca
        .issue(&LeafSpec {
            not_before: std::time::SystemTime::now() - Duration::from_secs(7200),
            valid_for: Duration::from_secs(3600),
            ..spec("inventory")
        })
        .unwrap();
    let cases: [(&str, &Issued, &str, &str); 4] = [
        // A new certificate with the old key: a half-finished rotation.
        (
            "mismatched key",
            &other,
            &good.key_pem,
            "key does not match the certificate",
        ),
        ("garbage key", &other, "not a key", "not a PEM private key"),
        (
            "another CA",
            &foreign,
            &foreign.key_pem,
            "does not chain to the trust bundle",
        ),
        ("expired", &expired, &expired.key_pem, "expired"),
    ];
    for (case, issued, key_pem, why) in cases {
        write_file(&cert, &issued.cert_pem, false).unwrap();
        write_file(&key, key_pem, true).unwrap();
        let err: TlsError = server.reload().expect_err(case);
        assert!(err.to_string().contains(why), "{case}: {err}");
        assert_eq!(server.serial(), serial, "{case}: the last good pair stays");
        let connection = handshake(&caller, &server).await.unwrap();
        assert_eq!(
            presented(&connection),
            leaf(&good),
            "{case}: and is presented"
        );
    }

    // A good pair after the broken ones is taken: nothing is stuck.
    write_workload(server_dir.path(), &other, &ca.cert_pem).unwrap();
    assert!(server.reload().unwrap());
    let connection = handshake(&caller, &server).await.unwrap();
    assert_eq!(presented(&connection), leaf(&other));
}

/// Points `dir/..data` at `version`, as the kubelet swaps a Secret volume.
fn swap_to(dir: &Path, version: &str) {
    let next = dir.join("..data_next");
    std::os::unix::fs::symlink(version, &next).unwrap();
    std::fs::rename(&next, dir.join("..data")).unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_watcher_takes_a_symlink_swapped_secret_and_ignores_a_broken_one() {
    let ca = ca();
    let (dir, caller_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let caller = workload(caller_dir.path(), &ca, &issue(&ca, "orders"));
    let (first, second) = (issue(&ca, "inventory"), issue(&ca, "inventory"));
    for (version, issued) in [("v1", &first), ("v2", &second)] {
        std::fs::create_dir(dir.path().join(version)).unwrap();
        write_workload(&dir.path().join(version), issued, &ca.cert_pem).unwrap();
    }
    // v3 is a half-written rotation: v2's certificate with v1's key.
    std::fs::create_dir(dir.path().join("v3")).unwrap();
    write_workload(
        &dir.path().join("v3"),
        &Issued {
            cert_pem: second.cert_pem.clone(),
            key_pem: first.key_pem.clone(),
        },
        &ca.cert_pem,
    )
    .unwrap();
    std::os::unix::fs::symlink("v1", dir.path().join("..data")).unwrap();
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name)).unwrap();
    }
    let server = MeshTls::load(TlsFiles::in_dir(dir.path())).unwrap();
    assert_eq!(
        presented(&handshake(&caller, &server).await.unwrap()),
        leaf(&first)
    );

    swap_to(dir.path(), "v3");
    // Paused time: the watcher's checks run as the clock jumps.
    tokio::time::sleep(super::RELOAD_EVERY * 3).await;
    assert_eq!(
        presented(&handshake(&caller, &server).await.unwrap()),
        leaf(&first),
        "the broken pair was refused by the watcher"
    );

    swap_to(dir.path(), "v2");
    tokio::time::sleep(super::RELOAD_EVERY * 3).await;
    assert_eq!(
        presented(&handshake(&caller, &server).await.unwrap()),
        leaf(&second),
        "the watcher took the good rotation without a reload call"
    );
}
