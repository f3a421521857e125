//! Which providers can run a job, and why the others cannot. Pure: providers and requirements
//! in, a ranking and reasons out.

use std::collections::BTreeMap;

use proto::PublicKey;
use proto::api::{NoMatch, ReasonCount};
use proto::msg::{GpuInfo, Price, Requirements};

/// What matching needs to know of a provider.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub key: PublicKey,
    pub region: String,
    pub gpus: Vec<GpuInfo>,
    pub price: Price,
    pub capacity: u32,
    pub running: u32,
    pub online: bool,
    pub rtt_ms: Option<u32>,
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
        };
        format!("{n} {}", if n == 1 { one } else { many })
    }
}

/// GPUs of `c` that fit the per-GPU requirements.
fn fitting_gpus<'a>(c: &'a Candidate, req: &'a Requirements) -> impl Iterator<Item = &'a GpuInfo> + 'a {
    c.gpus.iter().filter(move |g| {
        req.min_vram_bytes.is_none_or(|v| g.vram_bytes >= v)
            && req.gpu.as_ref().is_none_or(|p| {
                let p = p.to_lowercase();
                g.name.to_lowercase().contains(&p) || g.vendor.to_lowercase().contains(&p)
            })
            && req.backend.as_ref().is_none_or(|b| g.backend.eq_ignore_ascii_case(b))
    })
}

/// The first reason `c` cannot take a job with `req`, if any. `session` checks the
/// per-inference price instead of the per-second one.
pub fn reject(c: &Candidate, req: &Requirements, session: bool) -> Option<Reason> {
    let want = req.gpu_count.unwrap_or(1).max(1) as usize;
    if !c.online {
        return Some(Reason::Offline);
    }
    if c.gpus.len() < want {
        return Some(Reason::GpuCount);
    }
    // Narrow step by step so the reason names the first requirement that fails.
    let vram_ok = c.gpus.iter().filter(|g| req.min_vram_bytes.is_none_or(|v| g.vram_bytes >= v)).count();
    if vram_ok < want {
        return Some(Reason::Vram);
    }
    let model = Requirements { backend: None, ..req.clone() };
    if fitting_gpus(c, &model).count() < want {
        return Some(Reason::Gpu);
    }
    if fitting_gpus(c, req).count() < want {
        return Some(Reason::Backend);
    }
    if req.region.as_ref().is_some_and(|r| !c.region.eq_ignore_ascii_case(r)) {
        return Some(Reason::Region);
    }
    let over = if session {
        req.max_price_per_inference.is_some_and(|p| c.price.per_inference > p)
    } else {
        req.max_price_per_gpu_second.is_some_and(|p| c.price.per_gpu_second > p)
    };
    if over {
        return Some(Reason::Price);
    }
    if req.max_rtt_ms.is_some_and(|max| c.rtt_ms.is_none_or(|r| r > max)) {
        return Some(Reason::Rtt);
    }
    if c.running >= c.capacity {
        return Some(Reason::Busy);
    }
    None
}

/// The providers that fit, best first (cheapest, then least loaded, then nearest), and an
/// explanation when none does.
pub fn rank<'a>(
    candidates: &'a [Candidate],
    req: &Requirements,
    session: bool,
) -> (Vec<&'a Candidate>, Option<NoMatch>) {
    let mut fits = Vec::new();
    let mut reasons: BTreeMap<Reason, u32> = BTreeMap::new();
    for c in candidates {
        match reject(c, req, session) {
            None => fits.push(c),
            Some(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    fits.sort_by(|a, b| {
        let price = |c: &Candidate| if session { c.price.per_inference } else { c.price.per_gpu_second };
        let load = |c: &Candidate| f64::from(c.running) / f64::from(c.capacity.max(1));
        price(a)
            .cmp(&price(b))
            .then(load(a).total_cmp(&load(b)))
            .then(a.rtt_ms.unwrap_or(u32::MAX).cmp(&b.rtt_ms.unwrap_or(u32::MAX)))
    });
    if !fits.is_empty() {
        return (fits, None);
    }
    let total = candidates.len() as u32;
    let summary = if total == 0 {
        "0 of 0 providers match: no provider has registered yet".to_string()
    } else {
        let parts: Vec<String> = reasons.iter().map(|(r, n)| r.phrase(*n)).collect();
        format!("0 of {total} providers match: {}", parts.join(", "))
    };
    let reasons = reasons.into_iter().map(|(r, count)| ReasonCount { reason: r.key().to_string(), count }).collect();
    (fits, Some(NoMatch { total, matching: 0, reasons, summary }))
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

    fn provider(n: u8, gpus: Vec<GpuInfo>, price: u64) -> Candidate {
        Candidate {
            key: PublicKey([n; 32]),
            region: "eu".into(),
            gpus,
            price: Price { per_gpu_second: price, per_inference: price },
            capacity: 2,
            running: 0,
            online: true,
            rtt_ms: Some(5),
        }
    }

    #[test]
    fn explains_every_provider_once_under_its_first_failing_reason() {
        let mut offline = provider(1, vec![gpu("RTX 3060", "NVIDIA", 12)], 1);
        offline.online = false;
        let small = provider(2, vec![gpu("RTX 3060", "NVIDIA", 12)], 1);
        let small2 = provider(3, vec![gpu("RX 6600", "AMD", 8)], 1);
        let pricey = provider(4, vec![gpu("H100", "NVIDIA", 80)], 100);
        let mut far = provider(5, vec![gpu("A100", "NVIDIA", 80)], 1);
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
        let a = provider(1, vec![gpu("A", "AMD", 16)], 5);
        let mut b = provider(2, vec![gpu("B", "AMD", 16)], 3);
        b.running = 1;
        let c = provider(3, vec![gpu("C", "AMD", 16)], 3);
        let mut full = provider(4, vec![gpu("D", "AMD", 16)], 1);
        full.running = 2;
        let all = [a, b, c, full];
        let (fits, why) = rank(&all, &Requirements::default(), false);
        assert!(why.is_none());
        let order: Vec<u8> = fits.iter().map(|c| c.key.0[0]).collect();
        assert_eq!(order, vec![3, 2, 1]);
    }

    #[test]
    fn model_backend_region_and_count_requirements() {
        let p = provider(1, vec![gpu("RTX 4090", "NVIDIA", 24), gpu("RTX 4090", "NVIDIA", 24)], 1);
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
