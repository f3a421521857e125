//! Cluster jobs: one job on N GPUs. The cluster job (the parent) waits in the queue like any
//! job and is placed whole with [`crate::gang::place`] or not at all; placed, it gets one job
//! record per rank (its members: `{parent}-t{try}-r{rank}`, never queued), each sent to its
//! provider with the roster the scheduler signed, and run through the same paths as a single
//! job (results, receipts, payment by job id, liveness). What a member does is rolled up to
//! the parent: all succeeded, the parent succeeded with rank 0's output; the kernel's own
//! fault in one, the parent failed and the others stopped; a provider's failure or loss in
//! one (or a member not started in time), the others stopped and the parent queued again
//! whole, its tries bounded like a job's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use proto::api::{Attempt, ClusterRequest, JobRecord, JobState, JobView, MemberView, NoMatch};
use proto::cluster::{MemberAssign, Roster, RosterMember};
use proto::msg::{JobResult, Outcome, Requirements, WireUsage, parse_hash};
use proto::{Keypair, PublicKey};

use super::{Assignment, State};
use crate::gang::{Holds, Member, Offer, Shape};
use crate::matching::{Candidate, Query};
use crate::store::StoreError;

/// What a roster is valid for past the job's wall time: its members' starts and their links'
/// setup.
const ROSTER_MARGIN_MS: u64 = 5 * 60 * 1000;

/// How a waiting cluster's explanation says what is held for it.
const HELD_NOTE: &str = "; held for it until the rest free up: ";

/// The cluster jobs' part of the state.
#[derive(Debug, Default)]
pub(super) struct Clusters {
    /// Signs rosters (the scheduler's key); without it no cluster is placed.
    pub(super) signer: Option<Arc<Keypair>>,
    /// Members running now, by their job id.
    pub(super) running: HashMap<String, Running>,
    /// Clusters placed whose members have not all started yet, until their start timeout.
    pub(super) holds: Holds,
    /// Why each queued cluster found no gang when it was last tried.
    pub(super) why: HashMap<String, NoMatch>,
    /// Per queued cluster, the providers that failed its last try: the next goes elsewhere
    /// when a gang fits without them.
    pub(super) avoid: HashMap<String, HashSet<PublicKey>>,
    /// Members' last receipts held back from their renters until the next rank (on another
    /// provider) reports what it received, by member job id.
    pub(super) parked: HashMap<String, Parked>,
    /// Free job slots held, per provider, for clusters that have waited long enough: work
    /// queued after them does not take these (made again on every placement pass).
    pub(super) held: HashMap<PublicKey, u32>,
}

/// A member's last receipt, checked and held until its next rank reports.
#[derive(Clone, Debug)]
pub(super) struct Parked {
    pub(super) parent: String,
    pub(super) rank: u32,
    pub(super) provider: PublicKey,
    pub(super) receipt: proto::receipt::JobReceipt,
    /// When it was held: past [`MAX_HELD_MS`] it is shown unchecked.
    pub(super) since_ms: u64,
}

/// The longest a member's last receipt is held for its next rank's count: well inside the
/// minute its provider waits for the last voucher.
pub(super) const MAX_HELD_MS: u64 = 20_000;

/// Bytes a member may bill past what its next rank reports receiving: frames that were on
/// their way when the next rank ended (its link's queue of 16 frames, the one held back, and
/// what its pipes hold), so that an honest provider is never refused for them.
pub(super) const IN_FLIGHT_BYTES: u64 = 32 << 20;

/// What a member's last receipt is checked against before its renter sees it: the bytes it
/// bills as sent went to the next rank, whose provider reports what it received. Only a
/// provider that inflates its bill and its own count alike is caught by nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NetCheck {
    /// Nothing to check: the next rank is on the same provider (nothing crossed a network,
    /// nothing is billed), or its count is not to be had (it was stopped or lost).
    Free,
    /// The next rank reported receiving `received` bytes from this one.
    Against { next: u32, received: u64 },
    /// The next rank has not reported yet.
    Wait { next: u32 },
}

/// Shows a member's checked last receipt to its renter, or refuses it (saying why) when it
/// bills more bytes sent than the next rank received.
pub(super) fn show_last_receipt(c: &mut proto::api::JobChannel, r: proto::receipt::JobReceipt, check: NetCheck) {
    c.held = None;
    c.updates += 1;
    match check {
        NetCheck::Against { next, received } if r.net_bytes > received.saturating_add(IN_FLIGHT_BYTES) => {
            let why = format!(
                "the provider's last receipt was refused: it bills {} bytes sent to rank {next}, whose provider reports receiving {received}",
                r.net_bytes
            );
            log::warn!("{why}");
            c.refused = Some(why);
        }
        _ => c.receipt = Some(r),
    }
}

/// A running member: its cluster, its rank and which of its provider's GPUs it has.
#[derive(Clone, Debug)]
pub(super) struct Running {
    pub(super) parent: String,
    pub(super) rank: u32,
    pub(super) gpu: u32,
}

/// A gang that fits now: its members by rank (ring order), the ring's slowest link and, across
/// regions, each region's ranks.
pub(super) struct Fit {
    pub(super) members: Vec<Member>,
    pub(super) slowest_ms: Option<u32>,
    pub(super) regions: Vec<Vec<u32>>,
}

/// A member's job id: its cluster's, the try and the rank. Each try has its own ids, so that a
/// late report or a cancel for an earlier try never touches the next.
pub fn member_id(parent: &str, tries: u32, rank: u32) -> String {
    format!("{parent}-t{tries}-r{rank}")
}

/// The most input bytes a cluster job may send out in all: its input goes to every member.
pub const MAX_CLUSTER_INPUT_BYTES: usize = 256 << 20;

/// Checks a submission's cluster request before anything else is looked at; a cluster of one
/// is a plain job (`None`).
pub(super) fn check_request(
    cluster: Option<ClusterRequest>,
    requirements: &Requirements,
    input_bytes: usize,
) -> Result<Option<ClusterRequest>, String> {
    let Some(c) = cluster else { return Ok(None) };
    if c.gpus == 0 {
        return Err("a cluster needs at least 2 GPUs (cluster.gpus is 0; a job on one GPU needs no cluster)".into());
    }
    if c.gpus as usize > proto::cluster::MAX_MEMBERS {
        return Err(format!(
            "{} GPUs asked for: a cluster has at most {} members",
            c.gpus,
            proto::cluster::MAX_MEMBERS
        ));
    }
    let shape = Shape {
        members: c.gpus,
        one_provider: c.one_provider,
        max_link_rtt_ms: c.max_link_rtt_ms,
        max_per_provider: c.max_per_provider,
    };
    shape.check()?;
    if requirements.gpu_count.is_some_and(|n| n > 1) {
        return Err(
            "requirements.gpu_count and cluster together: each member has one GPU; give the cluster's size as \
             cluster.gpus"
                .into(),
        );
    }
    if c.gpus > 1 && input_bytes.saturating_mul(c.gpus as usize) > MAX_CLUSTER_INPUT_BYTES {
        return Err(format!(
            "the input goes to each of the cluster's {} members: {} bytes each is over {} MiB in all; send less, \
             or fewer members",
            c.gpus,
            input_bytes,
            MAX_CLUSTER_INPUT_BYTES >> 20
        ));
    }
    Ok((c.gpus > 1).then_some(c))
}

/// The sum of the members' usage (every count, `peak_gpu_bytes` too: each member's own GPU),
/// or `None` when none has reported any.
fn sum_usage<'a>(usages: impl Iterator<Item = &'a WireUsage>) -> Option<WireUsage> {
    let mut total: Option<WireUsage> = None;
    for u in usages {
        let t =
            total.get_or_insert_with(|| WireUsage { gpu_time_source: u.gpu_time_source.clone(), ..Default::default() });
        t.inferences = t.inferences.saturating_add(u.inferences);
        t.fuel = t.fuel.saturating_add(u.fuel);
        t.dispatches = t.dispatches.saturating_add(u.dispatches);
        t.workgroups = t.workgroups.saturating_add(u.workgroups);
        t.invocations = t.invocations.saturating_add(u.invocations);
        t.bytes_uploaded = t.bytes_uploaded.saturating_add(u.bytes_uploaded);
        t.bytes_downloaded = t.bytes_downloaded.saturating_add(u.bytes_downloaded);
        t.peak_gpu_bytes = t.peak_gpu_bytes.saturating_add(u.peak_gpu_bytes);
        t.gpu_time_ns = t.gpu_time_ns.saturating_add(u.gpu_time_ns);
        t.net_bytes_sent = t.net_bytes_sent.saturating_add(u.net_bytes_sent);
        t.net_bytes_received = t.net_bytes_received.saturating_add(u.net_bytes_received);
        t.net_wait_ns = t.net_wait_ns.saturating_add(u.net_wait_ns);
        if t.gpu_time_source != u.gpu_time_source {
            t.gpu_time_source = "mixed".into();
        }
    }
    total
}

impl State {
    /// Holds the free slots queued cluster `id` could use, once it has waited
    /// [`super::Config::cluster_hold_after_ms`] and would fit if the providers that match it
    /// were idle: later work leaves them alone, and slots freed from now on add up until the
    /// whole gang fits. Its explanation says so.
    pub(super) fn hold_for(&mut self, id: &str, now_ms: u64) {
        let Some(job) = self.jobs.get(id) else { return };
        let Some(c) = job.view.cluster.as_ref() else { return };
        // Without a key to sign rosters no cluster is placed: nothing is held for one.
        if self.clusters.signer.is_none()
            || now_ms.saturating_sub(job.view.submitted_at_ms) < self.config.cluster_hold_after_ms
        {
            return;
        }
        let query = Query::new(&Requirements { gpu_count: None, ..job.view.requirements.clone() }, false);
        let per_provider = |capacity: u32| {
            let most =
                if c.request.one_provider { c.request.gpus } else { c.request.max_per_provider.unwrap_or(u32::MAX) };
            capacity.min(most)
        };
        // Would it fit at all, every matching provider idle?
        // A provider that takes no peer connections can hold only a whole gang of its own.
        let usable = |p: &super::Provider| {
            let whole =
                p.view.capacity >= c.request.gpus && c.request.max_per_provider.is_none_or(|m| m >= c.request.gpus);
            p.view.session_addr.is_some() || whole
        };
        let matching: Vec<&super::Provider> =
            self.providers.values().filter(|p| query.reject(&p.candidate(), true).is_none() && usable(p)).collect();
        let room: Vec<u32> = matching.iter().map(|p| per_provider(p.view.capacity)).collect();
        let possible = match c.request.one_provider {
            true => room.iter().any(|&r| r >= c.request.gpus),
            false => room.iter().map(|&r| u64::from(r)).sum::<u64>() >= u64::from(c.request.gpus),
        };
        if !possible {
            return;
        }
        // The free slots it could use now, the providers with the most room first.
        let mut free: Vec<(PublicKey, u32, u32)> = matching
            .iter()
            .map(|p| {
                let cand = self.candidate_of(p);
                (p.view.key, cand.capacity.saturating_sub(cand.running), per_provider(p.view.capacity))
            })
            .filter(|(_, f, _)| *f > 0)
            .collect();
        free.sort_by_key(|(k, f, _)| (std::cmp::Reverse(*f), *k));
        if c.request.one_provider {
            free.retain(|(_, _, room)| *room >= c.request.gpus);
            free.truncate(1);
        }
        let mut left = c.request.gpus;
        let mut holds = Vec::new();
        for (key, f, room) in free {
            let take = f.min(room).min(left);
            if take > 0 {
                holds.push((key, take));
                left -= take;
            }
        }
        let (gpus, providers) = (holds.iter().map(|(_, n)| n).sum::<u32>(), holds.len());
        for (key, n) in holds {
            *self.clusters.held.entry(key).or_insert(0) += n;
        }
        if let Some(why) = self.clusters.why.get_mut(id) {
            // The note of the pass before, if any, gives way to this one's.
            if let Some(at) = why.summary.find(HELD_NOTE) {
                why.summary.truncate(at);
            }
            if gpus > 0 {
                why.summary = format!("{}{HELD_NOTE}{gpus} free GPU(s) on {providers} provider(s)", why.summary);
            }
        }
    }

    /// What rank `rank` of cluster `parent` (on `provider`) is checked against: its next
    /// rank's report of the bytes it received.
    pub(super) fn next_rank_received(&self, parent: &str, rank: u32, provider: &PublicKey) -> NetCheck {
        let Some(members) = self.jobs.get(parent).and_then(|p| p.view.cluster.as_ref()).map(|c| &c.members) else {
            return NetCheck::Free;
        };
        let world = members.len() as u32;
        let next = rank.saturating_add(1).checked_rem(world).unwrap_or(0);
        let Some(m) = members.iter().find(|m| m.rank == next).filter(|_| world > 1) else { return NetCheck::Free };
        if m.provider == *provider {
            return NetCheck::Free;
        }
        match self.jobs.get(&m.job_id) {
            Some(j) if !j.view.state.is_final() => NetCheck::Wait { next },
            Some(j) => j
                .view
                .usage
                .as_ref()
                .map_or(NetCheck::Free, |u| NetCheck::Against { next, received: u.net_bytes_received }),
            None => NetCheck::Free,
        }
    }

    /// Shows (or refuses) the held last receipts of cluster `parent`'s members whose next rank
    /// has now reported, or can no longer.
    pub(super) fn settle_parked(&mut self, parent: &str, now_ms: u64) -> Result<(), StoreError> {
        let ids: Vec<String> =
            self.clusters.parked.iter().filter(|(_, p)| p.parent == parent).map(|(id, _)| id.clone()).collect();
        for id in ids {
            let Some(p) = self.clusters.parked.get(&id) else { continue };
            let check = match self.next_rank_received(&p.parent, p.rank, &p.provider) {
                // Waited for long enough: its provider must still get its last voucher.
                NetCheck::Wait { .. } if now_ms.saturating_sub(p.since_ms) >= MAX_HELD_MS => NetCheck::Free,
                NetCheck::Wait { .. } => continue,
                check => check,
            };
            let Some(p) = self.clusters.parked.remove(&id) else { continue };
            let Some(job) = self.jobs.get_mut(&id) else { continue };
            let Some(c) = job.view.channel.as_mut() else { continue };
            show_last_receipt(c, p.receipt, check);
            let job = job.clone();
            self.store.put_job(&job)?;
        }
        Ok(())
    }

    /// The key cluster rosters are signed with: the scheduler's own, which providers trust.
    /// Until it is set, cluster jobs stay queued (saying why).
    pub fn set_signer(&mut self, keypair: Arc<Keypair>) {
        self.clusters.signer = Some(keypair);
    }

    /// Every provider with the GPUs it could give cluster members now: one per free job slot
    /// (each member runs in its own worker), the GPUs that running members use least first. A
    /// provider with more slots than GPUs gives a GPU to several members, as it runs several
    /// jobs on one GPU: they share it.
    fn cluster_offers(&self, avoid: &HashSet<PublicKey>) -> Vec<(Candidate<'_>, Vec<u32>)> {
        self.providers
            .values()
            .filter(|p| !avoid.contains(&p.view.key))
            .map(|p| {
                let c = self.candidate_of(p);
                let slots = c.capacity.saturating_sub(c.running) as usize;
                let gpus = c.gpus.len().max(1);
                let mut load = vec![0usize; gpus];
                for m in p.assigned.iter().filter_map(|j| self.clusters.running.get(j)) {
                    if let Some(l) = load.get_mut(m.gpu as usize) {
                        *l += 1;
                    }
                }
                let mut free = Vec::with_capacity(slots);
                for _ in 0..slots {
                    let Some((g, l)) = load.iter_mut().enumerate().min_by_key(|(g, l)| (**l, *g)) else { break };
                    *l += 1;
                    free.push(g as u32);
                }
                (c, free)
            })
            .collect()
    }

    /// Where a cluster would go now, skipping the providers in `avoid` (all of them are tried
    /// when no gang fits without them), or why none fits, with counts.
    pub(super) fn cluster_fit(
        &self,
        requirements: &Requirements,
        c: &ClusterRequest,
        avoid: &HashSet<PublicKey>,
    ) -> Result<Fit, NoMatch> {
        let shape = Shape {
            members: c.gpus,
            one_provider: c.one_provider,
            max_link_rtt_ms: c.max_link_rtt_ms,
            max_per_provider: c.max_per_provider,
        };
        let query = Query::new(&Requirements { gpu_count: None, ..requirements.clone() }, false);
        let place_shaped = |avoid: &HashSet<PublicKey>, shape: Shape| {
            let free = self.cluster_offers(avoid);
            let offers: Vec<Offer<'_>> =
                free.iter().map(|(c, gpus)| Offer { candidate: *c, free_gpus: gpus }).collect();
            crate::gang::place(&offers, &query, shape, &self.links)
        };
        let place_among = |avoid: &HashSet<PublicKey>| place_shaped(avoid, shape);
        // A provider with no session endpoint takes no connections from peers: it can hold a
        // cluster only whole. A gang across providers that needs one is placed without them.
        let unreachable: HashSet<PublicKey> =
            self.providers.values().filter(|p| p.view.session_addr.is_none()).map(|p| p.view.key).collect();
        let place = |avoid: &HashSet<PublicKey>| {
            let placed = place_among(avoid)?;
            let first = placed.first().map(|m| m.provider);
            let spread = placed.iter().any(|m| Some(m.provider) != first);
            if !spread || !placed.iter().any(|m| unreachable.contains(&m.provider)) {
                return Ok(placed);
            }
            // Without them nothing may fit, and yet one of them may hold the whole gang.
            let reachable = place_among(&avoid.union(&unreachable).copied().collect());
            let whole = || place_shaped(avoid, Shape { one_provider: true, ..shape });
            reachable.or_else(|why| whole().map_err(|_| why)).map_err(|mut why| {
                why.summary = format!(
                    "{}; {} provider(s) take no connections from peers (no session endpoint) and can hold a cluster only whole",
                    why.summary,
                    unreachable.len()
                );
                why
            })
        };
        let placed = match avoid.is_empty() {
            true => place(avoid),
            false => place(avoid).or_else(|_| place(&HashSet::new())),
        }?;
        let region = |k: &PublicKey| self.providers.get(k).map(|p| p.view.region.clone()).unwrap_or_default();
        let ring = crate::gang::ring(&placed, &self.links, region);
        let mut rank_of = vec![0u32; placed.len()];
        for (&at, rank) in ring.order.iter().zip(0u32..) {
            if let Some(r) = rank_of.get_mut(at) {
                *r = rank;
            }
        }
        let members = ring.order.iter().filter_map(|&at| placed.get(at).copied()).collect();
        let regions =
            ring.regions.iter().map(|r| r.iter().filter_map(|&at| rank_of.get(at).copied()).collect()).collect();
        Ok(Fit { members, slowest_ms: ring.slowest_ms, regions })
    }

    /// Places queued cluster `id` whole if a gang fits now: a member record per rank, running
    /// on its provider, and the assignments that send each its rank and the signed roster.
    /// `None` when none fits (the reason is kept for the job's view).
    pub(super) fn place_cluster(&mut self, id: &str, now_ms: u64) -> Result<Option<Vec<Assignment>>, StoreError> {
        let Some(job) = self.jobs.get(id) else { return Ok(None) };
        let Some(cluster) = job.view.cluster.as_ref() else { return Ok(None) };
        let Some(signer) = self.clusters.signer.clone() else {
            let why = NoMatch {
                total: self.providers.len() as u32,
                matching: 0,
                reasons: Vec::new(),
                summary: "the scheduler has no key to sign the cluster's roster with".into(),
            };
            self.clusters.why.insert(id.to_string(), why);
            return Ok(None);
        };
        let Some(module) = parse_hash(&job.view.module) else { return Ok(None) };
        let avoid = self.clusters.avoid.get(id).cloned().unwrap_or_default();
        let fit = match self.cluster_fit(&job.view.requirements, &cluster.request, &avoid) {
            Ok(fit) => fit,
            Err(why) => {
                self.clusters.why.insert(id.to_string(), why);
                return Ok(None);
            }
        };
        let tries = cluster.tries.saturating_add(1);
        let checkpoint = self.saved_checkpoint(id, job.view.checkpoint.is_some());
        let provider_of = |m: &Member| self.providers.get(&m.provider).map(|p| &p.view);
        let roster_members: Vec<RosterMember> = fit
            .members
            .iter()
            .zip(0u32..)
            .map(|(m, rank)| RosterMember {
                rank,
                provider: m.provider,
                gpu: m.gpu,
                addr: provider_of(m).and_then(|p| p.session_addr.clone()),
            })
            .collect();
        let wall = match job.view.limits.wall_time_ms {
            0 => self.config.default_deadline_ms,
            ms => ms,
        };
        let expires = now_ms.saturating_add(wall).saturating_add(ROSTER_MARGIN_MS);
        let roster = Roster::issue(&signer, id.to_string(), module, roster_members, expires);
        let mut children: Vec<JobRecord> = Vec::with_capacity(fit.members.len());
        let mut views: Vec<MemberView> = Vec::with_capacity(fit.members.len());
        for (m, rank) in fit.members.iter().zip(0u32..) {
            let child = member_id(id, tries, rank);
            let p = provider_of(m);
            views.push(MemberView {
                rank,
                job_id: child.clone(),
                provider: m.provider,
                name: p.map(|p| p.name.clone()).unwrap_or_default(),
                region: p.map(|p| p.region.clone()).unwrap_or_default(),
                gpu: m.gpu,
                gpu_name: p.and_then(|p| p.gpus.get(m.gpu as usize)).map(|g| g.name.clone()).unwrap_or_default(),
                state: JobState::Running,
                usage: None,
                wall_time_ms: None,
                error: None,
            });
            children.push(JobRecord {
                view: JobView {
                    id: child,
                    renter: job.view.renter,
                    module: job.view.module.clone(),
                    state: JobState::Running,
                    requirements: job.view.requirements.clone(),
                    limits: job.view.limits.clone(),
                    submitted_at_ms: job.view.submitted_at_ms,
                    deadline_ms: job.view.deadline_ms,
                    queue_position: None,
                    no_match: None,
                    attempts: vec![Attempt {
                        provider: m.provider,
                        started_at_ms: now_ms,
                        ended_at_ms: None,
                        error: None,
                        resumed_from_step: checkpoint.as_ref().map(|c| c.step),
                    }],
                    provider: Some(m.provider),
                    usage: None,
                    outcome: None,
                    output_bytes: None,
                    wall_time_ms: None,
                    wall_time_us: None,
                    first_dispatch_us: None,
                    error: None,
                    receipt: None,
                    channel: None,
                    cluster: None,
                    member_of: Some(id.to_string()),
                    checkpoint: None,
                },
                // The input stays the cluster's: a member is never queued, so nothing sends
                // it from here (N copies of it would be kept for nothing).
                input: Vec::new(),
                result: None,
                seq: job.seq,
            });
        }
        let Some(first) = fit.members.first() else { return Ok(None) };
        let mut parent = job.clone();
        parent.view.state = JobState::Running;
        parent.view.provider = Some(first.provider);
        parent.view.queue_position = None;
        parent.view.no_match = None;
        parent.view.attempts.push(Attempt {
            provider: first.provider,
            started_at_ms: now_ms,
            ended_at_ms: None,
            error: None,
            resumed_from_step: checkpoint.as_ref().map(|c| c.step),
        });
        if let Some(c) = parent.view.cluster.as_mut() {
            c.members = views;
            c.slowest_link_ms = fit.slowest_ms;
            c.regions = fit.regions;
            c.tries = tries;
        }
        // Written before anything changes here: a failed write leaves the cluster queued (a
        // member written before it is a record that never ran, failed at the next start).
        for child in &children {
            self.store.put_job(child)?;
        }
        self.store.put_job(&parent)?;
        let input = parent.input.clone();
        let checkpoint = checkpoint.map(Box::new);
        let mut out = Vec::with_capacity(children.len());
        for ((child, m), rank) in children.into_iter().zip(&fit.members).zip(0u32..) {
            let child_id = child.view.id.clone();
            self.clusters.running.insert(child_id.clone(), Running { parent: id.to_string(), rank, gpu: m.gpu });
            self.update_provider(&m.provider, |p| p.assigned.insert(child_id.clone()));
            out.push(Assignment {
                job_id: child_id.clone(),
                provider: m.provider,
                module,
                input: input.clone(),
                limits: child.view.limits.clone(),
                renter: child.view.renter,
                member: Some(Box::new(MemberAssign { rank, roster: roster.clone() })),
                checkpoint: checkpoint.clone(),
            });
            self.jobs.insert(child_id, child);
        }
        self.jobs.insert(id.to_string(), parent);
        self.clusters.why.remove(id);
        self.clusters.avoid.remove(id);
        // Held until every member has started; an earlier try's hold is over by now.
        self.clusters.holds.release(id);
        let until = now_ms.saturating_add(self.config.cluster_start_timeout_ms);
        if let Err(e) = self.clusters.holds.hold(id, fit.members, until) {
            log::warn!("cluster {id}: its start is not timed: {e}");
        }
        Ok(Some(out))
    }

    /// A member's provider took it (its `Started`): once every member has, the cluster is
    /// running whole and no start timeout applies.
    pub fn member_started(&mut self, id: &str, provider: &PublicKey) {
        let Some(m) = self.clusters.running.get(id) else { return };
        if self.jobs.get(id).is_some_and(|j| j.view.provider.as_ref() == Some(provider)) {
            self.clusters.holds.started(&m.parent, m.rank as usize);
        }
    }

    /// A member's result: recorded as a job's is, then rolled up to its cluster.
    pub(super) fn member_finished(
        &mut self,
        id: &str,
        provider: &PublicKey,
        result: JobResult,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Outcome::Failed { kind, message, .. } = &result.outcome
            && !kind.is_kernel_fault()
        {
            let reason = format!("the provider failed ({kind}): {message}");
            return self.member_lost(id, provider, &reason, Some(result), now_ms);
        }
        if !self.record_result(id, provider, result, now_ms)? {
            return Ok(());
        }
        let Some(m) = self.clusters.running.remove(id) else { return Ok(()) };
        // Its report is what the rank before it is checked against.
        self.settle_parked(&m.parent, now_ms)?;
        let Some(child) = self.jobs.get(id) else { return Ok(()) };
        match (&child.view.state, &child.view.outcome) {
            (JobState::Failed, outcome) => {
                let message = match outcome {
                    Some(Outcome::Failed { message, .. }) => message.clone(),
                    _ => "it failed".to_string(),
                };
                let reason = format!("rank {} failed: {message}", m.rank);
                self.stop_members(&m.parent, &format!("the cluster stopped: {reason}"), now_ms)?;
                self.end_cluster(&m.parent, Some(id.to_string()), Some(reason), now_ms)
            }
            (JobState::Succeeded, _) => {
                let members = self.jobs.get(&m.parent).and_then(|p| p.view.cluster.as_ref()).map(|c| &c.members);
                let all = members.is_some_and(|ms| {
                    ms.iter().all(|x| self.jobs.get(&x.job_id).is_some_and(|j| j.view.state == JobState::Succeeded))
                });
                let first = members.and_then(|ms| ms.first()).map(|x| x.job_id.clone());
                if all { self.end_cluster(&m.parent, first, None, now_ms) } else { Ok(()) }
            }
            _ => Ok(()),
        }
    }

    /// A member's try ended for a reason another provider may not have (its provider failed,
    /// declined, went silent, disconnected): the member fails, the others are stopped, and the
    /// cluster is queued again whole (avoiding that provider) unless it has had its tries.
    pub(super) fn member_lost(
        &mut self,
        id: &str,
        provider: &PublicKey,
        reason: &str,
        result: Option<JobResult>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let Some(m) = self.clusters.running.get(id).cloned() else { return Ok(()) };
        let Some(job) = self.running_on(id, provider) else { return Ok(()) };
        job.view.state = JobState::Failed;
        job.view.error = Some(reason.to_string());
        if let Some(a) = job.view.attempts.last_mut() {
            a.ended_at_ms = Some(now_ms);
            a.error = Some(reason.to_string());
        }
        let outcome = result.as_ref().map(|r| r.outcome.clone());
        if let Some(r) = result {
            job.view.outcome = Some(r.outcome.clone());
            job.view.usage = Some(r.usage.clone());
            job.view.output_bytes = Some(r.output.len() as u64);
            job.view.wall_time_ms = Some(r.wall_time_ms);
            job.view.wall_time_us = Some(r.wall_time_us);
            job.result = Some(r);
        }
        let job = job.clone();
        self.clusters.running.remove(id);
        self.live_logs.remove(id);
        self.store.put_job(&job)?;
        let why = format!("rank {} on {provider}: {reason}", m.rank);
        self.requeue_cluster(&m.parent, &why, &[*provider], outcome, now_ms)
    }

    /// Stops every running member of cluster `parent`: each fails with `why`, stops counting
    /// on its provider, and is cancelled there.
    pub(super) fn stop_members(&mut self, parent: &str, why: &str, now_ms: u64) -> Result<(), StoreError> {
        let members: Vec<String> = self
            .jobs
            .get(parent)
            .and_then(|p| p.view.cluster.as_ref())
            .map(|c| c.members.iter().map(|m| m.job_id.clone()).collect())
            .unwrap_or_default();
        for child in members {
            if self.clusters.running.remove(&child).is_none() {
                continue;
            }
            let Some(job) = self.jobs.get_mut(&child).filter(|j| j.view.state == JobState::Running) else {
                continue;
            };
            job.view.state = JobState::Failed;
            job.view.error = Some(why.to_string());
            if let Some(a) = job.view.attempts.last_mut() {
                a.ended_at_ms = Some(now_ms);
                a.error = Some(why.to_string());
            }
            let provider = job.view.provider;
            let job = job.clone();
            self.live_logs.remove(&child);
            self.store.put_job(&job)?;
            // Its slot stays taken until the provider says the member ended (its stream's
            // result or loss frees it, as for any job): a cancel takes a moment to land, and a
            // retry placed there meanwhile would be declined.
            if let Some(p) = provider {
                self.revoked.entry(p).or_default().push(child);
            }
        }
        // The stopped report nothing: what waited on them is shown unchecked.
        self.settle_parked(parent, now_ms)
    }

    /// Shows the held last receipts that have waited [`MAX_HELD_MS`] (a tick's work).
    pub(super) fn settle_overdue(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let mut parents: Vec<String> = self
            .clusters
            .parked
            .values()
            .filter(|p| now_ms.saturating_sub(p.since_ms) >= MAX_HELD_MS)
            .map(|p| p.parent.clone())
            .collect();
        parents.sort();
        parents.dedup();
        for parent in parents {
            self.settle_parked(&parent, now_ms)?;
        }
        Ok(())
    }

    /// After a restart, the members' last receipts that were held are held again (from their
    /// stored results), and settled as far as their next ranks' records allow.
    pub(super) fn park_again(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let held: Vec<(String, String, PublicKey, proto::receipt::JobReceipt)> = self
            .jobs
            .values()
            .filter(|j| j.view.channel.as_ref().is_some_and(|c| c.held.is_some()))
            .filter_map(|j| {
                let receipt = j.result.as_ref().and_then(|r| r.receipt.clone()).or_else(|| j.view.receipt.clone())?;
                Some((j.view.id.clone(), j.view.member_of.clone()?, j.view.provider?, receipt))
            })
            .collect();
        let mut parents = Vec::new();
        for (id, parent, provider, receipt) in held {
            let rank = self
                .jobs
                .get(&parent)
                .and_then(|p| p.view.cluster.as_ref())
                .and_then(|c| c.members.iter().find(|m| m.job_id == id))
                .map(|m| m.rank);
            let Some(rank) = rank else { continue };
            self.clusters
                .parked
                .insert(id, Parked { parent: parent.clone(), rank, provider, receipt, since_ms: now_ms });
            parents.push(parent);
        }
        parents.sort();
        parents.dedup();
        for parent in parents {
            self.settle_parked(&parent, now_ms)?;
        }
        Ok(())
    }

    /// Queues cluster `parent` again at the front, whole (its running members stopped), unless
    /// it has had its tries: then it fails with every try's reason. `avoid` failed this try.
    fn requeue_cluster(
        &mut self,
        parent: &str,
        reason: &str,
        avoid: &[PublicKey],
        outcome: Option<Outcome>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.clusters.holds.release(parent);
        self.stop_members(parent, &format!("the cluster stopped: {reason}"), now_ms)?;
        let max_attempts = self.config.max_attempts;
        let Some(job) = self.jobs.get(parent).filter(|j| j.view.state == JobState::Running) else { return Ok(()) };
        let mut view = job.view.clone();
        if let Some(a) = view.attempts.last_mut() {
            a.ended_at_ms = Some(now_ms);
            a.error = Some(reason.to_string());
        }
        view.provider = None;
        let tries = view.cluster.as_ref().map_or(0, |c| c.tries) as usize;
        let requeue = tries < max_attempts;
        if requeue {
            view.state = JobState::Queued;
        } else {
            view.state = JobState::Failed;
            let reasons: Vec<String> = view.attempts.iter().filter_map(|a| a.error.clone()).collect();
            view.error = Some(format!("gave up after {tries} tries: {}", reasons.join("; ")));
            view.outcome = outcome;
        }
        self.refresh_members(&mut view);
        let Some(job) = self.jobs.get_mut(parent) else { return Ok(()) };
        job.view = view;
        let job = job.clone();
        self.store.put_job(&job)?;
        if requeue {
            self.clusters.avoid.insert(parent.to_string(), avoid.iter().copied().collect());
            // It has waited longest.
            self.queue.insert(0, parent.to_string());
        } else {
            self.clusters.avoid.remove(parent);
        }
        Ok(())
    }

    /// Ends cluster `parent` with member `source`'s result (rank 0's when it succeeded, the
    /// failing rank's otherwise): its output, log, receipt and provider, so that a renter checks
    /// the output against the receipt as for any job. Its usage is the sum of every member's
    /// (`sum_usage`), its wall time the slowest member's. `error` says why it failed.
    fn end_cluster(
        &mut self,
        parent: &str,
        source: Option<String>,
        error: Option<String>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.clusters.holds.release(parent);
        self.clusters.avoid.remove(parent);
        self.clusters.why.remove(parent);
        let Some(job) = self.jobs.get(parent).filter(|j| j.view.state == JobState::Running) else { return Ok(()) };
        let mut view = job.view.clone();
        let children: Vec<&JobRecord> = view
            .cluster
            .as_ref()
            .map(|c| c.members.iter().filter_map(|m| self.jobs.get(&m.job_id)).collect())
            .unwrap_or_default();
        let usage = sum_usage(children.iter().filter_map(|c| c.view.usage.as_ref()));
        let wall_ms = children.iter().filter_map(|c| c.view.wall_time_ms).max();
        let wall_us = children.iter().filter_map(|c| c.view.wall_time_us).max();
        let source = source.and_then(|s| self.jobs.get(&s));
        view.state = if error.is_some() { JobState::Failed } else { JobState::Succeeded };
        view.provider = source.and_then(|s| s.view.provider);
        view.receipt = source.and_then(|s| s.view.receipt.clone());
        view.output_bytes = source.and_then(|s| s.view.output_bytes);
        view.first_dispatch_us = source.and_then(|s| s.view.first_dispatch_us);
        view.outcome = source.and_then(|s| s.view.outcome.clone()).map(|o| match (o, &error) {
            (Outcome::Failed { kind, limit, .. }, Some(e)) => Outcome::Failed { kind, limit, message: e.clone() },
            (o, _) => o,
        });
        view.usage = usage.clone();
        view.wall_time_ms = wall_ms;
        view.wall_time_us = wall_us;
        view.error = error;
        if let Some(a) = view.attempts.last_mut() {
            a.ended_at_ms = Some(now_ms);
        }
        let result = source.and_then(|s| s.result.clone()).map(|mut r| {
            if let Some(u) = usage {
                r.usage = u;
            }
            r.wall_time_ms = wall_ms.unwrap_or(r.wall_time_ms);
            r.wall_time_us = wall_us.unwrap_or(r.wall_time_us);
            r
        });
        self.refresh_members(&mut view);
        let Some(job) = self.jobs.get_mut(parent) else { return Ok(()) };
        job.view = view;
        job.result = result;
        let job = job.clone();
        self.store.put_job(&job)
    }

    /// Clusters whose members did not all start in time go back to the queue whole, avoiding
    /// the providers of the ranks that did not start.
    pub(super) fn cluster_starts_expired(&mut self, now_ms: u64) -> Result<(), StoreError> {
        for (parent, late) in self.clusters.holds.expire(now_ms) {
            let members = self.jobs.get(&parent).and_then(|p| p.view.cluster.as_ref()).map(|c| c.members.clone());
            let late: Vec<&MemberView> =
                late.iter().filter_map(|&rank| members.as_ref().and_then(|ms| ms.get(rank))).collect();
            let ranks: Vec<String> = late.iter().map(|m| m.rank.to_string()).collect();
            let providers: Vec<PublicKey> = late.iter().map(|m| m.provider).collect();
            let reason = format!(
                "rank(s) {} did not start within {} s",
                ranks.join(", "),
                self.config.cluster_start_timeout_ms / 1000
            );
            self.requeue_cluster(&parent, &reason, &providers, None, now_ms)?;
        }
        Ok(())
    }

    /// A cluster's members as they are now: each one's state, usage and error from its own
    /// record.
    pub(super) fn refresh_members(&self, view: &mut JobView) {
        let Some(c) = view.cluster.as_mut() else { return };
        for m in &mut c.members {
            let Some(child) = self.jobs.get(&m.job_id) else { continue };
            m.state = child.view.state;
            m.usage = child.view.usage.clone();
            m.wall_time_ms = child.view.wall_time_ms;
            m.error = child.view.error.clone().or_else(|| match &child.view.outcome {
                Some(Outcome::Failed { message, .. }) => Some(message.clone()),
                _ => None,
            });
        }
    }

    /// The member whose output and log an ended cluster job's are: rank 0 when it succeeded,
    /// the rank whose kernel failed otherwise; `None` for a plain job or one with no output.
    pub fn output_member(&self, id: &str) -> Option<String> {
        let job = self.jobs.get(id)?;
        let members = &job.view.cluster.as_ref()?.members;
        job.result.as_ref()?;
        let failed_here = |m: &&MemberView| {
            self.jobs.get(&m.job_id).is_some_and(|c| {
                c.view.state == JobState::Failed
                    && matches!(&c.view.outcome, Some(Outcome::Failed { kind, .. }) if kind.is_kernel_fault())
            })
        };
        match job.view.state {
            JobState::Succeeded => members.first(),
            _ => members.iter().find(failed_here),
        }
        .map(|m| m.job_id.clone())
    }

    /// Whether job `id`'s output and log may be released: for a cluster job, whether every
    /// member of its last try is paid ([`JobView::paid`]; each member pays its own provider:
    /// the output is every member's work, not only the rank it comes from); for any other job,
    /// whether it is.
    pub fn released(&self, id: &str) -> bool {
        let Some(job) = self.jobs.get(id) else { return false };
        match (&job.view.cluster, self.output_member(id)) {
            (Some(c), Some(_)) => c.members.iter().all(|m| self.jobs.get(&m.job_id).is_some_and(|j| j.view.paid())),
            (_, Some(member)) => self.jobs.get(&member).is_some_and(|m| m.view.paid()),
            (_, None) => job.view.paid(),
        }
    }
}
