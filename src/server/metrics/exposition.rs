//! The `/metrics` page, beside the echo flow: the server's counts in the
//! Prometheus text format, written by the official `prometheus-client`
//! crate from a [`Registry`] of our own (no global one), as its examples
//! wire it.
//!
//! Nothing is counted here. A [`Collector`] reads the server's
//! [`Snapshot`] at each scrape, from the per-thread counters the summary
//! line at exit is made of, so the two never disagree.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::server::Monitor;
use crate::server::stats::Snapshot;

/// The content type of the page: the Prometheus text format 0.0.4.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The prefix of every metric's name.
const PREFIX: &str = "echo";

/// The registry behind the page.
#[derive(Debug)]
pub(crate) struct Exposition {
    registry: Registry,
}

impl Exposition {
    /// A registry reading `monitor` at each scrape.
    pub(crate) fn new(monitor: Monitor) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "build",
            "The server's version; always 1",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(ServerCollector { monitor }));
        Exposition { registry }
    }

    /// The page as it reads now.
    ///
    /// # Errors
    /// When the encoder refuses a metric, which names fixed here never make
    /// it do.
    pub(crate) fn render(&self) -> Result<String, fmt::Error> {
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &self.registry)?;
        Ok(page)
    }
}

/// Reads the server's counts at each scrape.
#[derive(Debug)]
struct ServerCollector {
    monitor: Monitor,
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        encode_snapshot(&self.monitor.snapshot(), &mut encoder)
    }
}

/// Writes every metric of `snapshot`. The names get the `echo_` prefix,
/// their unit and, for counters, `_total` from the encoder.
fn encode_snapshot(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let summary = &snapshot.summary;
    gauge(
        encoder,
        "connections_open",
        "TCP connections open now",
        snapshot.open_connections as i64,
    )?;
    counter(
        encoder,
        "connections",
        "TCP connections served (handed to a worker); the summary's connections served",
        None,
        summary.connections_served,
    )?;
    counter_by_reason(
        encoder,
        "connections_refused",
        "TCP connections closed at once at a limit (max-connections, per-ip; their sum is \
         the summary's connections refused), and accept calls that failed for want of \
         descriptors (out-of-descriptors) or of other resources (accept-error) while the \
         client waited in the backlog",
        &[
            ("max-connections", snapshot.refused_server_full),
            ("per-ip", snapshot.refused_address_full),
            ("out-of-descriptors", snapshot.accept_out_of_descriptors),
            ("accept-error", snapshot.accept_failed),
        ],
    )?;
    counter(
        encoder,
        "idle_timeouts",
        "TCP connections closed for staying idle past --idle-timeout",
        None,
        snapshot.idle_timeouts,
    )?;
    counter(
        encoder,
        "received",
        "Bytes read from TCP connections for echoing, counted as they arrive",
        Some(&Unit::Bytes),
        summary.bytes_received,
    )?;
    counter(
        encoder,
        "echoed",
        "Bytes written back on TCP connections, counted as they leave",
        Some(&Unit::Bytes),
        summary.bytes_echoed,
    )?;
    counter(
        encoder,
        "discarded",
        "Bytes read after a connection's sending side was shut, thrown away",
        Some(&Unit::Bytes),
        summary.bytes_discarded,
    )?;
    counter(
        encoder,
        "connections_cut",
        "TCP connections still busy when the shutdown deadline came",
        None,
        summary.connections_cut,
    )?;
    gauge(
        encoder,
        "shutting_down",
        "1 from the first stop signal on (not ready: the drain delay, then the drain), else 0",
        i64::from(snapshot.shutting_down),
    )?;
    counter(
        encoder,
        "worker_sleeps",
        "Times a worker slept waiting for events",
        None,
        summary.worker_sleeps,
    )?;
    counter(
        encoder,
        "busy_poll_catches",
        "Waits that busy polling ended with events, sparing a sleep",
        None,
        summary.busy_poll_catches,
    )?;
    if let Some(proxy) = &summary.proxy {
        counter_by_reason(
            encoder,
            "proxy_protocol_refused",
            "TCP connections closed for the PROXY protocol: from a source outside \
             --proxy-from (untrusted-source), or without a valid header in time (bad-header)",
            &[
                ("untrusted-source", proxy.untrusted_sources),
                ("bad-header", proxy.bad_headers),
            ],
        )?;
    }
    let Some(udp) = &summary.udp else {
        return Ok(());
    };
    counter(
        encoder,
        "udp_datagrams_received",
        "UDP datagrams taken from the sockets, answered or not",
        None,
        udp.datagrams_received,
    )?;
    counter(
        encoder,
        "udp_datagrams_echoed",
        "UDP datagrams sent back",
        None,
        udp.datagrams_echoed,
    )?;
    counter(
        encoder,
        "udp_echoed",
        "Bytes in the UDP datagrams sent back",
        Some(&Unit::Bytes),
        udp.bytes_echoed,
    )?;
    counter_by_reason(
        encoder,
        "udp_datagrams_dropped",
        "UDP datagrams not answered: from a source never answered (refused-source), over \
         their source's rate (rate-limited), or whose echo could not be sent (send-failed)",
        &[
            ("refused-source", udp.refused_source),
            ("rate-limited", udp.rate_limited),
            ("send-failed", udp.send_failed),
        ],
    )
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One counter with a `reason` label per cause.
fn counter_by_reason(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    reasons: &[(&str, u64)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for &(reason, value) in reasons {
        let labels = [("reason", reason)];
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::stats::{Summary, UdpSummary};

    fn page(snapshot: &Snapshot) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(Fixed(*snapshot)));
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &registry)
            .expect("encodes");
        page
    }

    #[derive(Debug)]
    struct Fixed(Snapshot);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
            encode_snapshot(&self.0, &mut encoder)
        }
    }

    #[test]
    fn each_count_appears_under_its_prometheus_name() {
        let snapshot = Snapshot {
            summary: Summary {
                connections_served: 11,
                connections_refused: 5,
                bytes_received: 1000,
                bytes_echoed: 999,
                connections_cut: 2,
                bytes_discarded: 7,
                worker_sleeps: 40,
                busy_poll_catches: 3,
                udp: Some(UdpSummary {
                    datagrams_received: 30,
                    datagrams_echoed: 20,
                    bytes_echoed: 200,
                    refused_source: 4,
                    rate_limited: 5,
                    send_failed: 1,
                }),
                proxy: Some(crate::server::stats::ProxySummary {
                    untrusted_sources: 12,
                    bad_headers: 13,
                }),
            },
            open_connections: 6,
            refused_server_full: 3,
            refused_address_full: 2,
            accept_out_of_descriptors: 8,
            accept_failed: 9,
            idle_timeouts: 4,
            shutting_down: true,
        };
        let page = page(&snapshot);
        for line in [
            "# TYPE echo_connections_open gauge",
            "echo_connections_open 6",
            "# TYPE echo_connections_total counter",
            "echo_connections_total 11",
            "echo_connections_refused_total{reason=\"max-connections\"} 3",
            "echo_proxy_protocol_refused_total{reason=\"untrusted-source\"} 12",
            "echo_proxy_protocol_refused_total{reason=\"bad-header\"} 13",
            "echo_connections_refused_total{reason=\"per-ip\"} 2",
            "echo_connections_refused_total{reason=\"out-of-descriptors\"} 8",
            "echo_connections_refused_total{reason=\"accept-error\"} 9",
            "echo_idle_timeouts_total 4",
            "echo_received_bytes_total 1000",
            "echo_echoed_bytes_total 999",
            "echo_discarded_bytes_total 7",
            "echo_connections_cut_total 2",
            "echo_shutting_down 1",
            "echo_worker_sleeps_total 40",
            "echo_busy_poll_catches_total 3",
            "echo_udp_datagrams_received_total 30",
            "echo_udp_datagrams_echoed_total 20",
            "echo_udp_echoed_bytes_total 200",
            "echo_udp_datagrams_dropped_total{reason=\"refused-source\"} 4",
            "echo_udp_datagrams_dropped_total{reason=\"rate-limited\"} 5",
            "echo_udp_datagrams_dropped_total{reason=\"send-failed\"} 1",
        ] {
            assert!(
                page.lines().any(|got| got == line),
                "no line {line:?} in:\n{page}"
            );
        }
    }

    #[test]
    fn udp_metrics_appear_only_when_udp_is_served() {
        let page = page(&Snapshot::default());
        assert!(page.contains("echo_shutting_down 0"), "{page}");
        assert!(!page.contains("udp"), "{page}");
    }
}
