//! Which providers can run a job, and why the others cannot. Pure: providers and requirements
//! in, a ranking and reasons out.

use std::collections::BTreeMap;

use proto::PublicKey;
use proto::api::{NoMatch, ReasonCount};
use proto::msg::{GpuInfo, Price, Requirements};

/// What matching needs to know of a provider, borrowed from the registry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate<'a> {
    pub key: PublicKey,
    pub region: &'a str,
    pub gpus: &'a [GpuInfo],
    /// Per GPU, its name and vendor in lower case (see [`gpu_search`]), so matching allocates
    /// nothing.
    pub gpu_search: &'a [String],
    pub price: Price,
    pub capacity: u32,
    pub running: u32,
    pub online: bool,
    pub rtt_ms: Option<u32>,
}

/// The lower-case text a GPU's model requirement is matched against.
pub fn gpu_search(g: &GpuInfo) -> String {
    format!("{} {}", g.name, g.vendor).to_lowercase()
}

/// Why a provider does not fit, in the order they are checked; a provider is counted under the
/// first one only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Offline,
    GpuCount,
    Vram,
    Gpu,
    Backend,
    Region,
    Price,
    Rtt,
    Busy,
    /// Every session slot is taken (for sessions, which have slots of their own).
    SessionsFull,
}

impl Reason {
    pub fn key(self) -> &'static str {
        match self {
            Reason::Offline => "offline",
            Reason::GpuCount => "gpu_count",
            Reason::Vram => "vram",
            Reason::Gpu => "gpu",
            Reason::Backend => "backend",
            Reason::Region => "region",
            Reason::Price => "price",
            Reason::Rtt => "rtt",
            Reason::Busy => "busy",
            Reason::SessionsFull => "sessions_full",
        }
    }

    fn phrase(self, n: u32) -> String {
        let (one, many) = match self {
            Reason::Offline => ("is offline", "are offline"),
            Reason::GpuCount => ("has too few GPUs", "have too few GPUs"),
            Reason::Vram => ("has too little VRAM", "have too little VRAM"),
            Reason::Gpu => ("has another GPU model", "have another GPU model"),
            Reason::Backend => ("has another backend", "have another backend"),
            Reason::Region => ("is in another region", "are in other regions"),
            Reason::Price => ("is over your price", "are over your price"),
            Reason::Rtt => ("is too far away (round trip)", "are too far away (round trip)"),
            Reason::Busy => ("is busy (at capacity)", "are busy (at capacity)"),
            Reason::SessionsFull => (
                "has no room for another session (its slots or its memory for sessions)",
                "have no room for another session (their slots or their memory for sessions)",
            ),
        };
        format!("{n} {}", if n == 1 { one } else { many })
    }
}

/// Requirements prepared for matching many providers: lower-cased once.
#[derive(Clone, Debug)]
pub struct Query {
    want: usize,
    min_vram: Option<u64>,
    gpu: Option<String>,
    backend: Option<String>,
    region: Option<String>,
    max_price: Option<u64>,
    max_rtt_ms: Option<u32>,
    /// Sessions are priced per inference, batch jobs per GPU-second.
    session: bool,
}

impl Query {
    pub fn new(req: &Requirements, session: bool) -> Query {
        Query {
            want: req.gpu_count.unwrap_or(1).max(1) as usize,
            min_vram: req.min_vram_bytes,
            gpu: req.gpu.as_ref().map(|g| g.to_lowercase()),
            backend: req.backend.clone(),
            region: req.region.clone(),
            max_price: if session { req.max_price_per_inference } else { req.max_price_per_gpu_second },
            max_rtt_ms: req.max_rtt_ms,
            session,
        }
    }

    pub fn price(&self, c: &Candidate<'_>) -> u64 {
        if self.session { c.price.per_inference } else { c.price.per_gpu_second }
    }

    /// Whether GPU `i` of `c` meets the per-GPU requirements (memory, model, backend).
    pub fn gpu_fits(&self, c: &Candidate<'_>, i: usize) -> bool {
        let Some(g) = c.gpus.get(i) else { return false };
        self.min_vram.is_none_or(|v| g.vram_bytes >= v)
            && self.gpu.as_ref().is_none_or(|p| c.gpu_search.get(i).is_some_and(|s| s.contains(p.as_str())))
            && self.backend.as_ref().is_none_or(|b| g.backend.eq_ignore_ascii_case(b))
    }

    /// The same requirements asked of one GPU at a time (a gang's members).
    pub fn per_gpu(&self) -> Query {
        Query { want: 1, ..self.clone() }
    }

    /// The first reason `c` cannot take the job, if any. `ignore_load` treats a provider at
    /// capacity as fitting (the job only has to wait its turn).
    pub fn reject(&self, c: &Candidate<'_>, ignore_load: bool) -> Option<Reason> {
        if !c.online {
            return Some(Reason::Offline);
        }
        if c.gpus.len() < self.want {
            return Some(Reason::GpuCount);
        }
        // Narrow step by step so the reason names the first requirement that fails.
        let vram = |g: &GpuInfo| self.min_vram.is_none_or(|v| g.vram_bytes >= v);
        let model = |i: usize| match &self.gpu {
            None => true,
            Some(p) => c.gpu_search.get(i).is_some_and(|s| s.contains(p.as_str())),
        };
        let backend = |g: &GpuInfo| self.backend.as_ref().is_none_or(|b| g.backend.eq_ignore_ascii_case(b));
        if c.gpus.iter().filter(|g| vram(g)).count() < self.want {
            return Some(Reason::Vram);
        }
        if c.gpus.iter().enumerate().filter(|(i, g)| vram(g) && model(*i)).count() < self.want {
            return Some(Reason::Gpu);
        }
        if c.gpus.iter().enumerate().filter(|(i, g)| vram(g) && model(*i) && backend(g)).count() < self.want {
            return Some(Reason::Backend);
        }
        if self.region.as_ref().is_some_and(|r| !c.region.eq_ignore_ascii_case(r)) {
            return Some(Reason::Region);
        }
        if self.max_price.is_some_and(|p| self.price(c) > p) {
            return Some(Reason::Price);
        }
        if self.max_rtt_ms.is_some_and(|max| c.rtt_ms.is_none_or(|r| r > max)) {
            return Some(Reason::Rtt);
        }
        if !ignore_load && c.running >= c.capacity {
            return Some(if self.session { Reason::SessionsFull } else { Reason::Busy });
        }
        None
    }
}

/// Why no provider fits: every candidate counted once, under the first requirement it fails.
pub fn explain<'a>(candidates: impl Iterator<Item = Candidate<'a>>, query: &Query, ignore_load: bool) -> NoMatch {
    let mut reasons: BTreeMap<Reason, u32> = BTreeMap::new();
    let mut total = 0u32;
    let mut matching = 0u32;
    for c in candidates {
        total += 1;
        match query.reject(&c, ignore_load) {
            None => matching += 1,
            Some(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    let summary = if total == 0 {
        "0 of 0 providers match: no provider has registered yet".to_string()
    } else {
        let parts: Vec<String> = reasons.iter().map(|(r, n)| r.phrase(*n)).collect();
        format!("{matching} of {total} providers match: {}", parts.join(", "))
    };
    let reasons = reasons.into_iter().map(|(r, count)| ReasonCount { reason: r.key().to_string(), count }).collect();
    NoMatch { total, matching, reasons, summary }
}

/// The providers that fit, best first (cheapest, then least loaded, then nearest), and an
/// explanation when none does. A full scan: the scheduler's hot path walks its price index
/// instead.
pub fn rank<'a>(
    candidates: &[Candidate<'a>],
    req: &Requirements,
    session: bool,
) -> (Vec<Candidate<'a>>, Option<NoMatch>) {
    let query = Query::new(req, session);
    let mut fits: Vec<Candidate<'a>> =
        candidates.iter().copied().filter(|c| query.reject(c, false).is_none()).collect();
    fits.sort_by(|a, b| {
        let load = |c: &Candidate<'_>| f64::from(c.running) / f64::from(c.capacity.max(1));
        query
            .price(a)
            .cmp(&query.price(b))
            .then(load(a).total_cmp(&load(b)))
            .then(a.rtt_ms.unwrap_or(u32::MAX).cmp(&b.rtt_ms.unwrap_or(u32::MAX)))
    });
    if !fits.is_empty() {
        return (fits, None);
    }
    (fits, Some(explain(candidates.iter().copied(), &query, false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, vendor: &str, vram_gib: u64) -> GpuInfo {
        GpuInfo {
            name: name.into(),
            vendor: vendor.into(),
            backend: "vulkan".into(),
            device_type: "DiscreteGpu".into(),
            vram_bytes: vram_gib << 30,
            score_gflops: 1000.0,
        }
    }

    /// Owns what a candidate borrows.
    struct Owned {
        gpus: Vec<GpuInfo>,
        search: Vec<String>,
    }

    fn owned(gpus: Vec<GpuInfo>) -> Owned {
        let search = gpus.iter().map(gpu_search).collect();
        Owned { gpus, search }
    }

    fn provider(n: u8, o: &Owned, price: u64) -> Candidate<'_> {
        Candidate {
            key: PublicKey([n; 32]),
            region: "eu",
            gpus: &o.gpus,
            gpu_search: &o.search,
            price: Price { per_gpu_second: price, per_inference: price, per_net_gib: 0 },
            capacity: 2,
            running: 0,
            online: true,
            rtt_ms: Some(5),
        }
    }

    #[test]
    fn explains_every_provider_once_under_its_first_failing_reason() {
        let (g3060, g6600, h100, a100) = (
            owned(vec![gpu("RTX 3060", "NVIDIA", 12)]),
            owned(vec![gpu("RX 6600", "AMD", 8)]),
            owned(vec![gpu("H100", "NVIDIA", 80)]),
            owned(vec![gpu("A100", "NVIDIA", 80)]),
        );
        let mut offline = provider(1, &g3060, 1);
        offline.online = false;
        let small = provider(2, &g3060, 1);
        let small2 = provider(3, &g6600, 1);
        let pricey = provider(4, &h100, 100);
        let mut far = provider(5, &a100, 1);
        far.rtt_ms = Some(300);
        let all = [offline, small, small2, pricey, far];
        let req = Requirements {
            min_vram_bytes: Some(24 << 30),
            max_price_per_gpu_second: Some(10),
            max_rtt_ms: Some(50),
            ..Default::default()
        };
        let (fits, why) = rank(&all, &req, false);
        assert!(fits.is_empty());
        let why = why.unwrap();
        assert_eq!(why.total, 5);
        let got: Vec<(&str, u32)> = why.reasons.iter().map(|r| (r.reason.as_str(), r.count)).collect();
        assert_eq!(got, vec![("offline", 1), ("vram", 2), ("price", 1), ("rtt", 1)]);
        assert_eq!(
            why.summary,
            "0 of 5 providers match: 1 is offline, 2 have too little VRAM, 1 is over your price, 1 is too far away (round trip)"
        );
    }

    #[test]
    fn ranks_cheapest_then_least_loaded() {
        let g = owned(vec![gpu("A", "AMD", 16)]);
        let a = provider(1, &g, 5);
        let mut b = provider(2, &g, 3);
        b.running = 1;
        let c = provider(3, &g, 3);
        let mut full = provider(4, &g, 1);
        full.running = 2;
        let all = [a, b, c, full];
        let (fits, why) = rank(&all, &Requirements::default(), false);
        assert!(why.is_none());
        let order: Vec<u8> = fits.iter().map(|c| c.key.0[0]).collect();
        assert_eq!(order, vec![3, 2, 1]);
    }

    #[test]
    fn model_backend_region_and_count_requirements() {
        let g = owned(vec![gpu("RTX 4090", "NVIDIA", 24), gpu("RTX 4090", "NVIDIA", 24)]);
        let p = provider(1, &g, 1);
        let all = [p];
        let check = |req: Requirements| rank(&all, &req, false).1.map(|w| w.reasons[0].reason.clone());
        assert_eq!(check(Requirements { gpu: Some("4090".into()), gpu_count: Some(2), ..Default::default() }), None);
        assert_eq!(check(Requirements { gpu_count: Some(3), ..Default::default() }), Some("gpu_count".into()));
        assert_eq!(check(Requirements { gpu: Some("radeon".into()), ..Default::default() }), Some("gpu".into()));
        assert_eq!(check(Requirements { backend: Some("metal".into()), ..Default::default() }), Some("backend".into()));
        assert_eq!(check(Requirements { region: Some("us".into()), ..Default::default() }), Some("region".into()));
        assert_eq!(check(Requirements { gpu: Some("nvidia".into()), ..Default::default() }), None);
        assert_eq!(
            rank(&[], &Requirements::default(), false).1.unwrap().summary,
            "0 of 0 providers match: no provider has registered yet"
        );
    }
}
