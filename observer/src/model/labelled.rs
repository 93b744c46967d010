//! A histogram family labelled by runtime and method, observed without a label lookup and
//! without atomics.

use foldhash::{HashMap, HashMapExt};
use observer_common::method;
use prometheus::local::LocalHistogram;
use prometheus::HistogramVec;

/// A `HistogramVec` labelled (`runtime`, `method`) that keeps a local histogram per series by
/// runtime name and method id. `with_label_values` hashes both labels (SipHash) and takes the
/// vector's lock on every call, and a shared `Histogram`'s `observe` is four atomic updates:
/// together the largest item of the observer's CPU at saturation (14%, `perf record
/// --call-graph dwarf` on the drain), where every request observes two of these. A
/// `LocalHistogram` (the prometheus crate's own) counts in plain memory and adds its counts to
/// the series when flushed: `vec()` flushes every series first, so whatever reads the family
/// (a scrape's collectors, a test) sees every observation. Series are never removed from these
/// vectors, so a kept handle stays the exported series.
pub struct RuntimeMethodHistograms {
    vec: HistogramVec,
    kept: HashMap<String, [Option<LocalHistogram>; method::COUNT as usize]>,
}

impl RuntimeMethodHistograms {
    /// `vec` must have the labels `runtime`, `method`, in that order.
    pub fn new(vec: HistogramVec) -> Self {
        RuntimeMethodHistograms {
            vec,
            kept: HashMap::new(),
        }
    }

    /// The family, every observation flushed into it, for collectors and tests.
    pub fn vec(&self) -> &HistogramVec {
        for series in self.kept.values().flatten().flatten() {
            series.flush();
        }
        &self.vec
    }

    /// Observes `seconds` in the series of `runtime` and method `m` (`method::*`; past them
    /// `unknown`).
    pub fn observe(&mut self, runtime: &str, m: u32, seconds: f64) {
        let name = method::name(m);
        let by_method = match self.kept.get_mut(runtime) {
            Some(k) => k,
            None => self
                .kept
                .entry(runtime.to_string())
                .or_insert_with(|| std::array::from_fn(|_| None)),
        };
        by_method[method::known(m) as usize]
            .get_or_insert_with(|| self.vec.with_label_values(&[runtime, name]).local())
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::HistogramOpts;

    #[test]
    fn kept_handles_observe_into_the_exported_series() {
        let vec = HistogramVec::new(HistogramOpts::new("h", "h"), &["runtime", "method"])
            .expect("valid histogram");
        let mut h = RuntimeMethodHistograms::new(vec.clone());
        h.observe("a:1", method::FETCH, 0.5);
        h.observe("a:1", method::FETCH, 0.25);
        h.observe("b:2", method::FETCH, 1.0);
        h.observe("a:1", 99, 1.0);
        assert_eq!(
            vec.with_label_values(&["a:1", "fetch"]).get_sample_count(),
            0,
            "observations are local until the family is read"
        );
        let vec = h.vec();
        let count = |rt: &str, m: &str| vec.with_label_values(&[rt, m]).get_sample_count();
        assert_eq!(
            count("a:1", "fetch"),
            2,
            "both observations in a:1's fetch series"
        );
        assert_eq!(count("b:2", "fetch"), 1, "b:2 has its own series");
        assert_eq!(
            count("a:1", "unknown"),
            1,
            "a method past the known ones is unknown"
        );
        assert_eq!(
            vec.with_label_values(&["a:1", "fetch"]).get_sample_sum(),
            0.75,
            "the sum is the series'"
        );
    }
}
