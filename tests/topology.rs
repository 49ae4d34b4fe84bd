//! The cluster's shape without a cluster: every service runs as two or
//! more separate processes ("pods") on their own loopback addresses, a real
//! DNS server answers `<service>.shop.svc.cluster.local` with the ready
//! pods' addresses like a headless Service, each service has its own
//! PostgreSQL database, and mTLS is on. Then what Kubernetes does to a
//! deployment: a rolling restart of everything under traffic, scaling
//! through DNS, and a whole service going away and coming back.

mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Db, Proc, TestPki, authed, dns::TestDns, http_get, place_request, shop_policy};
use shop_api::{
    auth::v1::auth_service_client::AuthServiceClient,
    inventory::v1::inventory_service_client::InventoryServiceClient,
    orders::v1::{GetOrderRequest, OrderStatus, orders_service_client::OrdersServiceClient},
    payments::v1::{GetAccountRequest, payments_service_client::PaymentsServiceClient},
};
use tonic::Code;

const SERVICES: [&str; 4] = ["auth", "inventory", "payments", "orders"];

fn fqdn(service: &str) -> String {
    format!("{service}.shop.svc.cluster.local")
}

struct Pod {
    ip: Ipv4Addr,
    admin: SocketAddr,
    proc: Proc,
}

/// The shop as a cluster: pods per service, DNS, databases, certificates.
struct Cluster {
    dir: tempfile::TempDir,
    dns: TestDns,
    /// Every service listens on its own port on every pod address, as
    /// containers share a containerPort.
    ports: HashMap<&'static str, u16>,
    admin_ports: HashMap<&'static str, u16>,
    urls: HashMap<&'static str, String>,
    pods: HashMap<&'static str, Vec<Pod>>,
    /// A /16 of loopback for this test; pods get the next host address.
    subnet: (u8, u8),
    next_host: u16,
    operator: mesh_client::Mesh,
}

impl Cluster {
    async fn start(db: &Db, replicas: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let dns = TestDns::start().await;
        let pki = TestPki::new(&dir.path().join("certs"));
        let mut urls = HashMap::new();
        let mut ports = HashMap::new();
        let mut admin_ports = HashMap::new();
        // Held at once so the eight port numbers differ (pods of different
        // services share addresses with nothing, but one pod binds two ports).
        let held: Vec<std::net::TcpListener> = (0..2 * SERVICES.len())
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut free = held.iter().map(|l| l.local_addr().unwrap().port());
        for name in SERVICES {
            ports.insert(name, free.next().unwrap());
            admin_ports.insert(name, free.next().unwrap());
        }
        drop(held);
        for name in SERVICES {
            urls.insert(name, db.create(dir.path(), name).await);
            pki.issue(name);
            // Orders re-resolves its targets every second, like a pod with a
            // short DNS TTL, so scaling shows within seconds.
            let mut policy: serde_json::Value = serde_json::from_str(&shop_policy(name)).unwrap();
            policy["dnsRefresh"] = "1s".into();
            std::fs::write(dir.path().join(format!("{name}.json")), policy.to_string()).unwrap();
        }
        pki.issue("operator");
        let operator = mesh_client::Mesh::from_config(mesh_client::MeshConfig {
            dns_refresh: Duration::from_secs(1),
            ..Default::default()
        })
        .unwrap()
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(pki.load("operator"));
        let subnet = (rand::random_range(1..=250u8), rand::random_range(1..=250u8));
        let mut cluster = Cluster {
            dir,
            dns,
            ports,
            admin_ports,
            urls,
            pods: HashMap::new(),
            subnet,
            next_host: 1,
            operator,
        };
        for name in SERVICES {
            for _ in 0..replicas {
                cluster.scale_up(name).await;
            }
        }
        cluster
    }

    fn target(&self, service: &str) -> String {
        format!(
            "dns://{}/{}:{}",
            self.dns.addr,
            fqdn(service),
            self.ports[service]
        )
    }

    fn next_ip(&mut self) -> Ipv4Addr {
        let host = self.next_host;
        self.next_host += 1;
        Ipv4Addr::new(127, self.subnet.0, (host >> 8) as u8, host as u8)
    }

    fn publish(&self, service: &str) {
        let ips: Vec<Ipv4Addr> = self.pods[service].iter().map(|p| p.ip).collect();
        self.dns.set(&fqdn(service), &ips);
    }

    /// Starts one more pod of `service` and, once it is ready, adds it to
    /// DNS (a headless Service lists ready pods only).
    async fn scale_up(&mut self, service: &'static str) -> Ipv4Addr {
        let ip = self.next_ip();
        let addr = SocketAddr::new(ip.into(), self.ports[service]);
        let admin = SocketAddr::new(ip.into(), self.admin_ports[service]);
        let mut args = vec![
            "--database-url".to_string(),
            self.urls[service].clone(),
            "--admin-addr".into(),
            admin.to_string(),
            "--tls-dir".into(),
            self.dir
                .path()
                .join("certs")
                .join(service)
                .display()
                .to_string(),
            "--mesh-config".into(),
            self.dir
                .path()
                .join(format!("{service}.json"))
                .display()
                .to_string(),
            "--trust-domain".into(),
            common::TRUST_DOMAIN.into(),
            "--drain-grace-ms".into(),
            "1000".into(),
        ];
        if service == "payments" {
            args.extend(["--auth-target".into(), self.target("auth")]);
        }
        if service == "orders" {
            for (flag, callee) in [
                ("--auth-target", "auth"),
                ("--inventory-target", "inventory"),
                ("--payments-target", "payments"),
            ] {
                args.extend([flag.into(), self.target(callee)]);
            }
        }
        let proc = Proc::spawn(service, addr, &args);
        let channel = self
            .operator
            .channel_with_identity(&format!("static:///{addr}"), &common::identity(service))
            .unwrap();
        common::wait_serving_on(channel).await;
        self.pods
            .entry(service)
            .or_default()
            .push(Pod { ip, admin, proc });
        self.publish(service);
        ip
    }

    /// What Kubernetes does to a terminating pod: out of DNS first, then
    /// SIGTERM (the server drains), then wait for it to exit.
    async fn terminate(&mut self, service: &str, index: usize) {
        let mut pod = self.pods.get_mut(service).unwrap().remove(index);
        self.publish(service);
        // The endpoints controller and DNS take a moment; so does preStop.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let code = pod.proc.terminate(Duration::from_secs(30)).await;
        assert_eq!(
            code,
            Some(0),
            "{service} at {} drained and exited cleanly",
            pod.ip
        );
    }

    fn channel(&self, service: &str) -> mesh_client::MeshChannel {
        self.operator
            .channel_with_identity(&self.target(service), &common::identity(service))
            .unwrap()
    }

    async fn inbound_calls(&self, pod: &Pod) -> f64 {
        let (_, text) = http_get(pod.admin, "/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("mesh_requests_total{direction=\"inbound\"")
                    && !l.contains("grpc.health")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Continuous shop traffic as users make it, through orders only: place an
/// order, read it back. Every failed call is recorded.
struct Traffic {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    placed: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// `phase` keeps idempotency keys apart (a repeated key is a replay).
    fn start(
        phase: &'static str,
        orders: OrdersServiceClient<mesh_client::MeshChannel>,
        token: &str,
        product: &str,
        account: &str,
        workers: usize,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let placed = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let tasks = (0..workers)
            .map(|worker| {
                let (stop, calls, failures, placed) = (
                    stop.clone(),
                    calls.clone(),
                    failures.clone(),
                    placed.clone(),
                );
                let (mut orders, token, product, account) = (
                    orders.clone(),
                    token.to_owned(),
                    product.to_owned(),
                    account.to_owned(),
                );
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // Bounded: stops when told, or after 3 minutes whatever happens.
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(180)
                    {
                        n += 1;
                        let request = place_request(
                            &token,
                            &product,
                            &account,
                            format!("{phase}-{worker}-{n}"),
                        );
                        calls.fetch_add(1, Ordering::Relaxed);
                        match orders.place_order(request).await {
                            Ok(order) => {
                                let id = order.into_inner().order_id;
                                let mut request = authed(
                                    &token,
                                    GetOrderRequest {
                                        order_id: id.clone(),
                                    },
                                );
                                request.set_timeout(Duration::from_secs(10));
                                calls.fetch_add(1, Ordering::Relaxed);
                                if let Err(e) = orders.get_order(request).await {
                                    failures.lock().unwrap().push(format!("GetOrder: {e}"));
                                }
                                placed.lock().unwrap().push(id);
                            }
                            Err(e) => failures.lock().unwrap().push(format!("PlaceOrder: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            calls,
            failures,
            placed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
            self.placed.lock().unwrap().clone(),
        )
    }
}

/// Waits until every order is CONFIRMED (the sagas of orders that a
/// drained pod left are resumed by another pod's recovery sweep).
async fn all_confirmed(
    orders: &mut OrdersServiceClient<mesh_client::MeshChannel>,
    token: &str,
    ids: &[String],
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    for id in ids {
        loop {
            let status = orders
                .get_order(authed(
                    token,
                    GetOrderRequest {
                        order_id: id.clone(),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .status();
            if status == OrderStatus::Confirmed {
                break;
            }
            assert_ne!(status, OrderStatus::Cancelled, "order {id} was cancelled");
            assert!(Instant::now() < deadline, "order {id} still {status:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_survives_what_kubernetes_does_to_it() {
    let Some(db) = Db::postgres() else { return };
    let mut cluster = Cluster::start(&db, 2).await;

    // A customer, made with the operator's tools; users call orders only.
    let mut orders = OrdersServiceClient::new(cluster.channel("orders"));
    let mut payments = PaymentsServiceClient::new(cluster.channel("payments"));
    let (token, product, account) = common::customer(
        AuthServiceClient::new(cluster.channel("auth")),
        InventoryServiceClient::new(cluster.channel("inventory")),
        payments.clone(),
        "kube",
    )
    .await;

    // 1. Rolling restart of every service, one pod at a time (surge one,
    //    then drain one), under continuous traffic: no user call fails.
    let traffic = Traffic::start("rolling", orders.clone(), &token, &product, &account, 2);
    for service in SERVICES {
        for _ in 0..2 {
            cluster.scale_up(service).await;
            cluster.terminate(service, 0).await;
        }
    }
    let (calls, failures, placed) = traffic.stop().await;
    assert!(
        calls > 50,
        "traffic flowed during the restart ({calls} calls)"
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} user calls failed during the rolling restart: {failures:#?}",
        failures.len()
    );
    eprintln!("rolling restart: {calls} user calls, 0 failed");
    all_confirmed(&mut orders, &token, &placed, Duration::from_secs(60)).await;

    // 2. Scale inventory up through DNS: the new pod takes traffic within
    //    seconds; scale back down with no failed call.
    let traffic = Traffic::start("scaling", orders.clone(), &token, &product, &account, 2);
    let new_ip = cluster.scale_up("inventory").await;
    let added = Instant::now();
    loop {
        let pod = cluster.pods["inventory"]
            .iter()
            .find(|p| p.ip == new_ip)
            .unwrap();
        if cluster.inbound_calls(pod).await > 0.0 {
            break;
        }
        if added.elapsed() > Duration::from_secs(10) {
            let mut seen = String::new();
            for pod in &cluster.pods["orders"] {
                let (_, text) = http_get(pod.admin, "/metrics").await;
                seen.extend(
                    text.lines()
                        .filter(|l| l.starts_with("mesh_endpoints{"))
                        .map(|l| format!("{l}\n")),
                );
            }
            let mut others = Vec::new();
            for other in &cluster.pods["inventory"] {
                others.push((other.ip, cluster.inbound_calls(other).await));
            }
            panic!(
                "the new inventory pod got no traffic within 10 s of joining DNS; calls so far {}; inventory pods' inbound calls {others:?}; orders sees:\n{seen}",
                traffic.calls.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("scale up: new pod served within {:?}", added.elapsed());
    cluster.terminate("inventory", 0).await;
    let (calls, failures, placed) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {calls} user calls failed while scaling: {failures:#?}",
        failures.len()
    );
    all_confirmed(&mut orders, &token, &placed, Duration::from_secs(60)).await;

    // 3. Payments goes away entirely (every pod killed, DNS empty): calls
    //    to it fail fast and say why; orders placed meanwhile wait, and
    //    complete once payments is back, with nothing restarted.
    for pod in cluster.pods.get_mut("payments").unwrap().drain(..) {
        let mut proc = pod.proc;
        proc.kill();
    }
    cluster.publish("payments");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let mut request = tonic::Request::new(GetAccountRequest {
        account_id: account.clone(),
    });
    request.set_timeout(Duration::from_secs(10));
    let err = payments.get_account(request).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        took < Duration::from_secs(3),
        "an outage fails fast, not at the deadline (took {took:?})"
    );
    assert!(
        err.message().contains("payments") || err.message().contains("endpoint"),
        "the error says what is missing: {}",
        err.message()
    );
    // Orders checks the payment account when it takes an order, so the
    // user gets the same fast, clear answer instead of an order that hangs.
    let place = |key: &str| place_request(&token, &product, &account, key.into());
    let started = Instant::now();
    let err = orders
        .place_order(place("during-outage"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("payments"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Payments comes back (new pods, new addresses); nothing else restarts.
    for _ in 0..2 {
        cluster.scale_up("payments").await;
    }
    let recovered = Instant::now();
    let placed = loop {
        match orders.place_order(place("after-outage")).await {
            Ok(order) => break order.into_inner().order_id,
            Err(e) if recovered.elapsed() < Duration::from_secs(10) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("orders did not recover within 10 s of payments: {e}"),
        }
    };
    eprintln!(
        "outage: recovered {:?} after payments returned",
        recovered.elapsed()
    );
    all_confirmed(&mut orders, &token, &[placed], Duration::from_secs(60)).await;
    let mut request = tonic::Request::new(GetAccountRequest {
        account_id: account,
    });
    request.set_timeout(Duration::from_secs(10));
    payments
        .get_account(request)
        .await
        .expect("payments is reachable again through the same channel");
}
