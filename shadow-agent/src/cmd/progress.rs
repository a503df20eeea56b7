//! What `run` and `replay` print for their operator on stderr: the rates every
//! `--report-interval`, and the summary at exit. Text from counters, no I/O: the driver prints
//! it.
use std::time::Instant;

use shadow_agent::capture::live::CaptureTotals;
use shadow_agent::mirror::stats::{Answers, CopyDrop, MirrorStats};

use crate::cmd::common::{self, human_bytes};

/// The mirror's counters at one instant, per route and per target, for rates between two.
#[derive(Clone, Debug)]
pub struct Progress {
    at: Instant,
    routes: Vec<RouteReading>,
    targets: Vec<TargetReading>,
}

#[derive(Clone, Debug)]
struct RouteReading {
    name: String,
    seen: u64,
    copies: u64,
    bytes: u64,
}

#[derive(Clone, Debug)]
struct TargetReading {
    url: String,
    sent: u64,
    bytes: u64,
    /// By the budget or the lanes' limits, every reason together.
    dropped: u64,
}

impl Progress {
    pub fn read(stats: &MirrorStats, at: Instant) -> Self {
        Self {
            at,
            routes: stats
                .routes()
                .iter()
                .map(|(name, r)| RouteReading {
                    name: name.clone(),
                    seen: r.seen.get(),
                    copies: r.copies.get(),
                    bytes: r.copy_bytes.get(),
                })
                .collect(),
            targets: stats
                .targets()
                .iter()
                .map(|(url, t)| TargetReading {
                    url: url.clone(),
                    sent: t.sent.get(),
                    bytes: t.sent_bytes.get(),
                    dropped: CopyDrop::ALL.iter().map(|d| t.dropped(*d).get()).sum(),
                })
                .collect(),
        }
    }

    /// The rates from `before` to this reading. Routes and targets that a reload added since
    /// count from zero.
    pub fn rates_since(
        &self,
        before: &Progress,
        dry_run: bool,
        ramp_percent: Option<f64>,
    ) -> String {
        let secs = self
            .at
            .saturating_duration_since(before.at)
            .as_secs_f64()
            .max(1e-3);
        let verb = if dry_run { "would send" } else { "sent" };
        let mut out = format!(
            "shadow-agent: {} over the last {secs:.0}s{}:\n",
            if dry_run { "dry run" } else { "mirroring" },
            ramp_percent
                .map(|p| format!(" (ramp at {p}%)"))
                .unwrap_or_default()
        );
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        for r in &self.routes {
            let then = before.routes.iter().find(|b| b.name == r.name);
            let (seen, copies, bytes) = then.map_or((0, 0, 0), |b| (b.seen, b.copies, b.bytes));
            out += &format!(
                "  route {}: {:.1} requests/s seen, {verb} {:.1} copies/s, {}/s\n",
                r.name,
                rate(r.seen, seen),
                rate(r.copies, copies),
                human_bytes(rate(r.bytes, bytes)),
            );
        }
        for t in &self.targets {
            let then = before.targets.iter().find(|b| b.url == t.url);
            let (sent, bytes, dropped) = then.map_or((0, 0, 0), |b| (b.sent, b.bytes, b.dropped));
            out += &format!(
                "  target {}: {verb} {:.1} copies/s, {}/s; {:.1}/s dropped by budget or limits\n",
                t.url,
                rate(t.sent, sent),
                human_bytes(rate(t.bytes, bytes)),
                rate(t.dropped, dropped),
            );
        }
        out
    }
}

/// Everything at exit: per route and target what was mirrored and how the shadows answered,
/// then the capture's counters.
pub fn summary(
    stats: &MirrorStats,
    totals: &CaptureTotals,
    requests: u64,
    secs: f64,
    dry_run: bool,
) -> String {
    let mut out = mirror_summary(stats, requests, secs, dry_run);
    out += &common::table("kernel counters", &common::kernel_fields(&totals.kernel));
    out += &common::table("ring counters", &common::ring_fields(&totals.ring));
    out += &common::interface_tables(
        &totals.interfaces,
        totals.interfaces_uncounted,
        &totals.attach_failures,
    );
    out
}

/// Per route and target what was mirrored and how the shadows answered: the part of the
/// summary that does not depend on where the packets came from.
pub fn mirror_summary(stats: &MirrorStats, requests: u64, secs: f64, dry_run: bool) -> String {
    let secs = secs.max(1e-3);
    let verb = if dry_run { "would have sent" } else { "sent" };
    let mut out = format!(
        "shadow-agent: {} for {secs:.1}s; {requests} requests rebuilt\n",
        if dry_run { "dry run" } else { "mirrored" },
    );
    for (name, r) in stats.routes() {
        out += &format!(
            "  route {name}: {} seen, {} mirrored; {verb} {} copies ({:.1}/s, {}/s); shadow: {}\n",
            r.seen.get(),
            r.mirrored.get(),
            r.copies.get(),
            r.copies.get() as f64 / secs,
            human_bytes(r.copy_bytes.get() as f64 / secs),
            answered(&r.answers),
        );
    }
    for (url, t) in stats.targets() {
        out += &format!(
            "  target {url}: {verb} {} copies ({:.1}/s); {}\n",
            t.sent.get(),
            t.sent.get() as f64 / secs,
            answered(&t.answers),
        );
    }
    out
}

fn answered(a: &Answers) -> String {
    let latency = a.latency.snapshot();
    let ms = |q| {
        latency.quantile(q).map_or("-".to_owned(), |d| {
            format!("{:.1}ms", d.as_secs_f64() * 1e3)
        })
    };
    format!(
        "{} answered 2xx, {} errors, {} abandoned; p50 {} p99 {}",
        a.responses(2),
        a.errors(),
        a.abandoned.get(),
        ms(0.5),
        ms(0.99)
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rates_are_differences_over_the_interval() {
        let stats = MirrorStats::default();
        let t0 = Instant::now();
        stats.route("api").seen.add(10);
        let before = Progress::read(&stats, t0);
        let route = stats.route("api");
        route.seen.add(40);
        route.copies.add(20);
        route.copy_bytes.add(20 * 1024);
        let target = stats.target("http://shadow:8080");
        target.sent.add(20);
        target.sent_bytes.add(2048);
        target.dropped(CopyDrop::ALL[0]).add(4);
        let now = Progress::read(&stats, t0 + Duration::from_secs(2));
        assert_eq!(
            now.rates_since(&before, false, Some(25.0)),
            "shadow-agent: mirroring over the last 2s (ramp at 25%):\n  \
             route api: 20.0 requests/s seen, sent 10.0 copies/s, 10.0 KiB/s\n  \
             target http://shadow:8080: sent 10.0 copies/s, 1.0 KiB/s; 2.0/s dropped by budget \
             or limits\n"
        );
        // A reading taken before a counter existed, or out of order, never underflows.
        let dry = before.rates_since(&now, true, None);
        assert!(
            dry.starts_with("shadow-agent: dry run over the last 0s:\n  route api: 0.0"),
            "{dry}"
        );
    }

    #[test]
    fn summary_names_every_route_and_target() {
        let stats = MirrorStats::default();
        let route = stats.route("api");
        route.seen.add(8);
        route.mirrored.add(6);
        route.copies.add(6);
        stats.target("http://shadow:8080").sent.add(6);
        let mut totals = CaptureTotals::default();
        totals.kernel.packets_seen = 99;
        let text = summary(&stats, &totals, 8, 2.0, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "shadow-agent: dry run for 2.0s; 8 requests rebuilt"
        );
        assert_eq!(
            lines[1],
            "  route api: 8 seen, 6 mirrored; would have sent 6 copies (3.0/s, 0 B/s); shadow: 0 \
             answered 2xx, 0 errors, 0 abandoned; p50 - p99 -"
        );
        assert_eq!(
            lines[2],
            "  target http://shadow:8080: would have sent 6 copies (3.0/s); 0 answered 2xx, 0 \
             errors, 0 abandoned; p50 - p99 -"
        );
        assert!(lines.contains(&"  packets_seen         99"), "{text}");
    }
}
