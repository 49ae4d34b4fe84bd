//! The shop's topology in the network-namespace bed (`super::netbed`):
//! PostgreSQL in a pod of its own, `replicas` pods per service (auth,
//! inventory, payments, orders, gateway; the real binaries with mTLS and
//! the shop's authorization policy), every service finding the others by
//! a headless DNS name that lists its pods (served from the client's
//! pod), and the test's own calls made from a runtime inside the client's
//! pod, so no packet leaves the bed.
//!
//! Every service with a database uses its own database on the one
//! PostgreSQL server (both replicas of a service share it), created the
//! way [`super::Db::create`] makes them for the loopback shop.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use super::{
    Db, Proc, TRUST_DOMAIN, TestPki, bin,
    dns::TestDns,
    identity,
    netbed::{NetBed, NsRuntime, Pod},
    shop_policy,
};

/// The shop's services in start order, with their gRPC port.
pub const SERVICES: [(&str, u16); 5] = [
    ("auth", 50051),
    ("inventory", 50052),
    ("payments", 50053),
    ("orders", 50054),
    ("gateway", 50055),
];

/// The services that keep a database.
pub const WITH_DATABASE: [&str; 4] = ["auth", "inventory", "payments", "orders"];

/// The DNS zone of the bed's headless names (`<service>.shop.bed`).
const ZONE: &str = "shop.bed";

/// A PostgreSQL server in its own pod: a throwaway cluster, made as
/// `scripts/test-postgres.sh` makes one (initdb as the postgres user,
/// trust, `fsync` off), listening on the pod's address only.
pub struct PgPod {
    /// The server's pod.
    pub pod: Pod,
    /// Removed when dropped (after the bed has stopped the server).
    _dir: tempfile::TempDir,
}

impl PgPod {
    /// Starts PostgreSQL in a new pod of `bed`, or `None` (a skip) without it.
    pub fn start(bed: &NetBed) -> Option<PgPod> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).max());
        let Some(bin) = bin.filter(|b| b.join("pg_ctl").exists()) else {
            super::skip_or_fail("PostgreSQL (apt-get install -y postgresql) is not installed")?;
            unreachable!()
        };
        let pod = bed.pod("postgres");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let checked = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        checked(
            std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path()),
        );
        checked(
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data),
        );
        let conf = format!(
            "listen_addresses = '{}'\nport = 5432\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 200\n",
            pod.addr,
            dir.path().display()
        );
        append(&data.join("postgresql.conf"), &conf);
        // The bed's pods only (trust: a throwaway cluster nothing else reaches).
        append(
            &data.join("pg_hba.conf"),
            "host all all 198.18.0.0/24 trust\n",
        );
        checked(
            bed.command(&pod, Path::new("/usr/sbin/runuser"))
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-w", "start"]),
        );
        Some(PgPod { pod, _dir: dir })
    }

    /// The superuser's URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:5432/postgres", self.pod.addr)
    }
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
}

/// The shop in the bed. Fields drop in order: the client's runtime and
/// the service processes before the bed, the bed (which kills PostgreSQL
/// with its pod) before PostgreSQL's files.
pub struct NetShop {
    /// A runtime in the client's pod: every call of the test goes from here.
    pub rt: NsRuntime,
    /// The headless names, served from the client's pod.
    pub dns: TestDns,
    /// The service processes with their pods, by service name.
    pub procs: HashMap<&'static str, Vec<(Pod, Proc)>>,
    /// The operator's mesh (mTLS), made in the client's pod.
    pub mesh: mesh_client::Mesh,
    /// Each service's database URL.
    pub urls: HashMap<&'static str, String>,
    /// The pod the test calls from (and the DNS server's).
    pub client: Pod,
    /// The bed.
    pub bed: NetBed,
    /// PostgreSQL's pod.
    pub pg: PgPod,
    /// The test CA.
    pub pki: TestPki,
    _dir: tempfile::TempDir,
}

impl NetShop {
    /// Starts the shop with `replicas` pods per service, or `None` (the
    /// test skips) without root, namespaces or PostgreSQL.
    pub async fn start(replicas: usize) -> Option<NetShop> {
        let bed = NetBed::new()?;
        let client = bed.pod("client");
        let pg = PgPod::start(&bed)?;
        bed.set_nameserver(client.addr);
        let rt = NsRuntime::new(&client);
        let dns = rt
            .run(TestDns::start_on(SocketAddr::from((client.addr, 53))))
            .await;
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(&dir.path().join("certs"));
        pki.issue("operator");
        let mesh = {
            let tls = pki.load("operator");
            rt.run(async move {
                mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
                    .unwrap()
                    .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
                    .unwrap()
                    .with_tls(tls)
            })
            .await
        };
        let urls: HashMap<&'static str, String> = {
            let admin = Db::Postgres(pg.url());
            let root = dir.path().to_path_buf();
            rt.run(async move {
                let mut urls = HashMap::new();
                for name in WITH_DATABASE {
                    urls.insert(name, admin.create(&root, name).await);
                }
                urls
            })
            .await
        };
        // Every pod first, so DNS lists both replicas of each service
        // before anyone resolves it.
        let mut pods: HashMap<&'static str, Vec<Pod>> = HashMap::new();
        for (name, _) in SERVICES {
            let list: Vec<Pod> = (0..replicas)
                .map(|i| bed.pod(&format!("{name}{i}")))
                .collect();
            let ips: Vec<Ipv4Addr> = list.iter().map(|p| p.addr).collect();
            dns.set(&format!("{name}.{ZONE}"), &ips);
            pods.insert(name, list);
        }
        let mut shop = NetShop {
            rt,
            dns,
            procs: HashMap::new(),
            mesh,
            urls,
            client,
            bed,
            pg,
            pki,
            _dir: dir,
        };
        for (name, port) in SERVICES {
            let args = shop.args(name);
            for pod in pods.remove(name).unwrap() {
                let addr = SocketAddr::from((pod.addr, port));
                let child = shop
                    .bed
                    .command(&pod, &bin(name))
                    .arg("--listen")
                    .arg(addr.to_string())
                    .args(&args)
                    .env(
                        "RUST_LOG",
                        std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
                    )
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {name} in its pod: {e}"));
                shop.procs
                    .entry(name)
                    .or_default()
                    .push((pod, Proc::adopt(name, addr, child)));
            }
            for (_, proc) in &shop.procs[name] {
                if name == "gateway" {
                    // Its public port: plaintext, as the shop runs it
                    // behind a TLS-terminating edge.
                    shop.rt.run(super::wait_serving(proc.addr)).await;
                } else {
                    let channel = shop.channel_to(proc.addr, name).await;
                    shop.rt.run(super::wait_serving_on(channel)).await;
                }
            }
        }
        Some(shop)
    }

    /// The flags of `service`'s processes (all but `--listen`).
    fn args(&self, service: &str) -> Vec<String> {
        let dir = self.pki.issue(service);
        let mut args = vec![
            "--tls-dir".to_string(),
            dir.display().to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
        ];
        if let Some(url) = self.urls.get(service) {
            let policy = self._dir.path().join(format!("{service}.policy.json"));
            std::fs::write(&policy, shop_policy(service)).unwrap();
            args.extend([
                "--mesh-config".into(),
                policy.display().to_string(),
                "--database-url".into(),
                url.clone(),
            ]);
        }
        let callees: &[&str] = match service {
            "payments" => &["auth"],
            "orders" => &["auth", "inventory", "payments"],
            "gateway" => &["auth", "inventory", "orders", "payments"],
            _ => &[],
        };
        for callee in callees {
            args.extend([format!("--{callee}-target"), self.target(callee)]);
        }
        if service == "gateway" {
            // Load from one client pod is many users at one address: the
            // edge's rate limit is not what these tests are about.
            args.extend([
                "--rate-limit-per-second".into(),
                "100000".into(),
                "--rate-limit-burst".into(),
                "100000".into(),
                "--max-calls-in-flight-per-client".into(),
                "100000".into(),
            ]);
        }
        args
    }

    /// `service`'s headless name as a mesh target, resolved by the bed's DNS.
    pub fn target(&self, service: &str) -> String {
        let port = SERVICES.iter().find(|(n, _)| *n == service).unwrap().1;
        format!("dns://{}:53/{service}.{ZONE}:{port}", self.client.addr)
    }

    /// The pods of `service` with their gRPC addresses.
    pub fn pods(&self, service: &str) -> Vec<(Pod, SocketAddr)> {
        self.procs[service]
            .iter()
            .map(|(pod, proc)| (pod.clone(), proc.addr))
            .collect()
    }

    /// An operator's mTLS channel to one process of `service`, made in
    /// the client's pod (its sockets are the pod's).
    pub async fn channel_to(&self, addr: SocketAddr, service: &str) -> mesh_client::MeshChannel {
        self.make_channel(format!("static:///{addr}"), Some(identity(service)))
            .await
    }

    /// An operator's mTLS channel to every pod of `service`, by its DNS name.
    pub async fn channel(&self, service: &str) -> mesh_client::MeshChannel {
        self.make_channel(self.target(service), Some(identity(service)))
            .await
    }

    /// A plaintext mesh channel to the gateways' public port, as an end
    /// user's client in the bed reaches the shop.
    pub async fn gateway(&self) -> mesh_client::MeshChannel {
        let target = self.target("gateway");
        self.rt
            .run(async move {
                mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
                    .unwrap()
                    .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
                    .unwrap()
                    .channel(&target)
                    .unwrap()
            })
            .await
    }

    async fn make_channel(
        &self,
        target: String,
        identity: Option<String>,
    ) -> mesh_client::MeshChannel {
        let mesh = self.mesh.clone();
        self.rt
            .run(async move {
                match identity {
                    Some(id) => mesh.channel_with_identity(&target, &id),
                    None => mesh.channel(&target),
                }
                .unwrap()
            })
            .await
    }

    /// Stops everything and checks no namespace of the bed is left.
    pub fn teardown(self) {
        let prefix = self.bed.prefix.clone();
        drop(self);
        assert!(
            NetBed::leftovers(&prefix).is_empty(),
            "namespaces left behind: {:?}",
            NetBed::leftovers(&prefix)
        );
    }
}

/// How long a health check of one pod may take before it counts as no answer.
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// `Some(true)` SERVING, `Some(false)` answered but not SERVING, `None` no answer.
pub async fn serving(channel: mesh_client::MeshChannel) -> Option<bool> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(HEALTH_CHECK_TIMEOUT);
    match HealthClient::new(channel).check(request).await {
        Ok(r) => Some(r.get_ref().status() == ServingStatus::Serving),
        Err(_) => None,
    }
}
