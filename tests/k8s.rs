//! The Kubernetes manifests, offline (no cluster exists here): rendered with
//! `kubectl kustomize`, validated against the Kubernetes API schemas in
//! strict mode with `kubernetes-validate`, and checked against the code:
//! targets, identities, ports, probes, drain timing and network policies
//! agree with what the services do.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use base64::Engine;
use common::{bin, skip_or_fail, which};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33";
const SERVICES: [&str; 6] = [
    "auth",
    "inventory",
    "payments",
    "orders",
    "gateway",
    "recommendations",
];
/// The images built by the one Rust `Dockerfile` (recommendations, in
/// Python, has `Dockerfile.recommendations`).
const RUST_IMAGES: [&str; 6] = [
    "auth",
    "inventory",
    "payments",
    "orders",
    "gateway",
    "identity",
];
/// The services with a database of their own (all but the gateway).
const WITH_DATABASE: [&str; 5] = ["auth", "inventory", "payments", "orders", "recommendations"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `k8s/` as a fresh clone has it: nothing generated (no
/// certificate files exist any more; the identity service's CA is applied
/// apart, see [`identity_ca_objects`]).
fn prepared_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo().join("k8s"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    // Whatever a developer's checkout holds, render what git holds.
    let _ = std::fs::remove_dir_all(dir.path().join("k8s/overlays/kind/generated"));
    dir
}

/// What `scripts/kind-up.sh` applies before the manifests: `shopctl certs
/// --k8s-identity-ca` (the CA Secret, the trust bundle ConfigMap).
fn identity_ca_objects(dir: &Path) -> String {
    let output = Command::new(bin("shopctl"))
        .args(["certs", "--out"])
        .arg(dir.join("certs"))
        .arg("--k8s-identity-ca")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "shopctl certs --k8s-identity-ca: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn render(dir: &Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `kubernetes-validate --strict` on `yaml`: Ok, or its complaints.
fn validate(yaml: &str) -> Result<(), String> {
    let output = common::run_with_input(
        Command::new("kubernetes-validate").args([
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            "-",
        ]),
        yaml.as_bytes(),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && !said.contains("ERROR") {
        Ok(())
    } else {
        Err(said)
    }
}

/// YAML documents as JSON values, through PyYAML (installed with
/// kubernetes-validate), so the test needs no YAML crate.
fn documents(yaml: &str) -> Vec<Value> {
    let output = common::run_with_input(
        Command::new("python3").args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]),
        yaml.as_bytes(),
    );
    assert!(
        output.status.success(),
        "PyYAML could not read the manifests"
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn tools_present() -> bool {
    for (tool, how) in [
        ("kubectl", "kubectl (v1.27+, with kustomize)"),
        (
            "kubernetes-validate",
            "python3 -m pip install kubernetes-validate",
        ),
    ] {
        if which(tool).is_none() {
            skip_or_fail(how);
            return false;
        }
    }
    true
}

#[test]
fn manifests_render_and_validate_strictly() {
    if !tools_present() {
        return;
    }
    let copy = prepared_copy();
    let k8s = copy.path().join("k8s");
    for dir in ["base", "overlays/kind", "overlays/canary"] {
        let yaml = render(&k8s.join(dir));
        if let Err(complaints) = validate(&yaml) {
            panic!(
                "k8s/{dir} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{complaints}"
            );
        }
    }
    if let Err(complaints) = validate(&identity_ca_objects(copy.path())) {
        panic!("shopctl certs --k8s-identity-ca does not validate:\n{complaints}");
    }
    // The validator does reject what Kubernetes would: a misspelt field.
    let typo = render(&k8s.join("overlays/kind")).replacen(
        "terminationGracePeriodSeconds",
        "terminationGracePeriodSecond",
        1,
    );
    assert!(
        validate(&typo).is_err(),
        "strict validation let a typo through"
    );
}

/// The rendered kind overlay, indexed.
struct Cluster {
    objects: Vec<Value>,
}

impl Cluster {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn deployment(&self, name: &str) -> &Value {
        self.get("Deployment", name)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env(deployment: &Value) -> BTreeMap<String, Value> {
    container(deployment)["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn env_value(deployment: &Value, name: &str) -> Option<String> {
    env(deployment)
        .get(name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn port_named(deployment: &Value, name: &str) -> i64 {
    container(deployment)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{} has no {name} port", deployment["metadata"]["name"]))
        ["containerPort"]
        .as_i64()
        .unwrap()
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The mesh policy a Deployment mounts, from its ConfigMap.
fn mesh_policy(cluster: &Cluster, deployment: &Value) -> Value {
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mesh-config")
        .expect("a mesh-config volume");
    let name = volume["configMap"]["name"].as_str().unwrap();
    let map = cluster
        .get("ConfigMap", name)
        .unwrap_or_else(|| panic!("ConfigMap {name} is missing"));
    let text = map["data"]["mesh.json"].as_str().unwrap();
    // The real parser: the policy must load in the service.
    mesh_client::MeshConfig::from_json(text)
        .unwrap_or_else(|e| panic!("{name}'s mesh.json does not load: {e}"));
    serde_json::from_str(text).unwrap()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let exact = selector["matchLabels"]
        .as_object()
        .map(|m| m.iter().all(|(k, v)| &labels[k] == v))
        .unwrap_or(true);
    let expressions = selector["matchExpressions"]
        .as_array()
        .map(|exprs| {
            exprs.iter().all(|e| {
                let value = &labels[e["key"].as_str().unwrap()];
                let values = e["values"].as_array().unwrap();
                match e["operator"].as_str().unwrap() {
                    "In" => values.contains(value),
                    "NotIn" => !values.contains(value),
                    other => panic!("selector operator {other} not understood by this test"),
                }
            })
        })
        .unwrap_or(true);
    exact && expressions
}

fn pod_labels(cluster: &Cluster, app: &str) -> Value {
    cluster
        .get("Deployment", app)
        .or_else(|| cluster.get("StatefulSet", app))
        .unwrap_or_else(|| panic!("no workload {app}"))["spec"]["template"]["metadata"]["labels"]
        .clone()
}

/// Whether the network policies let `from` open TCP `port` on `to`: some
/// egress rule of a policy selecting `from` and some ingress rule of a
/// policy selecting `to` must both allow it (policies in one namespace).
fn allowed(cluster: &Cluster, from: &str, to: &str, port: i64) -> bool {
    let (from_labels, to_labels) = (pod_labels(cluster, from), pod_labels(cluster, to));
    let rule_allows = |rule: &Value, peer_key: &str, peer: &Value| {
        let port_ok = rule["ports"]
            .as_array()
            .is_none_or(|ports| ports.iter().any(|p| p["port"] == port));
        let peer_ok = rule[peer_key].as_array().is_none_or(|peers| {
            peers.iter().any(|p| {
                p.get("namespaceSelector")
                    .is_some_and(|n| n == &serde_json::json!({}))
                    || p.get("podSelector").is_some_and(|s| {
                        p.get("namespaceSelector").is_none() && labels_match(s, peer)
                    })
            })
        });
        port_ok && peer_ok
    };
    let direction = |selected: &Value, kind: &str, key: &str, peer_key: &str, peer: &Value| {
        cluster.of_kind("NetworkPolicy").any(|p| {
            let spec = &p["spec"];
            labels_match(&spec["podSelector"], selected)
                && spec["policyTypes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t == kind)
                && spec[key]
                    .as_array()
                    .is_some_and(|rules| rules.iter().any(|r| rule_allows(r, peer_key, peer)))
        })
    };
    direction(&from_labels, "Egress", "egress", "to", &to_labels)
        && direction(&to_labels, "Ingress", "ingress", "from", &from_labels)
}

// Loading a certificate starts its rotation watcher, which needs a runtime.
#[tokio::test]
async fn manifests_agree_with_the_code() {
    if !tools_present() {
        return;
    }
    let copy = prepared_copy();
    let cluster = Cluster {
        objects: documents(&render(&copy.path().join("k8s/overlays/kind"))),
    };
    let namespace = "shop";
    let identity = |sa: &str| format!("spiffe://shop.local/ns/{namespace}/sa/{sa}");
    let mut edges = BTreeSet::new();

    for name in SERVICES {
        let d = cluster.deployment(name);
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(d["metadata"]["namespace"], namespace);
        assert!(
            d["spec"]["replicas"].as_i64().unwrap() >= 2,
            "{name}: 2 replicas"
        );

        // Identity: the ServiceAccount is the SPIFFE identity, which the
        // identity service issues for the projected token the pod holds.
        let sa = spec["serviceAccountName"].as_str().unwrap();
        assert_eq!(sa, name);
        assert!(
            cluster.get("ServiceAccount", sa).is_some(),
            "{name}: no ServiceAccount"
        );
        check_identity_client(&cluster, name, d);
        assert_eq!(env_value(d, "TRUST_DOMAIN").as_deref(), Some("shop.local"));
        assert_eq!(env_value(d, "MESH_NAMESPACE").as_deref(), Some(namespace));

        // Ports: what the process binds is what the pod and Service expose.
        let grpc = port_named(d, "grpc");
        let admin = port_named(d, "admin");
        assert_eq!(port_of(&env_value(d, "LISTEN_ADDR").unwrap()), grpc);
        assert_eq!(port_of(&env_value(d, "ADMIN_ADDR").unwrap()), admin);
        let service = cluster
            .get("Service", name)
            .unwrap_or_else(|| panic!("no Service {name}"));
        // Mesh callees are headless (one address per pod, balanced by the
        // mesh client); the gateway's callers are outside the mesh.
        if name != "gateway" {
            assert_eq!(service["spec"]["clusterIP"], "None", "{name}: headless");
        }
        assert!(labels_match(
            &serde_json::json!({"matchLabels": service["spec"]["selector"]}),
            &spec_labels(d)
        ));
        let svc_grpc = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "grpc")
            .unwrap_or_else(|| panic!("{name}'s Service has no grpc port"));
        assert_eq!(svc_grpc["port"].as_i64(), Some(grpc));

        // Probes: the kubelet cannot do mTLS, so native gRPC probes go to the
        // admin port, which serves grpc.health.v1.Health in plaintext.
        let c = container(d);
        for probe in ["readinessProbe", "startupProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_i64(),
                Some(admin),
                "{name}: {probe} is a gRPC probe of the admin port"
            );
        }
        assert_eq!(c["livenessProbe"]["grpc"]["port"].as_i64(), Some(admin));
        assert_eq!(
            c["livenessProbe"]["grpc"]["service"],
            mesh_client::server::LIVENESS_SERVICE
        );

        // Hardening.
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{name}: limits"
        );

        // Drain: the pod gets long enough to finish what it drains.
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .unwrap();
        let grace_ms: i64 = env_value(d, "DRAIN_GRACE_MS").unwrap().parse().unwrap();
        let drain_timeout = mesh_client::server::ServerConfig::default()
            .drain_timeout
            .as_secs() as i64;
        let period = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
        assert!(
            period >= pre_stop + grace_ms / 1000 + drain_timeout,
            "{name}: terminationGracePeriodSeconds {period} < preStop {pre_stop} + grace + drain timeout {drain_timeout}"
        );
        assert!(
            cluster
                .of_kind("PodDisruptionBudget")
                .any(|p| labels_match(&p["spec"]["selector"], &spec_labels(d))),
            "{name}: no PodDisruptionBudget"
        );

        // Targets: every mesh target (flags and policy) is a headless Service
        // with a grpc port, and its expected identity is that Service's pods' account.
        let policy = mesh_policy(&cluster, d);
        let mut targets: BTreeMap<String, Option<String>> = env(d)
            .iter()
            .filter(|(k, _)| k.ends_with("_TARGET"))
            .map(|(_, v)| (v["value"].as_str().unwrap().to_owned(), None))
            .collect();
        if let Some(configured) = policy["targets"].as_object() {
            for (target, t) in configured {
                targets.insert(target.clone(), t["identity"].as_str().map(str::to_owned));
            }
        }
        for (target, expected) in targets {
            let host_port = target
                .strip_prefix("dns:///")
                .unwrap_or_else(|| panic!("{name}: target {target} is not DNS"));
            let (host, port) = host_port.rsplit_once(':').unwrap();
            let callee = host
                .strip_suffix(&format!(".{namespace}.svc.cluster.local"))
                .unwrap_or_else(|| panic!("{name}: {target} is not a Service in {namespace}"));
            let callee_service = cluster
                .get("Service", callee)
                .unwrap_or_else(|| panic!("{name} calls {callee}, which has no Service"));
            assert_eq!(callee_service["spec"]["clusterIP"], "None");
            assert!(
                callee_service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "grpc" && p["port"].as_i64() == port.parse().ok()),
                "{callee}'s Service has no grpc port {port}"
            );
            let callee_sa =
                cluster.deployment(callee)["spec"]["template"]["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap();
            if let Some(expected) = expected {
                assert_eq!(expected, identity(callee_sa), "{name} → {callee} identity");
            }
            edges.insert((
                name.to_owned(),
                callee.to_owned(),
                port.parse::<i64>().unwrap(),
            ));
        }
    }

    // Authorization: every caller named is a workload here (or the
    // operator, who calls from outside), and every edge is allowed by the
    // callee's policy and by the network policies.
    for name in SERVICES {
        let policy = mesh_policy(&cluster, cluster.deployment(name));
        // Least privilege: exactly the shop's one policy (each caller holds
        // the methods it calls and no more), nothing edited by hand apart.
        assert_eq!(
            policy.get("authorization"),
            shop_kit::policy::authorization(name, "shop.local").as_ref(),
            "{name}'s mesh.json authorization differs from shop_kit::policy"
        );
        let Some(rules) = policy["authorization"]["rules"].as_array() else {
            // Only the gateway's own port is public, with no workload callers.
            assert_eq!(name, "gateway", "{name} has no authorization policy");
            continue;
        };
        for rule in rules {
            for caller in rule["callers"].as_array().unwrap() {
                let caller = caller.as_str().unwrap();
                let Some(sa) = caller.strip_prefix(&identity("")) else {
                    panic!("{name}'s policy names {caller}, outside the namespace");
                };
                assert!(
                    sa == "*" || sa == "operator" || cluster.get("ServiceAccount", sa).is_some(),
                    "{name}'s policy names {caller}, which no workload is"
                );
            }
        }
    }
    assert!(!edges.is_empty());
    // The manifests' call graph is the policy's: no workload holds
    // methods of a service it never calls, none calls without a rule.
    let configured: std::collections::BTreeSet<(String, String)> = edges
        .iter()
        .map(|(caller, callee, _)| (caller.clone(), callee.clone()))
        .collect();
    let declared = shop_kit::policy::CALLS
        .iter()
        .map(|(caller, callee, _)| (caller.to_string(), callee.to_string()))
        .collect();
    assert_eq!(
        configured, declared,
        "targets in the manifests vs shop_kit::policy::CALLS"
    );
    for (caller, callee, port) in &edges {
        let policy = mesh_policy(&cluster, cluster.deployment(callee));
        let caller_id = identity(caller);
        assert!(
            policy["authorization"]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["callers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c == caller_id.as_str())),
            "{callee}'s policy has no rule for its caller {caller}"
        );
        assert!(
            allowed(&cluster, caller, callee, *port),
            "network policies block {caller} → {callee}:{port}"
        );
    }
    // Deny by default: callees do not reach back, services do not call each other sideways.
    assert!(!allowed(&cluster, "inventory", "payments", 50051));
    assert!(!allowed(&cluster, "payments", "orders", 50051));
    for name in WITH_DATABASE {
        assert!(
            allowed(&cluster, name, "postgres", 5432),
            "{name} → postgres"
        );
    }
    assert!(!allowed(&cluster, "gateway", "postgres", 5432));
    // The gateway reaches payments for users' wallets; the mesh policy
    // (below) keeps PaymentsService itself internal.
    assert!(allowed(&cluster, "gateway", "payments", 50051));
    assert!(!allowed(&cluster, "inventory", "auth", 50051));
    assert!(!allowed(&cluster, "postgres", "orders", 50051));

    // The database credentials: one Secret per service, its URL naming its
    // own database and login.
    for name in WITH_DATABASE {
        let d = cluster.deployment(name);
        let secret = &env(d)["DATABASE_URL"]["valueFrom"]["secretKeyRef"];
        let object = cluster
            .get("Secret", secret["name"].as_str().unwrap())
            .expect("the database Secret exists");
        let url = object["stringData"]["url"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| {
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(
                            object["data"]["url"]
                                .as_str()
                                .unwrap()
                                .replace(char::is_whitespace, ""),
                        )
                        .unwrap(),
                )
                .unwrap()
            });
        assert!(
            url.starts_with(&format!("postgres://{name}:")) && url.ends_with(&format!("/{name}")),
            "{name}'s database URL {url} is not its own"
        );
    }

    // The database init script hands passwords to psql as variables
    // (quoted by psql), never pasted into the SQL text by the shell.
    let init = cluster
        .of_kind("ConfigMap")
        .find(|m| {
            m["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("postgres-init"))
        })
        .expect("the postgres-init ConfigMap")["data"]["init.sh"]
        .as_str()
        .unwrap();
    assert!(
        init.contains("<<'SQL'") && !init.contains("<<SQL"),
        "init.sh's SQL heredoc must be quoted (no shell expansion)"
    );
    let sql = init.split("<<'SQL'").nth(1).unwrap();
    assert!(
        !sql.contains('$') && sql.contains("PASSWORD :'password'"),
        "init.sh must pass passwords as psql variables: {sql}"
    );

    // No private key in any Secret of the manifests (workload keys live in
    // memory; the CA's Secret is applied apart), and no operator identity.
    for secret in cluster.of_kind("Secret") {
        let name = secret["metadata"]["name"].as_str().unwrap();
        assert!(!name.contains("operator"), "Secret {name} in the cluster");
        assert!(
            secret["data"]["tls.key"].is_null() && secret["stringData"]["tls.key"].is_null(),
            "Secret {name} holds a private key"
        );
    }
    check_identity_service(&cluster, copy.path());

    // The host reaches the gateway (and only the gateway) through kind's port mapping.
    let kind_config = std::fs::read_to_string(repo().join("k8s/kind-config.yaml")).unwrap();
    let node_ports: Vec<&Value> = cluster
        .of_kind("Service")
        .filter(|s| s["spec"]["type"] == "NodePort")
        .collect();
    assert_eq!(node_ports.len(), 1);
    assert_eq!(
        node_ports[0]["spec"]["selector"]["app.kubernetes.io/name"],
        "gateway"
    );
    let node_port = node_ports[0]["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .unwrap();
    assert!(kind_config.contains(&format!("containerPort: {node_port}")));
}

#[test]
fn one_dockerfile_builds_every_image_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for name in RUST_IMAGES {
        assert!(
            dockerfile.contains(&format!("-p {name}"))
                && dockerfile.contains(&format!("target/release/{name}")),
            "the Dockerfile does not build {name}"
        );
        // The binary the image runs is a workspace binary of that name.
        assert!(bin(name).exists());
    }
    assert!(dockerfile.contains("--build-arg SERVICE="));
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "the image runs as the uid the pods require (runAsUser 65532)"
    );
    let base = std::fs::read_to_string(repo().join("k8s/base/orders/deployment.yaml")).unwrap();
    assert!(base.contains("runAsUser: 65532") && base.contains("image: mesh-shop/orders"));
    let script = std::fs::read_to_string(repo().join("scripts/kind-up.sh")).unwrap();
    assert!(script.contains("kind load docker-image") && script.contains("mesh-shop/$svc:dev"));

    // The Python service: its own recipe, the same uid, stubs generated
    // from proto/ at build time, and kind-up builds and loads it.
    let python = std::fs::read_to_string(repo().join("Dockerfile.recommendations")).unwrap();
    assert!(python.contains("USER 65532:65532"));
    assert!(python.contains("requirements.txt") && python.contains("recommendations.stubs"));
    assert!(script.contains("-f Dockerfile.recommendations -t mesh-shop/recommendations:dev"));
    let deployment =
        std::fs::read_to_string(repo().join("k8s/base/recommendations/deployment.yaml")).unwrap();
    assert!(deployment.contains("image: mesh-shop/recommendations"));
}

/// The environment variables a clap parser reads.
fn envs_read(command: clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

fn volume<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{}: no volume {name}", deployment["metadata"]["name"]))
}

fn mount_path(deployment: &Value, name: &str) -> String {
    container(deployment)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{}: {name} not mounted", deployment["metadata"]["name"]))
        ["mountPath"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn env_of(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_owned)
}

fn mount_of(c: &Value, volume: &str) -> Option<Value> {
    c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)
        .cloned()
}

/// The identity-agent sidecar of a pod whose process reads `--tls-dir`.
fn identity_agent(d: &Value) -> Option<&Value> {
    d["spec"]["template"]["spec"]["initContainers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "identity-agent")
}

/// A workload gets its certificate from the identity service (itself, or
/// through its identity-agent sidecar): its address, a projected token
/// with the audience the service checks, the trust bundle the service's
/// own certificate chains to, the network path, and no Secret volume at
/// all.
fn check_identity_client(cluster: &Cluster, name: &str, d: &Value) {
    use clap::{Args, CommandFactory};
    let identity = cluster.deployment("identity");
    let agent = identity_agent(d);
    let (c, read) = match agent {
        Some(agent) => (agent, envs_read(identity::agent::AgentConfig::command())),
        None => (
            container(d),
            envs_read(shop_kit::MeshArgs::augment_args(clap::Command::new("x"))),
        ),
    };
    for var in ["IDENTITY_ADDR", "IDENTITY_TOKEN_FILE", "TRUST_BUNDLE"] {
        assert!(
            read.contains(var),
            "{name}: the identity client reads no {var}"
        );
        assert!(env_of(c, var).is_some(), "{name}: no {var}");
    }
    assert_eq!(
        env_of(c, "IDENTITY_ADDR").unwrap(),
        format!(
            "identity.shop.svc.cluster.local:{}",
            port_named(identity, "grpc")
        )
    );
    let token = &volume(d, "identity-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        token["audience"].as_str(),
        env_value(identity, "TOKEN_AUDIENCE").as_deref(),
        "{name}: the token's audience is the one the identity service checks"
    );
    assert!(token["expirationSeconds"].as_i64().unwrap() <= 3600);
    let mounted = |volume: &str| {
        mount_of(c, volume).unwrap_or_else(|| panic!("{name}: {volume} not mounted"))["mountPath"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        env_of(c, "IDENTITY_TOKEN_FILE").unwrap(),
        format!(
            "{}/{}",
            mounted("identity-token"),
            token["path"].as_str().unwrap()
        )
    );
    assert_eq!(
        env_of(c, "TRUST_BUNDLE").unwrap(),
        format!("{}/ca.crt", mounted("trust-bundle"))
    );
    assert_eq!(
        volume(d, "trust-bundle")["configMap"]["name"],
        volume(identity, "trust-bundle")["configMap"]["name"]
    );
    // No key in a Secret: no Secret volume, nor a Secret in a projection.
    for v in d["spec"]["template"]["spec"]["volumes"].as_array().unwrap() {
        assert!(v["secret"].is_null(), "{name} mounts a Secret: {v}");
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            assert!(source["secret"].is_null(), "{name} projects a Secret: {v}");
        }
    }
    assert!(
        allowed(cluster, name, "identity", port_named(identity, "grpc")),
        "network policies block {name} → identity"
    );
    match agent {
        None => assert!(env_value(d, "TLS_DIR").is_none(), "{name}: still file mode"),
        Some(agent) => check_identity_agent(name, d, agent, &read),
    }
}

/// The identity agent as a native sidecar: started (and ready) before the
/// app, writing into a memory-backed emptyDir the app reads, read-only,
/// as its `--tls-dir`; as the same user (the directory is 0700).
fn check_identity_agent(name: &str, d: &Value, agent: &Value, read: &BTreeSet<String>) {
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(agent["restartPolicy"], "Always", "{name}: a native sidecar");
    assert!(
        agent["image"]
            .as_str()
            .unwrap()
            .starts_with("mesh-shop/identity:")
    );
    assert_eq!(agent["args"], serde_json::json!(["agent"]));
    for e in agent["env"].as_array().unwrap() {
        let var = e["name"].as_str().unwrap();
        let telemetry = ["RUST_LOG", "LOG_FORMAT"].contains(&var);
        assert!(
            telemetry || read.contains(var),
            "identity agent reads no {var}"
        );
    }
    assert!(env_of(agent, "TLS_DIR").is_none());
    // Its files: an emptyDir in memory, mounted read-only in the app at
    // the path its TLS_DIR names.
    let out = env_of(agent, "AGENT_OUT_DIR").expect("AGENT_OUT_DIR");
    let files = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| out.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("{name}: the agent's {out} is on no volume"));
    let volume_name = files["name"].as_str().unwrap();
    assert_eq!(
        volume(d, volume_name)["emptyDir"]["medium"],
        "Memory",
        "{name}: the key stays in memory"
    );
    assert_ne!(files["readOnly"], true, "the agent writes {volume_name}");
    let app = container(d);
    let in_app = mount_of(app, volume_name)
        .unwrap_or_else(|| panic!("{name}: the app does not mount {volume_name}"));
    assert_eq!(
        in_app["readOnly"], true,
        "{name} mounts the agent's files read-only"
    );
    let relative = out
        .strip_prefix(files["mountPath"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        env_value(d, "TLS_DIR").unwrap(),
        format!("{}{relative}", in_app["mountPath"].as_str().unwrap()),
        "{name}'s TLS_DIR is the agent's output"
    );
    for var in ["IDENTITY_ADDR", "IDENTITY_TOKEN_FILE"] {
        assert!(
            env_value(d, var).is_none(),
            "{name}: the app itself has {var}"
        );
    }
    // The app starts after the agent's startup probe: /ready is 200 only
    // once the files hold a valid certificate.
    let admin = port_of(&env_of(agent, "ADMIN_ADDR").expect("agent ADMIN_ADDR"));
    assert_eq!(agent["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        agent["startupProbe"]["httpGet"]["port"].as_i64(),
        Some(admin)
    );
    assert_ne!(admin, port_named(d, "admin"), "{name}: two admin ports");
    // One user for both (a user-only directory and key).
    assert!(spec["securityContext"]["runAsUser"].is_i64());
    for c in [agent, app] {
        assert!(c["securityContext"]["runAsUser"].is_null());
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    }
}

/// The identity service's Deployment against its code, and the CA objects
/// `shopctl certs --k8s-identity-ca` makes against what it mounts.
fn check_identity_service(cluster: &Cluster, dir: &Path) {
    use clap::CommandFactory;
    let d = cluster.deployment("identity");
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(d["spec"]["replicas"].as_i64(), Some(2));
    assert_eq!(spec["serviceAccountName"], "identity");
    let read = envs_read(identity::Config::command());
    for (var, _) in env(d) {
        // Logs and traces are read by the telemetry setup, not the flags.
        let telemetry =
            ["RUST_LOG", "LOG_FORMAT"].contains(&var.as_str()) || var.starts_with("OTEL_");
        assert!(telemetry || read.contains(&var), "identity reads no {var}");
    }
    // The CA: key and certificate from the identity-ca Secret.
    let ca_dir = mount_path(d, "ca");
    assert_eq!(
        env_value(d, "CA_CERT").unwrap(),
        format!("{ca_dir}/tls.crt")
    );
    assert_eq!(env_value(d, "CA_KEY").unwrap(), format!("{ca_dir}/tls.key"));
    let secret = volume(d, "ca")["secret"]["secretName"].as_str().unwrap();
    // Secret files are root-owned; a mode without "other" read needs the
    // pod's fsGroup to be the uid's group, or the key is unreadable.
    let mode = volume(d, "ca")["secret"]["defaultMode"]
        .as_i64()
        .unwrap_or(0o644);
    if mode & 0o004 == 0 {
        assert!(
            mode & 0o040 != 0,
            "the CA key mode {mode:o} gives the group no read"
        );
        assert_eq!(
            spec["securityContext"]["fsGroup"], spec["securityContext"]["runAsGroup"],
            "the CA key (mode {mode:o}) is readable only with fsGroup = the pod's group"
        );
    }
    let bundle = volume(d, "trust-bundle")["configMap"]["name"]
        .as_str()
        .unwrap();
    let objects = documents(&identity_ca_objects(dir));
    let made = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("shopctl certs --k8s-identity-ca makes no {kind} {name}"))
            .clone()
    };
    let secret = made("Secret", secret);
    let bundle = made("ConfigMap", bundle);
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        bundle["data"]["ca.crt"].as_str().unwrap().trim(),
        String::from_utf8(ca_pem).unwrap().trim(),
        "the trust bundle is the CA's certificate"
    );
    // Token verification against the API server's published keys.
    assert!(
        env_value(d, "OIDC_DISCOVERY_URL")
            .unwrap()
            .ends_with("/.well-known/openid-configuration")
    );
    assert_eq!(spec["automountServiceAccountToken"], true);
    assert!(
        cluster.of_kind("ClusterRoleBinding").any(|b| {
            b["roleRef"]["name"] == "system:service-account-issuer-discovery"
                && b["subjects"].as_array().unwrap().iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == "identity"
                        && s["namespace"] == "shop"
                })
        }),
        "identity may not read the issuer's discovery document"
    );
    assert!(
        cluster.of_kind("NetworkPolicy").any(|p| {
            labels_match(&p["spec"]["podSelector"], &spec_labels(d))
                && p["spec"]["egress"].as_array().is_some_and(|e| {
                    e.iter().any(|r| {
                        r["ports"]
                            .as_array()
                            .is_some_and(|ports| ports.iter().any(|p| p["port"] == 443))
                    })
                })
        }),
        "identity cannot reach the API server"
    );
    // Only workloads call it; it calls no workload.
    assert!(!allowed(cluster, "identity", "orders", 50051));
    assert!(!allowed(cluster, "postgres", "identity", 50051));
    // Probes on the admin port, hardened like the rest.
    let c = container(d);
    let admin = port_named(d, "admin");
    assert_eq!(c["readinessProbe"]["grpc"]["port"].as_i64(), Some(admin));
    assert_eq!(
        c["livenessProbe"]["grpc"]["service"],
        mesh_client::server::LIVENESS_SERVICE
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        cluster.get("Service", "identity").unwrap()["spec"]["clusterIP"],
        "None"
    );
}

fn spec_labels(deployment: &Value) -> Value {
    deployment["spec"]["template"]["metadata"]["labels"].clone()
}

/// The canary overlay (docs/canary.md): the kind cluster plus an
/// inventory-canary that is inventory under another name, and orders'
/// mesh config splitting its inventory calls 90/10 between them.
#[tokio::test]
async fn the_canary_overlay_runs_inventory_again_and_splits_orders_calls_90_10() {
    if !tools_present() {
        return;
    }
    let copy = prepared_copy();
    let kind = documents(&render(&copy.path().join("k8s/overlays/kind")));
    let cluster = Cluster {
        objects: documents(&render(&copy.path().join("k8s/overlays/canary"))),
    };
    // Everything of the kind overlay is there (orders-mesh without its
    // name hash), and only the canary's own objects are new.
    let key = |o: &Value| {
        let name = o["metadata"]["name"].as_str().unwrap();
        let name = match name.starts_with("orders-mesh") {
            true => "orders-mesh",
            false => name,
        };
        (o["kind"].as_str().unwrap().to_owned(), name.to_owned())
    };
    let before: BTreeSet<_> = kind.iter().map(key).collect();
    let after: BTreeSet<_> = cluster.objects.iter().map(key).collect();
    assert!(
        after.is_superset(&before),
        "missing: {:?}",
        before.difference(&after).collect::<Vec<_>>()
    );
    for (kind, name) in after.difference(&before) {
        assert!(
            name.contains("inventory-canary"),
            "the overlay adds {kind} {name}"
        );
    }

    // The canary is inventory: same image, account (so SPIFFE identity),
    // settings and database, under its own pod label.
    let (stable, canary) = (
        cluster.deployment("inventory"),
        cluster.deployment("inventory-canary"),
    );
    assert_eq!(canary["metadata"]["namespace"], "shop");
    assert_eq!(container(canary)["image"], container(stable)["image"]);
    assert_eq!(container(canary)["imagePullPolicy"], "Never");
    let spec = |d: &Value| d["spec"]["template"]["spec"].clone();
    assert_eq!(spec(canary)["serviceAccountName"], "inventory");
    let mut stable_env = env(stable);
    let mut canary_env = env(canary);
    assert_eq!(
        canary_env.remove("OTEL_SERVICE_NAME").unwrap()["value"],
        "inventory-canary"
    );
    stable_env.remove("OTEL_SERVICE_NAME");
    assert_eq!(
        canary_env, stable_env,
        "the canary's settings are inventory's"
    );
    for field in [
        "ports",
        "readinessProbe",
        "livenessProbe",
        "startupProbe",
        "securityContext",
        "volumeMounts",
    ] {
        assert_eq!(
            container(canary)[field],
            container(stable)[field],
            "{field}"
        );
    }
    assert_eq!(spec(canary)["volumes"], spec(stable)["volumes"]);

    // Two Services, each answering for its own pods only.
    let service = |name: &str| {
        cluster
            .get("Service", name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    let selects = |svc: &Value, d: &Value| {
        labels_match(
            &serde_json::json!({"matchLabels": svc["spec"]["selector"]}),
            &spec_labels(d),
        )
    };
    assert_eq!(service("inventory-canary")["spec"]["clusterIP"], "None");
    assert!(selects(service("inventory-canary"), canary));
    assert!(!selects(service("inventory-canary"), stable));
    assert!(
        !selects(service("inventory"), canary),
        "the stable Service must not reach the canary"
    );
    assert!(
        cluster
            .of_kind("PodDisruptionBudget")
            .any(|p| labels_match(&p["spec"]["selector"], &spec_labels(canary)))
    );

    // Orders' mesh config (loaded by the real parser) routes inventory's
    // calls 90/10, the canary verified as inventory's identity; its
    // ConfigMap keeps its name, so an edit is hot-reloaded, not a rollout.
    let orders = cluster.deployment("orders");
    let volume = spec(orders)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mesh-config")
        .unwrap()
        .clone();
    assert_eq!(volume["configMap"]["name"], "orders-mesh");
    let policy = mesh_policy(&cluster, orders);
    let inventory = "dns:///inventory.shop.svc.cluster.local:50051";
    let canary_target = "dns:///inventory-canary.shop.svc.cluster.local:50051";
    assert_eq!(
        policy["targets"][canary_target]["identity"],
        "spiffe://shop.local/ns/shop/sa/inventory"
    );
    let routes = policy["targets"][inventory]["routes"].as_array().unwrap();
    let weights: BTreeMap<&str, i64> = routes[0]["backendRefs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["target"].as_str().unwrap(), b["weight"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        weights,
        BTreeMap::from([(inventory, 90), (canary_target, 10)])
    );
    // Apart from the split, orders' policy is the base one.
    let mut without = policy.clone();
    without["targets"]
        .as_object_mut()
        .unwrap()
        .remove(canary_target);
    without["targets"][inventory]
        .as_object_mut()
        .unwrap()
        .remove("routes");
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("k8s/base/orders/mesh.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        without, base,
        "the overlay's orders-mesh.json drifted from the base"
    );

    // The network lets the canary do inventory's job and no more.
    for (from, to, port) in [
        ("orders", "inventory-canary", 50051),
        ("gateway", "inventory-canary", 50051),
        ("inventory-canary", "postgres", 5432),
        ("inventory-canary", "identity", 50051),
    ] {
        assert!(
            allowed(&cluster, from, to, port),
            "{from} → {to}:{port} blocked"
        );
    }
    for (from, to, port) in [
        ("inventory-canary", "payments", 50051),
        ("inventory-canary", "orders", 50051),
        ("auth", "inventory-canary", 50051),
        ("payments", "inventory-canary", 50051),
    ] {
        assert!(
            !allowed(&cluster, from, to, port),
            "{from} → {to}:{port} allowed"
        );
    }
}
