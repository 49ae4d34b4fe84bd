//! The orders service's own metrics, served with the mesh's on the admin
//! port (`mesh_orders_*`: the process registry prefixes every name).

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

/// Labels of the refund failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabels {
    grpc_code: &'static str,
}

/// The orders service's metrics; get them with [`metrics()`].
pub(crate) struct OrdersMetrics {
    refund_failures: Family<CodeLabels, Counter>,
    /// Open WatchOrder streams.
    pub(crate) watches: Gauge,
    /// Orders with a change feed (one database poll each), however many
    /// streams watch them.
    pub(crate) watched_orders: Gauge,
}

impl OrdersMetrics {
    /// Counts one failed refund attempt (the saga retries it).
    pub(crate) fn refund_failed(&self, code: tonic::Code) {
        self.refund_failures
            .get_or_create(&CodeLabels {
                grpc_code: mesh_client::telemetry::code_name(code),
            })
            .inc();
    }
}

/// The process's orders metrics, registered on first use (once, however
/// many sagas or services a process builds).
pub(crate) fn metrics() -> &'static OrdersMetrics {
    static METRICS: OnceLock<OrdersMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = OrdersMetrics {
            refund_failures: Family::default(),
            watches: Gauge::default(),
            watched_orders: Gauge::default(),
        };
        mesh_client::telemetry::metrics().register(|r| {
            r.register(
                "orders_refund_failures",
                "Refund attempts that failed, by gRPC code; the saga retries every one \
                 (alert when it keeps rising: a cancelled order's money is still taken)",
                m.refund_failures.clone(),
            );
            r.register(
                "orders_watches",
                "Open WatchOrder streams",
                m.watches.clone(),
            );
            r.register(
                "orders_watched_orders",
                "Orders with a change feed (one shared database poll each)",
                m.watched_orders.clone(),
            );
        });
        m
    })
}
