//! Counters as Prometheus metrics. Each group of counters declares its metrics beside itself,
//! by implementing [`Export`] where it is defined; the collectors of [`super::metrics`] only
//! call them. Names are written without the registry's `shadow_` prefix, and counters without
//! their `_total`.
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// A metric's labels, in order.
pub type Labels<'l> = Vec<(&'l str, String)>;

/// A histogram as Prometheus takes it: sum, count, and `(upper bound, count)` buckets.
pub type Buckets = (f64, u64, Vec<(f64, u64)>);

/// A group of counters that writes itself as metrics.
pub trait Export {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result;
}

/// One counter.
pub fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, unit, c.metric_type())?)
}

/// One gauge.
pub fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A family of counters with one label set each.
pub fn counters<'l>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels<'l>, u64)>,
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// A family of gauges with one label set each.
pub fn gauges<'l, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'l>, V)>,
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// A family of histograms in seconds with one label set each.
pub fn histograms<'l>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'l>, Buckets)>,
) -> std::fmt::Result {
    let mut family =
        e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, (sum, count, buckets)) in rows {
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}
