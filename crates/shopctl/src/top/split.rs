//! The live view's route split: for a caller's routed calls (outbound
//! series carrying the mesh's `route` and `backend` labels), each
//! backend's rate, share of its route and health, so a canary's weight
//! shift (10 → 50 → 100) shows as it happens.

use std::{collections::BTreeMap, io::Write};

use serde::Serialize;

use super::{Key, Row, Sample, Totals};

/// A caller, its peer, a route and one of the route's backends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SplitKey {
    from: String,
    to: String,
    route: String,
    backend: String,
}

/// The split key of an outbound sample of a routed call.
pub(super) fn key(me: &str, s: &Sample) -> Option<Key> {
    let route = s.label("route");
    if route.is_empty() || s.label("direction") != "outbound" {
        return None;
    }
    Some(Key::Split(SplitKey {
        from: me.to_owned(),
        to: s.label("peer").to_owned(),
        route: route.to_owned(),
        backend: s.label("backend").to_owned(),
    }))
}

/// One backend of one route of one edge.
#[derive(Debug, Serialize)]
pub(super) struct SplitRow {
    from: String,
    to: String,
    route: String,
    backend: String,
    /// This backend's share of the route's responses in the window (0 to
    /// 1); null without responses.
    share: Option<f64>,
    #[serde(flatten)]
    row: Row,
}

/// The split rows of a window's sums, by edge, route and backend.
pub(super) fn rows(sums: &BTreeMap<Key, Totals>, row: impl Fn(&Totals) -> Row) -> Vec<SplitRow> {
    let mut per_route: BTreeMap<(&str, &str, &str), f64> = BTreeMap::new();
    for (key, t) in sums {
        if let Key::Split(k) = key {
            *per_route.entry((&k.from, &k.to, &k.route)).or_default() += t.responses;
        }
    }
    sums.iter()
        .filter_map(|(key, t)| match key {
            Key::Split(k) => {
                let total = per_route[&(k.from.as_str(), k.to.as_str(), k.route.as_str())];
                Some(SplitRow {
                    from: k.from.clone(),
                    to: k.to.clone(),
                    route: k.route.clone(),
                    backend: k.backend.clone(),
                    share: (total > 0.0).then(|| t.responses / total),
                    row: row(t),
                })
            }
            _ => None,
        })
        .collect()
}

/// A backend target as the table shows it: a DNS target's host's first
/// label (`inventory-canary`), anything else as written.
fn short(backend: &str) -> &str {
    match backend.strip_prefix("dns:///") {
        Some(host) => host.split(['.', ':']).next().unwrap_or(host),
        None => backend,
    }
}

/// The section, when any route carried calls.
pub(super) fn print(out: &mut impl Write, rows: &[SplitRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<40} {:>9} {:>7} {:>9} {:>10}",
        "ROUTE SPLIT (edge route: backend)", "RPS", "SHARE", "SUCCESS", "P99"
    )?;
    for r in rows {
        let name = format!("{} -> {} {}: {}", r.from, r.to, r.route, short(&r.backend));
        writeln!(
            out,
            "{name:<40} {:>9.1} {:>7} {:>9} {:>10}",
            r.row.rps,
            r.share.map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
            r.row
                .success_rate
                .map_or("-".into(), |v| format!("{:.2}%", v * 100.0)),
            r.row.p99_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{View, parse};

    #[test]
    fn a_routed_edge_shows_each_backend_s_share() {
        let scrape = |stable: u32, canary: u32| {
            let text = format!(
                concat!(
                    "mesh_process_info{{service=\"orders\",identity=\"x\"}} 1\n",
                    "mesh_responses_total{{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\",route=\"split\",backend=\"dns:///inventory.shop.svc.cluster.local:50052\",grpc_code=\"OK\"}} {}\n",
                    "mesh_responses_total{{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\",route=\"split\",backend=\"dns:///inventory-canary.shop.svc.cluster.local:50052\",grpc_code=\"OK\"}} {}\n",
                    "mesh_responses_total{{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\",grpc_code=\"OK\"}} 5\n",
                ),
                stable, canary
            );
            vec![("127.0.0.1:9054".parse().unwrap(), Some(parse(&text)))]
        };
        let view = View::between(&scrape(0, 0), &scrape(90, 10), 1.0);
        let json = serde_json::to_value(&view).unwrap();
        let splits = json["splits"].as_array().unwrap();
        assert_eq!(splits.len(), 2);
        let canary = splits
            .iter()
            .find(|s| s["backend"].as_str().unwrap().contains("canary"))
            .unwrap();
        assert_eq!(canary["share"].as_f64().unwrap(), 0.1);
        assert_eq!(canary["rps"].as_f64().unwrap(), 10.0);
        // The edge still counts every call, routed or not.
        assert_eq!(json["edges"][0]["responses"].as_f64().unwrap(), 100.0);
        let mut table = Vec::new();
        view.print_table(&mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(
            table.contains("orders -> inventory split: inventory-canary"),
            "{table}"
        );
        assert!(table.contains("10.0%"), "{table}");
    }
}
