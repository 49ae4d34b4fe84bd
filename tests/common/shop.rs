//! The shop as processes: four services (and a gateway) on loopback, and
//! the steps every scenario needs (users, customers, orders).

use std::{net::SocketAddr, time::Duration};

use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    inventory::v1::inventory_service_client::InventoryServiceClient,
    orders::v1::orders_service_client::OrdersServiceClient,
    payments::v1::payments_service_client::PaymentsServiceClient,
};

use super::{
    Db, Proc, TRUST_DOMAIN, TestPki, authed, free_addr, identity, shop_policy, wait_serving_on,
};

/// The four services as separate processes on loopback.
pub struct Shop {
    pub dir: tempfile::TempDir,
    pub auth: Proc,
    pub inventory: Proc,
    pub payments: Proc,
    pub orders: Proc,
    pub urls: std::collections::HashMap<&'static str, String>,
    /// The operator's mesh (mTLS when the shop runs it).
    pub mesh: mesh_client::Mesh,
    pub tls: bool,
    /// The flags each process was started with, to restart it.
    pub args: std::collections::HashMap<&'static str, Vec<String>>,
    /// Each process's admin port (metrics, liveness, readiness).
    pub admin: std::collections::HashMap<&'static str, SocketAddr>,
    /// The test CA, when the shop runs mTLS.
    pub pki: Option<TestPki>,
    env: Vec<(String, String)>,
}

/// How to start the shop.
#[derive(Clone, Debug, Default)]
pub struct ShopOptions {
    /// mTLS with the shop's authorization policy.
    pub tls: bool,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
}

impl Shop {
    /// Kills `name` and starts it again with `policy` (a mesh policy JSON,
    /// see [`shop_policy_refusing_orders`]) instead of its own; the shop
    /// must run mTLS. [`Shop::restart`] after a kill restores its own.
    pub async fn restart_with_policy(&mut self, name: &'static str, policy: &str) {
        let path = self.dir.path().join(format!("{name}.other.policy.json"));
        std::fs::write(&path, policy).unwrap();
        let mut args = self.args[name].clone();
        let at = args
            .iter()
            .position(|a| a == "--mesh-config")
            .expect("a shop with mTLS runs with a mesh policy");
        args[at + 1] = path.display().to_string();
        self.proc_mut(name).kill();
        let addr = self.proc_mut(name).addr;
        *self.proc_mut(name) = Proc::spawn_env(name, addr, &args, &self.env);
        wait_serving_on(self.channel(addr, name)).await;
    }

    /// Kills `name` and starts it again with its own flags and policy.
    pub async fn restore(&mut self, name: &'static str) {
        self.proc_mut(name).kill();
        self.restart(name).await;
    }

    pub async fn start(db: &Db) -> Shop {
        Shop::start_with(db, false).await
    }

    /// Starts the shop; with `tls`, every process has a certificate from a
    /// test CA and the shop's authorization policy, and the test calls as
    /// the operator.
    pub async fn start_with(db: &Db, tls: bool) -> Shop {
        Shop::start_opts(
            db,
            ShopOptions {
                tls,
                ..Default::default()
            },
        )
        .await
    }

    /// Starts the shop as `options` say.
    pub async fn start_opts(db: &Db, options: ShopOptions) -> Shop {
        let ShopOptions { tls, env } = options;
        let dir = tempfile::tempdir().unwrap();
        let admin: std::collections::HashMap<&'static str, SocketAddr> =
            ["auth", "inventory", "payments", "orders"]
                .into_iter()
                .map(|name| (name, free_addr()))
                .collect();
        let mut urls = std::collections::HashMap::new();
        for name in ["auth", "inventory", "payments", "orders"] {
            urls.insert(name, db.create(dir.path(), name).await);
        }
        let pki = tls.then(|| TestPki::new(&dir.path().join("certs")));
        let db_args = |name: &str| {
            let mut args = vec![
                "--database-url".to_string(),
                urls[name].clone(),
                "--admin-addr".into(),
                admin[name].to_string(),
            ];
            if let Some(pki) = &pki {
                let policy = dir.path().join(format!("{name}.policy.json"));
                std::fs::write(&policy, shop_policy(name)).unwrap();
                args.extend([
                    "--tls-dir".into(),
                    pki.issue(name).display().to_string(),
                    "--mesh-config".into(),
                    policy.display().to_string(),
                    "--trust-domain".into(),
                    TRUST_DOMAIN.into(),
                ]);
            }
            args
        };
        let mut args = std::collections::HashMap::new();
        for name in ["auth", "inventory", "payments"] {
            args.insert(name, db_args(name));
        }
        let auth = Proc::spawn_env("auth", free_addr(), &args["auth"], &env);
        let inventory = Proc::spawn_env("inventory", free_addr(), &args["inventory"], &env);
        // Payments checks wallet users' tokens with auth's keys.
        args.get_mut("payments")
            .unwrap()
            .extend(["--auth-target".into(), format!("static:///{}", auth.addr)]);
        let payments = Proc::spawn_env("payments", free_addr(), &args["payments"], &env);
        let mut orders_args = db_args("orders");
        orders_args.extend([
            "--auth-target".into(),
            format!("static:///{}", auth.addr),
            "--inventory-target".into(),
            format!("static:///{}", inventory.addr),
            "--payments-target".into(),
            format!("static:///{}", payments.addr),
        ]);
        let orders = Proc::spawn_env("orders", free_addr(), &orders_args, &env);
        args.insert("orders", orders_args);
        let mut mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
            .unwrap()
            .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
            .unwrap();
        if let Some(pki) = &pki {
            pki.issue("operator");
            mesh = mesh.with_tls(pki.load("operator"));
        }
        let shop = Shop {
            dir,
            auth,
            inventory,
            payments,
            orders,
            urls,
            mesh,
            tls,
            args,
            admin,
            env,
            pki,
        };
        for (p, name) in [
            (&shop.auth, "auth"),
            (&shop.inventory, "inventory"),
            (&shop.payments, "payments"),
            (&shop.orders, "orders"),
        ] {
            wait_serving_on(shop.channel(p.addr, name)).await;
        }
        shop
    }

    pub fn proc_mut(&mut self, name: &str) -> &mut Proc {
        match name {
            "auth" => &mut self.auth,
            "inventory" => &mut self.inventory,
            "payments" => &mut self.payments,
            "orders" => &mut self.orders,
            other => panic!("no service {other}"),
        }
    }

    /// Starts `name` again on its address with its flags (after a kill).
    pub async fn restart(&mut self, name: &'static str) {
        let addr = self.proc_mut(name).addr;
        let args = self.args[name].clone();
        *self.proc_mut(name) = Proc::spawn_env(name, addr, &args, &self.env);
        wait_serving_on(self.channel(addr, name)).await;
    }

    /// A mesh channel to one of the shop's processes, as the operator.
    pub fn channel(&self, addr: SocketAddr, service: &str) -> mesh_client::MeshChannel {
        let target = format!("static:///{addr}");
        if self.tls {
            self.mesh
                .channel_with_identity(&target, &identity(service))
                .unwrap()
        } else {
            self.mesh.channel(&target).unwrap()
        }
    }

    pub async fn auth(&self) -> AuthServiceClient<mesh_client::MeshChannel> {
        AuthServiceClient::new(self.channel(self.auth.addr, "auth"))
    }
    pub async fn inventory(&self) -> InventoryServiceClient<mesh_client::MeshChannel> {
        InventoryServiceClient::new(self.channel(self.inventory.addr, "inventory"))
    }
    pub async fn payments(&self) -> PaymentsServiceClient<mesh_client::MeshChannel> {
        PaymentsServiceClient::new(self.channel(self.payments.addr, "payments"))
    }
    pub async fn orders(&self) -> OrdersServiceClient<mesh_client::MeshChannel> {
        OrdersServiceClient::new(self.channel(self.orders.addr, "orders"))
    }

    /// Registers a fresh user and returns `(user_id, bearer token)`.
    pub async fn user(&self, name: &str) -> (String, String) {
        user(self.auth().await, name).await
    }

    /// [`customer`] made by the operator: `(token, product_id, account_id)`.
    pub async fn customer(&self, name: &str) -> (String, String, String) {
        customer(
            self.auth().await,
            self.inventory().await,
            self.payments().await,
            name,
        )
        .await
    }

    /// The shop on SQLite with mTLS and its authorization policy.
    pub async fn start_mtls() -> Shop {
        Shop::start_opts(
            &Db::Sqlite,
            ShopOptions {
                tls: true,
                ..Default::default()
            },
        )
        .await
    }
}

/// Registers a fresh user through `auth` and returns `(user_id, bearer token)`.
pub async fn user(
    mut auth: AuthServiceClient<mesh_client::MeshChannel>,
    name: &str,
) -> (String, String) {
    let password = "correct-horse-battery".to_string();
    let user = auth
        .register(RegisterRequest {
            username: name.into(),
            password: password.clone(),
        })
        .await
        .expect("register")
        .into_inner();
    let login = auth
        .login(LoginRequest {
            username: name.into(),
            password,
        })
        .await
        .expect("login")
        .into_inner();
    (user.user_id, login.access_token)
}

/// The web origin test gateways allow gRPC-Web calls from.
pub const ORIGIN: &str = "https://shop.example";

/// A gateway process in front of `shop`, with its own workload identity
/// (sending inventory calls to `inventory`, if given, instead of the shop's).
pub fn gateway(shop: &Shop, inventory: Option<String>, extra: &[&str]) -> (Proc, SocketAddr) {
    let pki = shop.pki.as_ref().expect("the shop runs mTLS");
    let addr = free_addr();
    let mut args = vec![
        "--tls-dir".to_string(),
        pki.issue("gateway").display().to_string(),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--auth-target".into(),
        format!("static:///{}", shop.auth.addr),
        "--inventory-target".into(),
        inventory.unwrap_or_else(|| format!("static:///{}", shop.inventory.addr)),
        "--orders-target".into(),
        format!("static:///{}", shop.orders.addr),
        "--payments-target".into(),
        format!("static:///{}", shop.payments.addr),
        "--cors-allowed-origin".into(),
        ORIGIN.into(),
        "--admin-addr".into(),
        free_addr().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (Proc::spawn("gateway", addr, &args), addr)
}

/// Registers `name` and logs in through the gateway at `gw`, as an end
/// user would; returns `(user_id, token)`.
pub async fn gateway_login(gw: &tonic::transport::Channel, name: &str) -> (String, String) {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    let mut auth = AuthServiceClient::new(gw.clone());
    auth.register(RegisterRequest {
        username: name.into(),
        password: "correct-horse-battery".into(),
    })
    .await
    .expect("register through the gateway");
    let login = auth
        .login(LoginRequest {
            username: name.into(),
            password: "correct-horse-battery".into(),
        })
        .await
        .expect("login through the gateway")
        .into_inner();
    (login.user_id, login.access_token)
}

/// What an order needs, made through these clients: a user's token, a
/// product with plenty of stock and an account of theirs with plenty of
/// money. Returns `(token, product_id, account_id)`.
pub async fn customer(
    auth: AuthServiceClient<mesh_client::MeshChannel>,
    mut inventory: InventoryServiceClient<mesh_client::MeshChannel>,
    mut payments: PaymentsServiceClient<mesh_client::MeshChannel>,
    name: &str,
) -> (String, String, String) {
    use shop_api::{
        common::v1::Money,
        inventory::v1::CreateProductRequest,
        payments::v1::{DepositRequest, OpenAccountRequest},
    };
    let usd = |amount_minor| {
        Some(Money {
            currency_code: "USD".into(),
            amount_minor,
        })
    };
    let (user_id, token) = user(auth, name).await;
    let product = inventory
        .create_product(CreateProductRequest {
            sku: format!("SKU-{name}"),
            name: format!("product of {name}"),
            price: usd(100),
            initial_stock: 1_000_000,
        })
        .await
        .expect("create product")
        .into_inner()
        .product_id;
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: user_id,
            currency_code: "USD".into(),
        })
        .await
        .expect("open account")
        .into_inner()
        .account_id;
    payments
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(1_000_000_000),
            idempotency_key: format!("dep-{name}"),
        })
        .await
        .expect("deposit");
    (token, product, account)
}

/// A PlaceOrder for one unit, with a deadline.
pub fn place_request(
    token: &str,
    product: &str,
    account: &str,
    key: String,
) -> tonic::Request<shop_api::orders::v1::PlaceOrderRequest> {
    let mut request = authed(
        token,
        shop_api::orders::v1::PlaceOrderRequest {
            items: vec![shop_api::orders::v1::PlaceOrderItem {
                product_id: product.into(),
                quantity: 1,
            }],
            payment_account_id: account.into(),
            idempotency_key: key,
        },
    );
    request.set_timeout(Duration::from_secs(10));
    request
}
