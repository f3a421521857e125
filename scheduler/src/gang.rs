//! Gangs: one job on N GPUs, placed all at once or not at all, on one provider or across
//! several, held together for a bounded time while the members start, and ordered into the ring
//! their collectives run over. Pure: offers, measured links and the time in; a placement, a
//! ring or the reason with counts out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proto::PublicKey;
use proto::api::{NoMatch, ReasonCount};

use crate::matching::{Candidate, Query, Reason};

/// The most members one gang may have.
pub const MAX_MEMBERS: u32 = 256;

/// Providers tried as the first member of a gang across providers (cheapest first).
const MAX_SEEDS: usize = 32;

/// One GPU of a gang: its provider, and which of that provider's GPUs (the index in the list it
/// registered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub provider: PublicKey,
    pub gpu: u32,
}

/// What a gang asks beyond what each of its GPUs must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub members: u32,
    /// Every member on the same provider.
    pub one_provider: bool,
    /// The slowest round trip allowed between any two members' providers, in milliseconds.
    pub max_link_rtt_ms: Option<u32>,
    /// The most members on any one provider.
    pub max_per_provider: Option<u32>,
}

impl Shape {
    /// Checks the shape itself, before any provider is looked at.
    pub fn check(&self) -> Result<(), String> {
        if self.members == 0 {
            return Err("a job needs at least one GPU".into());
        }
        if self.members > MAX_MEMBERS {
            return Err(format!("{} GPUs asked for: at most {MAX_MEMBERS} in one job", self.members));
        }
        if self.max_per_provider == Some(0) {
            return Err("at most 0 members per provider leaves room for none".into());
        }
        if self.one_provider && self.max_per_provider.is_some_and(|m| m < self.members) {
            return Err("every member on one provider, but fewer than all on any one: choose one".into());
        }
        Ok(())
    }
}

/// Round trips the providers measured to each other, in milliseconds, kept per direction (who
/// measured whom). A link counts as the slower of its two ends' newest measurements: a provider
/// that claims a fast link to get placed is outvoted by its peer's own measurement. A provider
/// is 0 ms from itself. Indexed both ways, so that one provider's links are read without a
/// scan of everyone's (`GET /v1/providers` reads them for every provider).
#[derive(Clone, Debug, Default)]
pub struct Links {
    /// Measured by -> measured to -> milliseconds.
    from: HashMap<PublicKey, HashMap<PublicKey, u32>>,
    /// Measured to -> the providers that measured it.
    to: HashMap<PublicKey, HashSet<PublicKey>>,
}

impl Links {
    /// Records `from`'s newest measurement of its round trip to `to`.
    pub fn set(&mut self, from: PublicKey, to: PublicKey, ms: u32) {
        if from != to {
            self.from.entry(from).or_default().insert(to, ms);
            self.to.entry(to).or_default().insert(from);
        }
    }

    /// Forgets every link of `p`, both ways (it went offline).
    pub fn forget(&mut self, p: &PublicKey) {
        for peer in self.from.remove(p).into_iter().flat_map(|m| m.into_keys()) {
            self.drop_index(&peer, p);
        }
        for peer in self.to.remove(p).into_iter().flatten() {
            if let Some(m) = self.from.get_mut(&peer) {
                m.remove(p);
                if m.is_empty() {
                    self.from.remove(&peer);
                }
            }
        }
    }

    /// Forgets `from`'s measurement of `to` (its newest probe could not reach it).
    pub fn forget_link(&mut self, from: &PublicKey, to: &PublicKey) {
        if let Some(m) = self.from.get_mut(from) {
            m.remove(to);
            if m.is_empty() {
                self.from.remove(from);
            }
        }
        self.drop_index(to, from);
    }

    fn drop_index(&mut self, to: &PublicKey, from: &PublicKey) {
        if let Some(set) = self.to.get_mut(to) {
            set.remove(from);
            if set.is_empty() {
                self.to.remove(to);
            }
        }
    }

    fn measured(&self, from: &PublicKey, to: &PublicKey) -> Option<u32> {
        self.from.get(from)?.get(to).copied()
    }

    /// Every measured link of `p`, by peer.
    pub fn of(&self, p: &PublicKey) -> Vec<(PublicKey, u32)> {
        let mine = self.from.get(p).into_iter().flat_map(|m| m.keys());
        let theirs = self.to.get(p).into_iter().flatten();
        let peers: BTreeSet<PublicKey> = mine.chain(theirs).copied().collect();
        peers.into_iter().filter_map(|q| Some((q, self.get(p, &q)?))).collect()
    }

    /// The link between `a` and `b`: the slower of the two ends' measurements.
    pub fn get(&self, a: &PublicKey, b: &PublicKey) -> Option<u32> {
        if a == b {
            return Some(0);
        }
        match (self.measured(a, b), self.measured(b, a)) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (Some(x), None) | (None, Some(x)) => Some(x),
            (None, None) => None,
        }
    }
}

/// A provider as a gang sees it: what matching knows of it, and which of its GPUs are free (not
/// running a job and not held for another gang).
#[derive(Clone, Copy, Debug)]
pub struct Offer<'a> {
    pub candidate: Candidate<'a>,
    pub free_gpus: &'a [u32],
}

/// Places a gang: the cheapest set of free GPUs that meets every member's requirements and the
/// shape (all on one provider, or no link between two members' providers slower than the
/// limit), or why there is none, with counts. All or nothing: a gang that does not fit whole
/// gets no member.
pub fn place(offers: &[Offer<'_>], query: &Query, shape: Shape, links: &Links) -> Result<Vec<Member>, NoMatch> {
    shape.check().map_err(|e| no_match(offers.len(), 0, BTreeMap::new(), e))?;
    let per_gpu = query.per_gpu();
    let want = shape.members as usize;
    let mut reasons: BTreeMap<&'static str, u32> = BTreeMap::new();
    // Per provider that fits: the free GPUs that meet the requirements.
    let mut fitting: Vec<(Candidate<'_>, Vec<u32>)> = Vec::new();
    let mut fit_total = 0usize;
    for o in offers {
        let c = &o.candidate;
        if let Some(r) = per_gpu.reject(c, true) {
            *reasons.entry(r.key()).or_default() += 1;
            continue;
        }
        let cap = shape.max_per_provider.map_or(usize::MAX, |m| m as usize);
        let free: Vec<u32> =
            o.free_gpus.iter().copied().filter(|&i| per_gpu.gpu_fits(c, i as usize)).take(cap).collect();
        if free.is_empty() {
            *reasons.entry(Reason::Busy.key()).or_default() += 1;
            continue;
        }
        fit_total += free.len();
        fitting.push((*c, free));
    }
    let providers = fitting.len();
    // Cheapest first, then the nearest to the scheduler, then by key (a stable order).
    fitting.sort_by(|(a, _), (b, _)| {
        query
            .price(a)
            .cmp(&query.price(b))
            .then(a.rtt_ms.unwrap_or(u32::MAX).cmp(&b.rtt_ms.unwrap_or(u32::MAX)))
            .then(a.key.cmp(&b.key))
    });
    let members = |chosen: &[(usize, usize)]| -> Vec<Member> {
        chosen
            .iter()
            .filter_map(|&(at, n)| fitting.get(at).map(|f| (f, n)))
            .flat_map(|((c, free), n)| free.iter().take(n).map(|&gpu| Member { provider: c.key, gpu }))
            .collect()
    };
    let key_of = |at: usize| fitting.get(at).map(|(c, _)| c.key);
    if shape.one_provider {
        if let Some(at) = fitting.iter().position(|(_, free)| free.len() >= want) {
            return Ok(members(&[(at, want)]));
        }
        let most = fitting.iter().map(|(_, free)| free.len()).max().unwrap_or(0);
        if providers > 0 {
            *reasons.entry("gpu_count").or_default() += providers as u32;
        }
        let why = format!(
            "{want} GPUs wanted on one provider: the most any fitting provider has free is {most} ({fit_total} free on {providers} provider(s))"
        );
        return Err(no_match(offers.len(), 0, reasons, why));
    }
    if fit_total < want {
        let why = format!("{want} GPUs wanted: {fit_total} free that fit, on {providers} provider(s)");
        return Err(no_match(offers.len(), providers as u32, reasons, why));
    }
    // Several providers: from each seed (cheapest first), add the cheapest providers whose links
    // to every one chosen so far are within the limit; keep the cheapest full gang (then the one
    // with the fastest slowest link).
    let mut best: Option<(u64, u32, Picks)> = None;
    let mut largest = 0usize;
    // The cheapest few seeds only: the work stays bounded however many providers there are
    // (a plan is made under the scheduler's lock).
    for seed in 0..fitting.len().min(MAX_SEEDS) {
        let mut chosen: Vec<(usize, usize)> = Vec::new();
        let mut have = 0usize;
        let mut slowest = 0u32;
        for at in std::iter::once(seed).chain((0..fitting.len()).filter(|&i| i != seed)) {
            if have == want {
                break;
            }
            let Some((c, free)) = fitting.get(at) else { continue };
            let key = c.key;
            let mut worst = 0u32;
            let link = |other: usize| key_of(other).and_then(|o| links.get(&key, &o));
            let within = chosen.iter().all(|&(other, _)| match (link(other), shape.max_link_rtt_ms) {
                (Some(ms), Some(max)) if ms <= max => {
                    worst = worst.max(ms);
                    true
                }
                (Some(ms), None) => {
                    worst = worst.max(ms);
                    true
                }
                // An unmeasured link meets no limit; with none, it is taken as the slowest.
                (None, None) => {
                    worst = u32::MAX;
                    true
                }
                _ => false,
            });
            if !within {
                continue;
            }
            let n = free.len().min(want - have);
            chosen.push((at, n));
            have += n;
            slowest = slowest.max(worst);
        }
        largest = largest.max(have);
        if have < want {
            continue;
        }
        let cost: u64 = chosen
            .iter()
            .filter_map(|&(at, n)| fitting.get(at).map(|(c, _)| query.price(c).saturating_mul(n as u64)))
            .sum();
        if best.as_ref().is_none_or(|(c, s, _)| (cost, slowest) < (*c, *s)) {
            best = Some((cost, slowest, chosen));
        }
    }
    match best {
        Some((_, _, chosen)) => Ok(members(&chosen)),
        None => {
            *reasons.entry("link_rtt").or_default() += 1;
            let max = shape.max_link_rtt_ms.unwrap_or(0);
            let why = format!(
                "{want} GPUs wanted with every link within {max} ms: {fit_total} free that fit on {providers} provider(s), but the most within {max} ms of each other is {largest}"
            );
            Err(no_match(offers.len(), providers as u32, reasons, why))
        }
    }
}

/// Providers picked for a gang (by their place in the fitting list) and how many GPUs of each.
type Picks = Vec<(usize, usize)>;

fn no_match(total: usize, matching: u32, reasons: BTreeMap<&'static str, u32>, why: String) -> NoMatch {
    let counts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let summary = if counts.is_empty() { why } else { format!("{why} ({})", counts.join(", ")) };
    NoMatch {
        total: total as u32,
        matching,
        reasons: reasons.into_iter().map(|(r, count)| ReasonCount { reason: r.to_string(), count }).collect(),
        summary,
    }
}

/// The order a gang's members pass data around in, and its slowest link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Indices into the members, in ring order (the last passes to the first).
    pub order: Vec<usize>,
    /// The slowest link of the ring, `None` when it uses a link not measured.
    pub slowest_ms: Option<u32>,
    /// For a gang over several regions: each region's members in ring order (the inner rings of
    /// a ring of rings; `order` is them one after another). One entry otherwise.
    pub regions: Vec<Vec<usize>>,
}

/// Providers up to this many are ordered exactly (every ring tried); more by a local search.
const EXACT_UP_TO: usize = 8;

/// Steps the local search may take in all.
const LOCAL_SEARCH_STEPS: u64 = 2_000_000;

/// Orders `members` into a ring whose slowest link is as fast as possible: the members on one
/// provider next to each other, then the providers ordered by their measured round trips
/// (exactly for a few, by a local search for more); over several regions, a ring per region
/// joined into a ring of rings. `region` names each provider's region.
pub fn ring(members: &[Member], links: &Links, region: impl Fn(&PublicKey) -> String) -> Ring {
    // Providers in the order they first appear, each with its members.
    let mut providers: Vec<(PublicKey, Vec<usize>)> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        match providers.iter_mut().find(|(p, _)| *p == m.provider) {
            Some((_, list)) => list.push(i),
            None => providers.push((m.provider, vec![i])),
        }
    }
    let mut by_region: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (at, (p, _)) in providers.iter().enumerate() {
        by_region.entry(region(p)).or_default().push(at);
    }
    let cost = |a: usize, b: usize| -> u64 {
        match (providers.get(a), providers.get(b)) {
            (Some((x, _)), Some((y, _))) => links.get(x, y).map_or(u64::MAX, u64::from),
            _ => u64::MAX,
        }
    };
    // Each region's providers in ring order, then the regions ordered among themselves by the
    // link from one region's last provider to the next one's first.
    let inner: Vec<Vec<usize>> = by_region.into_values().map(|ps| order(&ps, &cost)).collect();
    let outer: Vec<usize> = if inner.len() > 1 {
        let idx: Vec<usize> = (0..inner.len()).collect();
        let end = |r: usize, last: bool| {
            inner.get(r).and_then(|ps| if last { ps.last() } else { ps.first() }).copied().unwrap_or(usize::MAX)
        };
        let join = |a: usize, b: usize| cost(end(a, true), end(b, false));
        order(&idx, &join)
    } else {
        (0..inner.len()).collect()
    };
    let regions_in_order: Vec<&Vec<usize>> = outer.iter().filter_map(|&r| inner.get(r)).collect();
    let provider_order: Vec<usize> = regions_in_order.iter().flat_map(|ps| ps.iter().copied()).collect();
    let slowest = bottleneck(&provider_order, &cost);
    let expand = |ps: &[usize]| -> Vec<usize> {
        ps.iter().filter_map(|&p| providers.get(p)).flat_map(|(_, list)| list.iter().copied()).collect()
    };
    let regions: Vec<Vec<usize>> = regions_in_order.iter().map(|ps| expand(ps)).collect();
    Ring {
        order: expand(&provider_order),
        slowest_ms: if slowest == u64::MAX { None } else { u32::try_from(slowest).ok() },
        regions,
    }
}

/// The slowest link of the ring through `items` in this order (0 for fewer than two).
fn bottleneck(items: &[usize], cost: &impl Fn(usize, usize) -> u64) -> u64 {
    if items.len() < 2 {
        return 0;
    }
    links_of(items).map(|(a, b)| cost(a, b)).max().unwrap_or(0)
}

/// Each link of the ring through `items`: every item to the next, the last to the first.
fn links_of(items: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    items.iter().copied().zip(items.iter().copied().cycle().skip(1))
}

/// `items` in the ring order that minimises the slowest link (then the sum of the links).
fn order(items: &[usize], cost: &impl Fn(usize, usize) -> u64) -> Vec<usize> {
    let score = |o: &[usize]| -> (u64, u64) {
        let total = links_of(o).map(|(a, b)| cost(a, b).min(u64::MAX / 1024)).sum();
        (bottleneck(o, cost), total)
    };
    let Some((&first, rest)) = items.split_first() else { return Vec::new() };
    if items.len() <= 3 {
        return items.to_vec();
    }
    if items.len() <= EXACT_UP_TO {
        // Every ring, the first item fixed (a ring has no start).
        let mut rest: Vec<usize> = rest.to_vec();
        let mut best: Vec<usize> = items.to_vec();
        let mut best_score = score(&best);
        permute(&mut rest, 0, &mut |p| {
            let candidate: Vec<usize> = std::iter::once(first).chain(p.iter().copied()).collect();
            let s = score(&candidate);
            if s < best_score {
                best_score = s;
                best = candidate;
            }
        });
        return best;
    }
    // Nearest neighbour from the first item, then 2-opt moves while they improve the score.
    let mut left: Vec<usize> = rest.to_vec();
    let mut o = vec![first];
    let mut last = first;
    while let Some((at, _)) = left.iter().enumerate().min_by_key(|(_, x)| cost(last, **x)) {
        last = left.swap_remove(at);
        o.push(last);
    }
    let mut current = score(&o);
    let mut improved = true;
    let mut rounds = 0;
    // A round costs n^3 steps: bounded so that the largest gang is planned at once (past about
    // 126 providers, the nearest-neighbour ring alone).
    let n = o.len().max(1) as u64;
    let max_rounds = (LOCAL_SEARCH_STEPS / n.pow(3)).min(64);
    while improved && rounds < max_rounds {
        improved = false;
        rounds += 1;
        for i in 1..o.len().saturating_sub(1) {
            for j in i + 1..o.len() {
                let flip = |o: &mut Vec<usize>| {
                    if let Some(span) = o.get_mut(i..=j) {
                        span.reverse();
                    }
                };
                flip(&mut o);
                let s = score(&o);
                if s < current {
                    current = s;
                    improved = true;
                } else {
                    flip(&mut o);
                }
            }
        }
    }
    o
}

/// Calls `f` with every permutation of `v[k..]` (by swaps).
fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == v.len() {
        f(v);
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, f);
        v.swap(k, i);
    }
}

/// GPUs held for gangs being started: a gang's members are held together until each has
/// started or the hold runs out, so a gang that cannot start whole frees every GPU it took.
#[derive(Clone, Debug, Default)]
pub struct Holds {
    held: BTreeMap<String, Hold>,
}

#[derive(Clone, Debug)]
struct Hold {
    members: Vec<Member>,
    started: Vec<bool>,
    until_ms: u64,
}

impl Holds {
    /// Holds `members` for job `job` until `until_ms`. A job holds one gang at a time.
    pub fn hold(&mut self, job: &str, members: Vec<Member>, until_ms: u64) -> Result<(), String> {
        if self.held.contains_key(job) {
            return Err(format!("job {job} already holds a gang"));
        }
        let started = vec![false; members.len()];
        self.held.insert(job.to_string(), Hold { members, started, until_ms });
        Ok(())
    }

    /// The GPUs of `provider` held for gangs.
    pub fn held_on(&self, provider: &PublicKey) -> Vec<u32> {
        self.held.values().flat_map(|h| h.members.iter()).filter(|m| m.provider == *provider).map(|m| m.gpu).collect()
    }

    /// Member `rank` of job `job`'s gang started; true once every member has (the hold is then
    /// over: the GPUs are the job's, running).
    pub fn started(&mut self, job: &str, rank: usize) -> bool {
        let Some(h) = self.held.get_mut(job) else { return false };
        if let Some(s) = h.started.get_mut(rank) {
            *s = true;
        }
        if h.started.iter().all(|s| *s) {
            self.held.remove(job);
            return true;
        }
        false
    }

    /// Gives a job's hold back (the gang failed to start, or was cancelled).
    pub fn release(&mut self, job: &str) -> Option<Vec<Member>> {
        self.held.remove(job).map(|h| h.members)
    }

    /// Ends every hold past its time: the jobs whose gangs did not start whole in time (whose
    /// started members are to be stopped and which go back to the queue), each with the members
    /// (their places in the gang) that had not started.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(String, Vec<usize>)> {
        let late: Vec<String> =
            self.held.iter().filter(|(_, h)| h.until_ms <= now_ms).map(|(j, _)| j.clone()).collect();
        late.into_iter()
            .filter_map(|j| {
                let h = self.held.remove(&j)?;
                let waiting = h.started.iter().enumerate().filter(|(_, s)| !**s).map(|(at, _)| at).collect();
                Some((j, waiting))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proto::msg::{GpuInfo, Price, Requirements};

    use super::*;
    use crate::matching::gpu_search;

    fn gpu(vram_gib: u64) -> GpuInfo {
        GpuInfo {
            name: "RTX 3090".into(),
            vendor: "NVIDIA".into(),
            backend: "vulkan".into(),
            device_type: "DiscreteGpu".into(),
            vram_bytes: vram_gib << 30,
            score_gflops: 1000.0,
        }
    }

    struct Owned {
        gpus: Vec<GpuInfo>,
        search: Vec<String>,
        free: Vec<u32>,
        price: u64,
        region: &'static str,
    }

    fn rig(n: usize, vram_gib: u64, price: u64) -> Owned {
        let gpus: Vec<GpuInfo> = (0..n).map(|_| gpu(vram_gib)).collect();
        let search = gpus.iter().map(gpu_search).collect();
        Owned { gpus, search, free: (0..n as u32).collect(), price, region: "eu" }
    }

    fn offers(rigs: &[Owned]) -> Vec<Offer<'_>> {
        rigs.iter()
            .enumerate()
            .map(|(i, o)| Offer {
                candidate: Candidate {
                    key: key(i),
                    region: o.region,
                    gpus: &o.gpus,
                    gpu_search: &o.search,
                    price: Price { per_gpu_second: o.price, per_inference: o.price, per_net_gib: 0 },
                    capacity: o.gpus.len() as u32,
                    running: 0,
                    online: true,
                    rtt_ms: Some(5),
                },
                free_gpus: &o.free,
            })
            .collect()
    }

    fn key(i: usize) -> PublicKey {
        PublicKey([i as u8 + 1; 32])
    }

    fn query() -> Query {
        Query::new(&Requirements::default(), false)
    }

    fn gang(n: u32) -> Shape {
        Shape { members: n, ..Shape::default() }
    }

    fn on(members: &[Member]) -> Vec<(u8, u32)> {
        members.iter().map(|m| (m.provider.0[0], m.gpu)).collect()
    }

    #[test]
    fn a_gang_is_placed_whole_on_the_cheapest_gpus_or_not_at_all_with_counts() {
        let mut rigs = vec![rig(2, 24, 5), rig(4, 24, 3), rig(1, 8, 1)];
        rigs[1].free = vec![0, 2, 3];
        let o = offers(&rigs);
        let q = Query::new(&Requirements { min_vram_bytes: Some(16 << 30), ..Default::default() }, false);
        // The cheapest fitting GPUs first: provider 2's three free, then one of provider 1's.
        let placed = place(&o, &q, gang(4), &Links::default()).unwrap();
        assert_eq!(on(&placed), vec![(2, 0), (2, 2), (2, 3), (1, 0)]);
        // One more than fits free: nothing is placed, and the answer says why with counts.
        let why = place(&o, &q, gang(6), &Links::default()).unwrap_err();
        assert_eq!((why.total, why.matching), (3, 2));
        assert_eq!(why.summary, "6 GPUs wanted: 5 free that fit, on 2 provider(s) (vram: 1)");
        // No member at all, or more than any job may have: refused before looking.
        assert!(place(&o, &q, gang(0), &Links::default()).unwrap_err().summary.contains("at least one GPU"));
        assert!(place(&o, &q, gang(MAX_MEMBERS + 1), &Links::default()).unwrap_err().summary.contains("at most"));
    }

    #[test]
    fn one_provider_gangs_go_where_enough_gpus_are_free_together() {
        let mut rigs = vec![rig(8, 24, 1), rig(4, 24, 2)];
        rigs[0].free = vec![1, 5];
        let o = offers(&rigs);
        let shape = Shape { members: 3, one_provider: true, max_link_rtt_ms: None, max_per_provider: None };
        let placed = place(&o, &query(), shape, &Links::default()).unwrap();
        assert_eq!(on(&placed), vec![(2, 0), (2, 1), (2, 2)], "the cheaper rig has only 2 free");
        let why = place(&o, &query(), Shape { members: 5, ..shape }, &Links::default()).unwrap_err();
        assert!(
            why.summary.starts_with("5 GPUs wanted on one provider: the most any fitting provider has free is 4"),
            "{}",
            why.summary
        );
        // Busy rigs are counted as such.
        rigs[1].free.clear();
        rigs[0].free.clear();
        let o = offers(&rigs);
        let why = place(&o, &query(), shape, &Links::default()).unwrap_err();
        assert_eq!(why.reasons, vec![ReasonCount { reason: "busy".into(), count: 2 }]);
    }

    #[test]
    fn a_link_is_the_slower_of_its_two_ends_measurements() {
        let (liar, honest) = (key(0), key(1));
        let mut links = Links::default();
        links.set(honest, liar, 80);
        assert_eq!(links.get(&liar, &honest), Some(80), "one end measured: that is the link");
        // The liar claims 1 ms to be placed with the honest one: its peer's 80 ms stands.
        links.set(liar, honest, 1);
        assert_eq!((links.get(&liar, &honest), links.get(&honest, &liar)), (Some(80), Some(80)));
        assert_eq!(links.of(&liar), vec![(honest, 80)]);
        // A new measurement replaces its end's old one; a failed probe drops only that end.
        links.set(honest, liar, 30);
        assert_eq!(links.get(&liar, &honest), Some(30));
        links.forget_link(&honest, &liar);
        assert_eq!(links.get(&liar, &honest), Some(1));
        links.forget(&liar);
        assert_eq!((links.get(&liar, &honest), links.of(&honest)), (None, vec![]));
        assert!(links.from.is_empty() && links.to.is_empty(), "nothing left behind: {links:?}");
        assert_eq!(links.get(&liar, &liar), Some(0));
    }

    #[test]
    fn a_link_limit_keeps_far_providers_out_of_one_gang() {
        let rigs = vec![rig(1, 24, 1), rig(1, 24, 2), rig(1, 24, 3), rig(1, 24, 4)];
        let o = offers(&rigs);
        let mut links = Links::default();
        // 1 is far from everyone; 2, 3 and 4 are close to each other.
        for (a, b, ms) in [(0, 1, 90), (0, 2, 95), (0, 3, 80), (1, 2, 10), (1, 3, 12), (2, 3, 8)] {
            links.set(key(a), key(b), ms);
        }
        let shape = Shape { members: 3, one_provider: false, max_link_rtt_ms: Some(20), max_per_provider: None };
        let placed = place(&o, &query(), shape, &links).unwrap();
        assert_eq!(on(&placed), vec![(2, 0), (3, 0), (4, 0)], "the cheapest one is too far from the rest");
        // Without a limit the cheapest three are taken.
        let placed = place(&o, &query(), gang(3), &links).unwrap();
        assert_eq!(on(&placed), vec![(1, 0), (2, 0), (3, 0)]);
        // Four within 20 ms of each other do not exist.
        let why = place(&o, &query(), Shape { members: 4, ..shape }, &links).unwrap_err();
        assert!(why.summary.contains("the most within 20 ms of each other is 3"), "{}", why.summary);
        // An unmeasured link meets no limit.
        let why = place(&o, &query(), shape, &Links::default()).unwrap_err();
        assert!(why.summary.contains("is 1"), "{}", why.summary);
    }

    /// The slowest link of every ring order of `members`, the best of them.
    fn brute_force(members: &[Member], links: &Links) -> u32 {
        let mut idx: Vec<usize> = (1..members.len()).collect();
        let mut best = u32::MAX;
        permute(&mut idx, 0, &mut |p| {
            let o: Vec<usize> = std::iter::once(0).chain(p.iter().copied()).collect();
            let worst = (0..o.len())
                .map(|i| {
                    links.get(&members[o[i]].provider, &members[o[(i + 1) % o.len()]].provider).unwrap_or(u32::MAX)
                })
                .max()
                .unwrap_or(0);
            best = best.min(worst);
        });
        best
    }

    /// `n` single-GPU providers on a line, 10 ms between neighbours.
    fn line(n: usize) -> (Links, Vec<Member>) {
        let mut links = Links::default();
        for a in 0..n {
            for b in a + 1..n {
                links.set(key(a), key(b), 10 * (b - a) as u32);
            }
        }
        (links, (0..n).map(|i| Member { provider: key(i), gpu: 0 }).collect())
    }

    #[test]
    fn the_ring_minimises_its_slowest_link_and_keeps_a_providers_gpus_together() {
        // Six providers on a line 10 ms apart: a ring round the line (out on the odd ones, back
        // on the even ones) has no link slower than 20 ms; the line's order gives 50.
        let (links, members) = line(6);
        let r = ring(&members, &links, |_| "eu".into());
        assert_eq!(r.slowest_ms, Some(20));
        assert_eq!(brute_force(&members, &links), 20);
        let mut sorted = r.order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..6).collect::<Vec<_>>(), "every member once");
        // Two GPUs of one provider sit next to each other (0 ms between them).
        let mut two = members.clone();
        two.push(Member { provider: key(3), gpu: 1 });
        let r = ring(&two, &links, |_| "eu".into());
        let at = r.order.iter().position(|&i| i == 3).unwrap();
        assert_eq!(r.order[(at + 1) % r.order.len()], 6);
        assert_eq!(r.slowest_ms, Some(20));
        // An unmeasured link makes the ring's slowest link unknown.
        let r = ring(&members, &Links::default(), |_| "eu".into());
        assert_eq!(r.slowest_ms, None);
    }

    #[test]
    fn past_eight_providers_a_local_search_still_finds_the_best_ring_on_a_line() {
        // Twelve providers on a line 10 ms apart, one region: too many to try every ring. The
        // best ring goes out on every other provider and back on the rest: 20 ms at worst.
        let (links, members) = line(12);
        let r = ring(&members, &links, |_| "eu".into());
        assert_eq!(r.slowest_ms, Some(20), "{:?}", r.order);
        let mut sorted = r.order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        // The largest gang, each member on its own provider, is planned too (the search is
        // bounded).
        let members: Vec<Member> = (0..MAX_MEMBERS).map(|i| Member { provider: big_key(i), gpu: 0 }).collect();
        let mut far = Links::default();
        for a in 0..MAX_MEMBERS {
            for b in a + 1..MAX_MEMBERS {
                far.set(big_key(a), big_key(b), b - a);
            }
        }
        let r = ring(&members, &far, |_| "eu".into());
        let mut sorted = r.order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..MAX_MEMBERS as usize).collect::<Vec<_>>(), "every member once");
        assert!(r.slowest_ms.is_some());
    }

    fn big_key(i: u32) -> PublicKey {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        PublicKey(k)
    }

    #[test]
    fn many_providers_over_regions_make_a_ring_of_rings() {
        // Twelve providers, in three regions of four: 2 ms within a region, 80 ms across.
        let region = |p: &PublicKey| ["eu", "us", "ap"][usize::from(p.0[0] - 1) % 3].to_string();
        let mut links = Links::default();
        for a in 0..12usize {
            for b in a + 1..12 {
                let ms = if a % 3 == b % 3 { 2 } else { 80 };
                links.set(key(a), key(b), ms);
            }
        }
        let members: Vec<Member> = (0..12).map(|i| Member { provider: key(i), gpu: 0 }).collect();
        let r = ring(&members, &links, region);
        assert_eq!(r.regions.len(), 3);
        for inner in &r.regions {
            let names: Vec<String> = inner.iter().map(|&i| region(&members[i].provider)).collect();
            assert!(names.windows(2).all(|w| w[0] == w[1]), "one region per inner ring: {names:?}");
        }
        assert_eq!(r.order, r.regions.concat());
        // Three cross-region links at 80 ms are unavoidable, and no link is slower.
        assert_eq!(r.slowest_ms, Some(80));
        let cross = (0..12)
            .filter(|&i| {
                let (a, b) = (r.order[i], r.order[(i + 1) % 12]);
                region(&members[a].provider) != region(&members[b].provider)
            })
            .count();
        assert_eq!(cross, 3);
    }

    #[test]
    fn a_gang_that_does_not_start_whole_in_time_frees_every_gpu_it_held() {
        let mut holds = Holds::default();
        let gang: Vec<Member> = (0..3).map(|i| Member { provider: key(i % 2), gpu: i as u32 }).collect();
        holds.hold("job-a", gang.clone(), 1_000).unwrap();
        assert_eq!(holds.held_on(&key(0)), vec![0, 2]);
        // One job holds one gang. (Two gangs may hold one GPU: members share a GPU where a
        // provider has more job slots than GPUs; the slots are what placement counts.)
        assert!(holds.hold("job-a", vec![], 1_000).is_err());
        assert!(!holds.started("job-a", 0));
        assert!(!holds.started("job-a", 7), "a rank that is not a member changes nothing");
        assert!(holds.expire(999).is_empty());
        assert!(!holds.started("job-a", 2));
        assert_eq!(
            holds.expire(1_000),
            vec![("job-a".to_string(), vec![1])],
            "two of three started: the hold runs out"
        );
        assert!(holds.held_on(&key(0)).is_empty() && holds.held_on(&key(1)).is_empty());
        // A gang whose members all start is the job's: nothing is held any more.
        holds.hold("job-b", gang.clone(), 5_000).unwrap();
        assert!(!holds.started("job-b", 0) && !holds.started("job-b", 1));
        assert!(holds.started("job-b", 2));
        assert!(holds.held_on(&key(1)).is_empty());
        assert_eq!(holds.release("job-b"), None);
    }
}
