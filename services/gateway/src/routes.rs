//! The route table: which methods the outside may call, which service owns
//! each, and whether it needs a user's token. Read from JSON and checked
//! against the shop's contracts at start.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::FileDescriptorSet;
use serde::Deserialize;

/// The routes the gateway ships with (`src/routes.json`).
pub const DEFAULT_ROUTES: &str = include_str!("routes.json");

/// The services a route may send calls to; each has a target flag.
pub const UPSTREAMS: [&str; 5] = ["auth", "inventory", "orders", "payments", "recommendations"];

/// Whether a route needs a user's token.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may call (login, catalogue reads).
    None,
    /// A valid token from auth is required; its subject is forwarded.
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteFile {
    routes: Vec<RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteEntry {
    /// `package.Service/Method` or `package.Service/*`.
    methods: Vec<String>,
    upstream: String,
    auth: AuthMode,
}

/// Where one public method goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// One of [`UPSTREAMS`].
    pub upstream: &'static str,
    /// Whether a token is required.
    pub auth: AuthMode,
    /// Whether the method answers with a stream (server streaming, from
    /// the contracts): such calls may live long, and go over connections
    /// of their own so they cannot take every stream of the connections
    /// unary calls share.
    pub streams: bool,
}

/// The validated table, by gRPC path (`/package.Service/Method`).
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: BTreeMap<String, Route>,
    /// Every method of the contracts, routed or not.
    known: BTreeSet<String>,
}

impl RouteTable {
    /// Parses and checks `json` against the contracts in `descriptors`:
    /// every method exists, every upstream is known, no method twice.
    /// Every problem is reported, not only the first.
    pub fn from_json(json: &str, descriptors: &[u8]) -> Result<Self, Vec<String>> {
        let file: RouteFile =
            serde_json::from_str(json).map_err(|e| vec![format!("routes: {e}")])?;
        let set = FileDescriptorSet::decode(descriptors)
            .map_err(|e| vec![format!("descriptor set: {e}")])?;
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut streaming = BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                streaming.extend(
                    service
                        .method
                        .iter()
                        .filter(|m| m.server_streaming())
                        .map(|m| format!("/{name}/{}", m.name())),
                );
                let methods = by_service.entry(name).or_default();
                methods.extend(service.method.iter().map(|m| m.name().to_owned()));
            }
        }
        let known: BTreeSet<String> = by_service
            .iter()
            .flat_map(|(s, ms)| ms.iter().map(move |m| format!("/{s}/{m}")))
            .collect();
        let mut routes = BTreeMap::new();
        let mut problems = Vec::new();
        for (i, entry) in file.routes.iter().enumerate() {
            let Some(upstream) = UPSTREAMS.iter().find(|u| **u == entry.upstream) else {
                problems.push(format!(
                    "routes[{i}].upstream: {:?} is not one of {UPSTREAMS:?}",
                    entry.upstream
                ));
                continue;
            };
            if entry.methods.is_empty() {
                problems.push(format!("routes[{i}].methods: empty"));
            }
            for (j, pattern) in entry.methods.iter().enumerate() {
                let Some((service, method)) = pattern.split_once('/') else {
                    problems.push(format!(
                        "routes[{i}].methods[{j}]: {pattern:?} is not package.Service/Method or package.Service/*"
                    ));
                    continue;
                };
                let Some(methods) = by_service.get(service) else {
                    problems.push(format!(
                        "routes[{i}].methods[{j}]: no service {service} in the contracts"
                    ));
                    continue;
                };
                let matched: Vec<&String> = if method == "*" {
                    methods.iter().collect()
                } else {
                    methods.iter().filter(|m| *m == method).collect()
                };
                if matched.is_empty() {
                    problems.push(format!(
                        "routes[{i}].methods[{j}]: {service} has no method {method}"
                    ));
                }
                for m in matched {
                    let path = format!("/{service}/{m}");
                    let route = Route {
                        upstream,
                        auth: entry.auth,
                        streams: streaming.contains(&path),
                    };
                    if routes.insert(path.clone(), route).is_some() {
                        problems.push(format!(
                            "routes[{i}].methods[{j}]: {path} is routed more than once"
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(Self { routes, known })
        } else {
            Err(problems)
        }
    }

    /// The route of `path`, if public.
    pub fn get(&self, path: &str) -> Option<&Route> {
        self.routes.get(path)
    }

    /// Whether a public method of `upstream` answers with a stream.
    pub fn streams_to(&self, upstream: &str) -> bool {
        self.routes
            .values()
            .any(|r| r.streams && r.upstream == upstream)
    }

    /// Whether `path` is a method of the contracts (routed or internal).
    pub fn is_known(&self, path: &str) -> bool {
        self.known.contains(path)
    }

    /// The services with at least one public method.
    pub fn services(&self) -> BTreeSet<&str> {
        self.routes
            .keys()
            .filter_map(|p| p.trim_start_matches('/').split_once('/'))
            .map(|(s, _)| s)
            .collect()
    }

    /// `descriptors` with every method that is not public removed (and
    /// services left without methods), so reflection shows only what the
    /// gateway serves.
    pub fn public_descriptors(&self, descriptors: &[u8]) -> Vec<u8> {
        let mut set = FileDescriptorSet::decode(descriptors).expect("checked in from_json");
        for file in &mut set.file {
            let package = file.package().to_owned();
            for service in &mut file.service {
                let name = format!("{package}.{}", service.name());
                service
                    .method
                    .retain(|m| self.routes.contains_key(&format!("/{name}/{}", m.name())));
            }
            file.service.retain(|s| !s.method.is_empty());
        }
        set.encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> Result<RouteTable, Vec<String>> {
        RouteTable::from_json(json, shop_api::FILE_DESCRIPTOR_SET)
    }

    #[test]
    fn the_default_table_is_valid_and_keeps_internal_methods_out() {
        let t = table(DEFAULT_ROUTES).unwrap();
        let login = t.get("/mesh.auth.v1.AuthService/Login").unwrap();
        assert_eq!((login.upstream, login.auth), ("auth", AuthMode::None));
        let place = t.get("/mesh.orders.v1.OrdersService/PlaceOrder").unwrap();
        assert_eq!((place.upstream, place.auth), ("orders", AuthMode::Required));
        assert!(!place.streams);
        let watch = t.get("/mesh.orders.v1.OrdersService/WatchOrder").unwrap();
        assert!(watch.streams, "WatchOrder answers with a stream");
        for internal in [
            "/mesh.payments.v1.PaymentsService/CreateCharge",
            "/mesh.inventory.v1.InventoryService/ReserveStock",
            "/mesh.auth.v1.AuthService/VerifyToken",
        ] {
            assert!(t.get(internal).is_none(), "{internal} must stay internal");
            assert!(t.is_known(internal));
        }
        assert!(!t.services().contains("mesh.payments.v1.PaymentsService"));
        let deposit = t.get("/mesh.payments.v1.WalletService/Deposit").unwrap();
        assert_eq!(
            (deposit.upstream, deposit.auth),
            ("payments", AuthMode::Required)
        );
    }

    #[test]
    fn every_problem_is_named() {
        let problems = table(
            r#"{"routes": [
                {"methods": ["mesh.nope.v1.X/Y", "mesh.auth.v1.AuthService/Nope", "bad"], "upstream": "auth", "auth": "none"},
                {"methods": ["mesh.auth.v1.AuthService/Login"], "upstream": "billing", "auth": "none"},
                {"methods": ["mesh.auth.v1.AuthService/Login", "mesh.auth.v1.AuthService/Login"], "upstream": "auth", "auth": "none"}
            ]}"#,
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "no service mesh.nope.v1.X",
            "has no method Nope",
            "\"bad\" is not package.Service/Method",
            "\"billing\" is not one of",
            "routed more than once",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(table(r#"{"routes": [], "extra": 1}"#).is_err());
    }

    #[test]
    fn reflection_sees_only_public_methods() {
        let t = table(DEFAULT_ROUTES).unwrap();
        let public = t.public_descriptors(shop_api::FILE_DESCRIPTOR_SET);
        let set = FileDescriptorSet::decode(&public[..]).unwrap();
        let methods: BTreeSet<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service.iter().flat_map(move |s| {
                    s.method
                        .iter()
                        .map(move |m| format!("{}.{}/{}", f.package(), s.name(), m.name()))
                })
            })
            .collect();
        assert!(methods.contains("mesh.orders.v1.OrdersService/PlaceOrder"));
        assert!(methods.contains("mesh.inventory.v1.InventoryService/GetProduct"));
        assert!(!methods.contains("mesh.inventory.v1.InventoryService/ReserveStock"));
        assert!(methods.contains("mesh.payments.v1.WalletService/Deposit"));
        assert!(
            !methods
                .iter()
                .any(|m| m.starts_with("mesh.payments.v1.PaymentsService"))
        );
    }
}
