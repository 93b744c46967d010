//! A direct writer of the Prometheus text format (0.0.4) for the families with a series per
//! app. With 1,000 apps they are most of a scrape: through the prometheus crate, every series
//! becomes a protobuf message, its labels owned strings, then everything is sorted and encoded,
//! about 40 ms a scrape; written straight from the observer's own state, a few.
//!
//! The output is what the crate's `TextEncoder` writes for the same series (values in Rust's
//! shortest round-trip form, `le` as the crate prints bounds), which a unit test holds.

use std::fmt::Write;

/// The prefix of every family the observer exports.
pub const PREFIX: &str = "rusty_workers";

/// Latency buckets (seconds) of every duration histogram: fine below 10 ms where a warm request
/// lives, coarse up to the proxy's request timeouts.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A histogram over `LATENCY_BUCKETS` (the request metrics' bounds), as plain counts: a few hundred
/// bytes per app where the crate's `Histogram` holds atomics, an `Arc` and its label values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist {
    /// Observations per bucket, not cumulative; the last is above every bound.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
}

impl Hist {
    pub fn observe(&mut self, v: f64) {
        let i = LATENCY_BUCKETS.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

pub struct Writer {
    out: String,
    /// The current family's full name.
    name: String,
    /// `LATENCY_BUCKETS` as `le` values, formatted once.
    le: Vec<String>,
    itoa: itoa::Buffer,
    /// Families not to write (their probes are missing: `coverage`), and whether the current
    /// family is one of them.
    withheld: Vec<&'static str>,
    skipping: bool,
}

/// The size of the last exposition: the next starts with room for it, not grown by doubling
/// (with 1,000 apps, megabytes copied several times over).
static LAST_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Writer {
    pub fn new() -> Self {
        let room = LAST_LEN.load(std::sync::atomic::Ordering::Relaxed);
        Writer {
            out: String::with_capacity(room + room / 8),
            name: String::new(),
            le: LATENCY_BUCKETS.iter().map(|b| b.to_string()).collect(),
            itoa: itoa::Buffer::new(),
            withheld: Vec::new(),
            skipping: false,
        }
    }

    /// Families (without the prefix) to leave out, samples and all.
    pub fn withhold(&mut self, families: Vec<&'static str>) {
        self.withheld = families;
    }

    /// Starts a family (`name` without the `rusty_workers_` prefix).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.skipping = self.withheld.contains(&name);
        if self.skipping {
            return;
        }
        self.name.clear();
        self.name.push_str(PREFIX);
        self.name.push('_');
        self.name.push_str(name);
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        self.out.push_str("# HELP ");
        self.out.push_str(&self.name);
        self.out.push(' ');
        escape_into(&mut self.out, help, false);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(&self.name);
        self.out.push(' ');
        self.out.push_str(kind);
        self.out.push('\n');
    }

    /// A sample of the current family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        if self.skipping {
            return;
        }
        self.line("", labels, None, value);
    }

    /// An integer sample (a counter's, a count's): as the float it is exposed as prints it,
    /// without the float's formatting cost.
    pub fn int(&mut self, labels: &[(&str, &str)], value: u64) {
        if self.skipping {
            return;
        }
        self.head("", labels, None);
        self.int_value(value);
    }

    fn int_value(&mut self, v: u64) {
        self.out.push(' ');
        self.out.push_str(self.itoa.format(v));
        self.out.push('\n');
    }

    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &Hist) {
        if self.skipping {
            return;
        }
        let mut cum = 0;
        for i in 0..LATENCY_BUCKETS.len() {
            cum += h.counts[i];
            self.head("_bucket", labels, Some(Le::Bound(i)));
            self.int_value(cum);
        }
        let count = h.count();
        self.head("_bucket", labels, Some(Le::Inf));
        self.int_value(count);
        self.line("_sum", labels, None, h.sum);
        self.head("_count", labels, None);
        self.int_value(count);
    }

    pub fn finish(self) -> String {
        LAST_LEN.store(self.out.len(), std::sync::atomic::Ordering::Relaxed);
        self.out
    }

    fn line(&mut self, suffix: &str, labels: &[(&str, &str)], le: Option<Le>, value: f64) {
        self.head(suffix, labels, le);
        writeln!(self.out, " {value}").expect("writing to a String");
    }

    /// A sample's name and labels.
    fn head(&mut self, suffix: &str, labels: &[(&str, &str)], le: Option<Le>) {
        let o = &mut self.out;
        o.push_str(&self.name);
        o.push_str(suffix);
        if !labels.is_empty() || le.is_some() {
            o.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                o.push_str(k);
                o.push_str("=\"");
                escape_into(o, v, true);
                o.push('"');
            }
            if let Some(le) = le {
                if !labels.is_empty() {
                    o.push(',');
                }
                o.push_str("le=\"");
                match le {
                    Le::Bound(i) => o.push_str(&self.le[i]),
                    Le::Inf => o.push_str("+Inf"),
                }
                o.push('"');
            }
            o.push('}');
        }
    }
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

enum Le {
    /// `LATENCY_BUCKETS[i]`.
    Bound(usize),
    Inf,
}

/// The text format's escapes: `\` and newline always, `"` in label values.
fn escape_into(out: &mut String, s: &str, quote: bool) {
    if !s
        .bytes()
        .any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"'))
    {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

    #[test]
    fn a_withheld_family_is_left_out_whole() {
        let mut w = Writer::new();
        w.withhold(vec!["gone_total", "gone_seconds"]);
        w.family("kept_total", Kind::Counter, "Kept.");
        w.int(&[("app", "a")], 1);
        w.family("gone_total", Kind::Counter, "Gone.");
        w.int(&[("app", "a")], 2);
        w.sample(&[("app", "a")], 2.5);
        w.family("gone_seconds", Kind::Histogram, "Gone.");
        w.histogram(&[("app", "a")], &Hist::default());
        w.family("also_kept", Kind::Gauge, "Kept.");
        w.sample(&[], 3.0);
        let out = w.finish();
        assert!(
            !out.contains("gone"),
            "a withheld family was written:\n{out}"
        );
        assert!(
            out.contains("rusty_workers_kept_total{app=\"a\"} 1\n")
                && out.contains("rusty_workers_also_kept 3\n"),
            "the other families must stay whole:\n{out}"
        );
    }

    #[test]
    fn writes_what_the_prometheus_crate_writes() {
        let help = "A help with a \\ and a\nnewline and \"quotes\".";
        let apps = ["plain", "", "a\"b\\c\nd", "ünï"];
        let samples = [0.0, 0.0005, 0.0007, 0.01, 3.5, 10.0, 11.0, 1e-9];
        let reg = Registry::new();
        let hv = HistogramVec::new(
            HistogramOpts::new(format!("{PREFIX}_h"), help).buckets(LATENCY_BUCKETS.to_vec()),
            &["app"],
        )
        .unwrap();
        let cv = IntCounterVec::new(Opts::new(format!("{PREFIX}_c_total"), help), &["app", "k"])
            .unwrap();
        reg.register(Box::new(hv.clone())).unwrap();
        reg.register(Box::new(cv.clone())).unwrap();
        let mut hists = vec![Hist::default(); apps.len()];
        for (i, app) in apps.iter().enumerate() {
            for s in &samples[..=i * 2] {
                hv.with_label_values(&[app]).observe(*s);
                hists[i].observe(*s);
            }
            cv.with_label_values(&[app, "x"])
                .inc_by(i as u64 * 1_000_000_007);
        }
        let mut want = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&reg.gather(), &mut want)
            .unwrap();
        let want = String::from_utf8(want).unwrap();

        // The crate sorts series by label values; write them in that order.
        let mut order: Vec<usize> = (0..apps.len()).collect();
        order.sort_by_key(|i| apps[*i]);
        let mut w = Writer::new();
        w.family("c_total", Kind::Counter, help);
        for i in &order {
            w.int(&[("app", apps[*i]), ("k", "x")], *i as u64 * 1_000_000_007);
        }
        w.family("h", Kind::Histogram, help);
        for i in &order {
            w.histogram(&[("app", apps[*i])], &hists[*i]);
        }
        assert_eq!(w.finish(), want);
    }

    #[test]
    fn a_histogram_puts_each_value_in_the_first_bucket_that_holds_it() {
        let cases = [
            (0.0, 0),
            (LATENCY_BUCKETS[0], 0),
            (LATENCY_BUCKETS[0] * 1.01, 1),
            (
                LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1],
                LATENCY_BUCKETS.len() - 1,
            ),
            (
                LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] + 1.0,
                LATENCY_BUCKETS.len(),
            ),
            (f64::INFINITY, LATENCY_BUCKETS.len()),
        ];
        for (v, want) in cases {
            let mut h = Hist::default();
            h.observe(v);
            assert_eq!(h.counts[want], 1, "{v} in bucket {want}: {:?}", h.counts);
            assert_eq!(h.count(), 1);
        }
    }

    #[test]
    fn escapes_as_the_text_format_says() {
        let cases = [
            ("plain", true, "plain"),
            ("a\\b", true, "a\\\\b"),
            ("a\nb", false, "a\\nb"),
            ("say \"hi\"", true, "say \\\"hi\\\""),
            ("say \"hi\"", false, "say \"hi\""),
            ("ünï", true, "ünï"),
        ];
        for (s, quote, want) in cases {
            let mut out = String::new();
            escape_into(&mut out, s, quote);
            assert_eq!(out, want, "{s:?}");
        }
    }
}
