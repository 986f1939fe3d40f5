//! Pure: a site's quota pool. Capacity, the ledger of allocations (kept in `FLSite.status`), and the admit / release
//! decisions. The ledger is a list of (job uid -> amount): releasing removes an entry, so a job's quota can only
//! ever be freed once, and admitting is idempotent.

use crate::api::{Allocation, Capacity, Quantity, Resources, Usage};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::HashSet;

/// An amount of quota, in exact integer units (CPU and memory in thousandths, so `500m` and `1.5Gi` are exact).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// Jobs.
    pub jobs: i64,
    /// GPUs.
    pub gpus: i64,
    /// CPU in millicores.
    pub cpu_milli: i128,
    /// Memory in thousandths of a byte.
    pub memory_milli: i128,
}

impl std::ops::Add for Amount {
    type Output = Amount;
    fn add(self, o: Amount) -> Amount {
        // Saturating: absurd quantities the API server accepts must not wrap a total around to "fits".
        Amount {
            jobs: self.jobs.saturating_add(o.jobs),
            gpus: self.gpus.saturating_add(o.gpus),
            cpu_milli: self.cpu_milli.saturating_add(o.cpu_milli),
            memory_milli: self.memory_milli.saturating_add(o.memory_milli),
        }
    }
}

/// Parses a Kubernetes quantity into thousandths of its unit, rounding up. None when it is not a quantity.
pub fn milli(q: &Quantity) -> Option<i128> {
    let s = q.0.trim();
    let (num, mult_num, mult_den): (&str, i128, i128) = {
        let binary = [("Ki", 1i128 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("Pi", 1 << 50), ("Ei", 1 << 60)];
        let decimal = [("n", 1, 1_000_000_000i128), ("u", 1, 1_000_000), ("m", 1, 1_000), ("k", 1_000, 1), ("M", 1_000_000, 1),
            ("G", 1_000_000_000, 1), ("T", 1_000_000_000_000, 1), ("P", 1_000_000_000_000_000, 1), ("E", 1_000_000_000_000_000_000, 1)];
        if let Some((suf, m)) = binary.iter().find(|(suf, _)| s.ends_with(suf)) {
            (&s[..s.len() - suf.len()], *m, 1)
        } else if let Some((suf, m, d)) = decimal.iter().find(|(suf, _, _)| s.ends_with(suf)) {
            (&s[..s.len() - suf.len()], *m, *d)
        } else if let Some(pos) = s.find(['e', 'E']) {
            let exp: u32 = s[pos + 1..].parse().ok()?;
            (&s[..pos], 10i128.checked_pow(exp)?, 1)
        } else {
            (s, 1, 1)
        }
    };
    let (negative, num) = match num.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, num.strip_prefix('+').unwrap_or(num)),
    };
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if int_part.is_empty() && frac_part.is_empty() || !int_part.chars().chain(frac_part.chars()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let scale = 10i128.checked_pow(frac_part.len() as u32)?;
    let mantissa: i128 = format!("{int_part}{frac_part}").parse().ok()?;
    // value = mantissa / scale * mult_num / mult_den, in thousandths, rounded up like Kubernetes does.
    let numer = mantissa.checked_mul(mult_num)?.checked_mul(1000)?;
    let denom = scale.checked_mul(mult_den)?;
    let v = numer.checked_add(denom - 1)? / denom;
    Some(if negative { -v } else { v })
}

fn cpu_quantity(m: i128) -> Quantity {
    Quantity(if m % 1000 == 0 { format!("{}", m / 1000) } else { format!("{m}m") })
}

fn memory_quantity(m: i128) -> Quantity {
    let bytes = m.saturating_add(999) / 1000;
    for (suf, unit) in [("Ti", 1i128 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes != 0 && bytes % unit == 0 {
            return Quantity(format!("{}{suf}", bytes / unit));
        }
    }
    Quantity(bytes.to_string())
}

/// What a job with these resources takes from the pool. Err names the field that is not a quantity.
pub fn demand(res: &Resources) -> Result<Amount, String> {
    let q = |name: &str, v: &Option<Quantity>| match v {
        None => Ok(0),
        Some(q) => milli(q).filter(|m| *m >= 0).ok_or_else(|| {
            // The API server checks the syntax (CEL isQuantity), so what reaches here is too large to count.
            format!("spec.resources.{name} {:?} is not a Kubernetes quantity this operator can count (too large?); ask for less", q.0)
        }),
    };
    Ok(Amount { jobs: 1, gpus: res.gpus.unwrap_or(0).max(0) as i64, cpu_milli: q("cpu", &res.cpu)?, memory_milli: q("memory", &res.memory)? })
}

/// The amount one allocation holds.
pub fn held(a: &Allocation) -> Amount {
    Amount {
        jobs: 1,
        gpus: a.gpus as i64,
        cpu_milli: a.cpu.as_ref().and_then(milli).unwrap_or(0),
        memory_milli: a.memory.as_ref().and_then(milli).unwrap_or(0),
    }
}

/// What the ledger holds in total.
pub fn total(allocations: &[Allocation]) -> Amount {
    allocations.iter().map(held).fold(Amount::default(), |a, b| a + b)
}

/// The ledger total in the shape of `FLSite.status.used`.
pub fn usage(allocations: &[Allocation]) -> Usage {
    let t = total(allocations);
    Usage {
        jobs: t.jobs as i32,
        gpus: t.gpus as i32,
        cpu: (t.cpu_milli > 0).then(|| cpu_quantity(t.cpu_milli)),
        memory: (t.memory_milli > 0).then(|| memory_quantity(t.memory_milli)),
    }
}

struct Limits {
    jobs: Option<i64>,
    gpus: Option<i64>,
    cpu: Option<i128>,
    memory: Option<i128>,
}

fn limits(c: &Capacity) -> Limits {
    Limits {
        jobs: c.jobs.map(i64::from),
        gpus: c.gpus.map(i64::from),
        cpu: c.cpu.as_ref().and_then(milli),
        memory: c.memory.as_ref().and_then(milli),
    }
}

/// What is short if `want` were added to `used` under `capacity`: one phrase per resource, empty when it fits.
pub fn shortfall(capacity: &Capacity, used: Amount, want: Amount) -> Vec<String> {
    let l = limits(capacity);
    let mut short = Vec::new();
    if let Some(max) = l.jobs.filter(|m| used.jobs.saturating_add(want.jobs) > *m) {
        short.push(format!("jobs: {} of {max} in use", used.jobs));
    }
    if let Some(max) = l.gpus.filter(|m| used.gpus.saturating_add(want.gpus) > *m) {
        short.push(format!("gpus: needs {}, {} of {max} free", want.gpus, max.saturating_sub(used.gpus).max(0)));
    }
    if let Some(max) = l.cpu.filter(|m| used.cpu_milli.saturating_add(want.cpu_milli) > *m) {
        short.push(format!("cpu: needs {}, {} of {} free", cpu_quantity(want.cpu_milli).0, cpu_quantity(max.saturating_sub(used.cpu_milli).max(0)).0, cpu_quantity(max).0));
    }
    if let Some(max) = l.memory.filter(|m| used.memory_milli.saturating_add(want.memory_milli) > *m) {
        short.push(format!(
            "memory: needs {}, {} of {} free",
            memory_quantity(want.memory_milli).0,
            memory_quantity(max.saturating_sub(used.memory_milli).max(0)).0,
            memory_quantity(max).0
        ));
    }
    short
}

/// A job as the site's ledger sees it.
#[derive(Debug, Clone)]
pub struct JobView {
    /// FLJob name.
    pub name: String,
    /// FLJob uid.
    pub uid: String,
    /// Creation time: admission is in this order.
    pub created: Option<Time>,
    /// The job wants quota (it is not finished, not aborted, not being deleted and its references resolve).
    pub wants_quota: bool,
    /// The job's references have not been checked yet (it was just created): it may want quota in a moment, so
    /// jobs created after it are admitted only beside the room it needs, never into it.
    pub undecided: bool,
    /// The job has finished (or its abort completed): anything it holds goes back to the pool.
    pub done: bool,
    /// What the job's own status says it holds. A running job's allocation missing from the ledger (the FLSite was
    /// deleted and re-created, or its status overwritten) is put back, so the pool never forgets a running job.
    pub recorded: Option<Resources>,
    /// Its resources.
    pub resources: Resources,
}

/// The site's new ledger, and what changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The new allocations.
    pub allocations: Vec<Allocation>,
    /// How many jobs wait for quota.
    pub queued: i32,
    /// Jobs admitted by this plan.
    pub admitted: Vec<String>,
    /// Jobs whose quota this plan frees.
    pub released: Vec<String>,
    /// Running jobs put back into a ledger that had lost them.
    pub restored: Vec<String>,
}

/// Order of admission: creation time, then name.
fn queue_order(a: &JobView, b: &JobView) -> std::cmp::Ordering {
    let ta = a.created.as_ref().map(|t| t.0);
    let tb = b.created.as_ref().map(|t| t.0);
    ta.cmp(&tb).then_with(|| a.name.cmp(&b.name))
}

/// What `resources` take from the pool, if they could ever fit in `capacity` (in an empty pool); None for a job
/// its reconciler fails instead of queueing: too large for the site, or not countable.
fn could_fit(capacity: &Capacity, resources: &Resources) -> Option<Amount> {
    demand(resources).ok().filter(|d| shortfall(capacity, Amount::default(), *d).is_empty())
}

/// The jobs waiting for quota, in admission order, that could ever fit.
pub fn queue<'a>(capacity: &Capacity, allocations: &[Allocation], jobs: &'a [JobView]) -> Vec<&'a JobView> {
    let holding: HashSet<&str> = allocations.iter().map(|a| a.uid.as_str()).collect();
    let mut waiting: Vec<&JobView> = jobs
        .iter()
        .filter(|j| j.wants_quota && !j.done && !holding.contains(j.uid.as_str()))
        .filter(|j| could_fit(capacity, &j.resources).is_some())
        .collect();
    waiting.sort_by(|a, b| queue_order(a, b));
    waiting
}

/// Releases what finished or vanished jobs hold, then admits waiting jobs strictly in creation order while they
/// fit (a job that does not fit blocks the ones behind it, so a large job is not starved by small ones). Jobs that
/// could never fit are left out of the queue: their reconciler fails them.
pub fn plan(capacity: &Capacity, allocations: &[Allocation], jobs: &[JobView], now: &Time) -> Plan {
    let mut out = Plan::default();
    // By uid: a ledger of A allocations and a site of N jobs is O(A + N), not O(A * N).
    let by_uid: std::collections::HashMap<&str, &JobView> = jobs.iter().map(|j| (j.uid.as_str(), j)).collect();
    for a in allocations {
        let job = by_uid.get(a.uid.as_str());
        if job.is_none_or(|j| j.done) {
            out.released.push(a.job.clone());
        } else {
            out.allocations.push(a.clone());
        }
    }
    let in_ledger: HashSet<String> = out.allocations.iter().map(|a| a.uid.clone()).collect();
    for j in jobs.iter().filter(|j| !j.done && !in_ledger.contains(&j.uid)) {
        if let Some(r) = &j.recorded {
            out.allocations.push(Allocation {
                job: j.name.clone(),
                uid: j.uid.clone(),
                gpus: r.gpus.unwrap_or(0),
                cpu: r.cpu.clone(),
                memory: r.memory.clone(),
                since: Some(now.clone()),
            });
            out.restored.push(j.name.clone());
        }
    }
    let waiting = queue(capacity, &out.allocations, jobs);
    let mut used = total(&out.allocations);
    // Jobs not checked yet (just created), in admission order. Each one created before a waiting job keeps its room
    // in the pool: the waiting job is admitted only if it fits beside them, and one that would not fit blocks what
    // is behind it, so a later job never takes what an earlier one needs. Waiting for them to be checked instead
    // held every job of a burst behind the slowest first reconcile (issue 12: most jobs of a 10,000-job burst got
    // a Queued write that way); a job whose check fails just gives its room back.
    let mut undecided: Vec<&JobView> = jobs.iter().filter(|j| j.undecided && !j.done && !in_ledger.contains(&j.uid)).collect();
    undecided.sort_by(|a, b| queue_order(a, b));
    let mut ahead = undecided.into_iter().peekable();
    let mut reserved = Amount::default();
    let mut blocked = false;
    for job in &waiting {
        let Ok(want) = demand(&job.resources) else { continue };
        while let Some(u) = ahead.next_if(|u| queue_order(u, job).is_lt()) {
            // One that could never fit (or cannot be counted) is failed by its reconciler, not queued.
            let Some(d) = could_fit(capacity, &u.resources) else { continue };
            if shortfall(capacity, used + reserved, d).is_empty() {
                reserved = reserved + d;
            } else {
                blocked = true;
            }
        }
        if !blocked && shortfall(capacity, used + reserved, want).is_empty() {
            used = used + want;
            out.admitted.push(job.name.clone());
            out.allocations.push(Allocation {
                job: job.name.clone(),
                uid: job.uid.clone(),
                gpus: want.gpus as i32,
                cpu: job.resources.cpu.clone(),
                memory: job.resources.memory.clone(),
                since: Some(now.clone()),
            });
        } else {
            blocked = true;
            out.queued += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn view(name: &str, created: i64, gpus: i32) -> JobView {
        JobView {
            name: name.into(),
            uid: format!("uid-{name}"),
            created: Some(t(created)),
            wants_quota: true,
            undecided: false,
            done: false,
            recorded: None,
            resources: Resources { gpus: Some(gpus), cpu: Some(q("1")), memory: Some(q("1Gi")), ephemeral_storage: None },
        }
    }

    #[test]
    fn parses_quantities_exactly() {
        for (s, m) in [("1", 1000), ("500m", 500), ("1.5", 1500), ("2Gi", 2i128 * (1 << 30) * 1000), ("1k", 1_000_000), ("1e3", 1_000_000), ("0.1m", 1)] {
            assert_eq!(milli(&q(s)), Some(m), "{s}");
        }
        for bad in ["", "abc", "1Zi", "--1", "1..2"] {
            assert_eq!(milli(&q(bad)), None, "{bad}");
        }
        assert_eq!(usage(&[Allocation { cpu: Some(q("1500m")), memory: Some(q("1536Mi")), ..Default::default() }]).cpu, Some(q("1500m")));
        assert_eq!(memory_quantity(3 * (1 << 30) * 1000).0, "3Gi");
    }

    #[test]
    fn admits_in_creation_order_up_to_capacity() {
        let cap = Capacity { jobs: Some(2), ..Default::default() };
        let jobs = vec![view("c", 3, 0), view("a", 1, 0), view("b", 2, 0)];
        let p = plan(&cap, &[], &jobs, &t(10));
        assert_eq!(p.admitted, vec!["a", "b"]);
        assert_eq!(p.queued, 1);
        assert_eq!(usage(&p.allocations).jobs, 2);
    }

    #[test]
    fn a_job_that_does_not_fit_blocks_the_ones_behind_it() {
        let cap = Capacity { gpus: Some(4), ..Default::default() };
        let held = plan(&cap, &[], &[view("first", 0, 3)], &t(0)).allocations;
        let jobs = vec![view("first", 0, 3), view("big", 1, 2), view("small", 2, 1)];
        let p = plan(&cap, &held, &jobs, &t(10));
        assert!(p.admitted.is_empty(), "small must not overtake big: {:?}", p.admitted);
        assert_eq!(p.queued, 2);
    }

    #[test]
    fn releases_finished_and_vanished_jobs_exactly_once() {
        let cap = Capacity { jobs: Some(2), ..Default::default() };
        let mut jobs = vec![view("a", 1, 0), view("b", 2, 0), view("c", 3, 0)];
        let p1 = plan(&cap, &[], &jobs, &t(10));
        jobs[0].done = true; // a finished
        jobs.remove(1); // b's FLJob vanished while the operator was down
        let p2 = plan(&cap, &p1.allocations, &jobs, &t(20));
        assert_eq!(p2.released, vec!["a", "b"]);
        assert_eq!(p2.admitted, vec!["c"]);
        // Planning again on the new ledger releases nothing more.
        let p3 = plan(&cap, &p2.allocations, &jobs, &t(30));
        assert!(p3.released.is_empty() && p3.admitted.is_empty());
        assert_eq!(p3.allocations, p2.allocations);
    }

    #[test]
    fn a_job_not_yet_checked_keeps_its_room_from_later_ones() {
        let mut first = view("first", 1, 0);
        first.wants_quota = false;
        first.undecided = true;
        let jobs = || vec![view("early", 0, 0), first.clone(), view("later", 2, 0), view("last", 3, 0)];
        // Room for all: later ones do not wait for first to be checked.
        let p = plan(&Capacity { jobs: Some(4), ..Default::default() }, &[], &jobs(), &t(10));
        assert_eq!(p.admitted, vec!["early", "later", "last"]);
        // Room for two: first's place is kept, so later (and last, behind it) wait.
        let p = plan(&Capacity { jobs: Some(2), ..Default::default() }, &[], &jobs(), &t(10));
        assert_eq!(p.admitted, vec!["early"], "later must not take what first needs");
        assert_eq!(p.queued, 2);
        // Once first is checked and admitted, the kept room is its own and nothing was over-admitted.
        let mut checked = jobs();
        checked[1].undecided = false;
        checked[1].wants_quota = true;
        let p2 = plan(&Capacity { jobs: Some(2), ..Default::default() }, &p.allocations, &checked, &t(20));
        assert_eq!(p2.admitted, vec!["first"]);
        // Or its check fails: it gives its room back.
        checked[1].wants_quota = false;
        let p3 = plan(&Capacity { jobs: Some(2), ..Default::default() }, &p.allocations, &checked, &t(20));
        assert_eq!(p3.admitted, vec!["later"]);
        // A gpu job not checked yet that does not fit blocks the cpu-only jobs behind it.
        let mut big = view("big", 1, 2);
        big.wants_quota = false;
        big.undecided = true;
        let p = plan(&Capacity { gpus: Some(2), ..Default::default() }, &[], &[view("early", 0, 1), big, view("later", 2, 0)], &t(10));
        assert_eq!(p.admitted, vec!["early"]);
    }

    #[test]
    fn a_ledger_that_lost_a_running_job_gets_it_back() {
        let cap = Capacity { jobs: Some(1), ..Default::default() };
        let mut running = view("running", 0, 0);
        running.wants_quota = false;
        running.recorded = Some(Resources { gpus: Some(0), cpu: Some(q("1")), memory: None, ephemeral_storage: None });
        let mut finished = view("finished", 0, 0);
        finished.done = true;
        finished.recorded = running.recorded.clone(); // released by the site, not yet cleared on the job
        let p = plan(&cap, &[], &[running, finished, view("waiting", 1, 0)], &t(10));
        assert_eq!(p.restored, vec!["running"]);
        assert!(p.admitted.is_empty(), "the restored job fills the pool");
        assert_eq!(p.queued, 1);
    }

    #[test]
    fn lowering_capacity_evicts_nothing() {
        let jobs = vec![view("a", 1, 0), view("b", 2, 0), view("c", 3, 0)];
        let p = plan(&Capacity { jobs: Some(2), ..Default::default() }, &[], &jobs, &t(10));
        let p2 = plan(&Capacity { jobs: Some(1), ..Default::default() }, &p.allocations, &jobs, &t(20));
        assert_eq!(p2.allocations.len(), 2);
        assert!(p2.admitted.is_empty());
        assert_eq!(p2.queued, 1);
    }

    #[test]
    fn jobs_that_can_never_fit_are_not_queued() {
        let cap = Capacity { gpus: Some(2), ..Default::default() };
        let p = plan(&cap, &[], &[view("huge", 0, 3), view("ok", 1, 1)], &t(0));
        assert_eq!(p.admitted, vec!["ok"]);
        assert_eq!(p.queued, 0);
    }

    #[test]
    fn shortfall_names_what_is_short() {
        let cap = Capacity { jobs: Some(1), gpus: Some(2), cpu: Some(q("4")), memory: Some(q("8Gi")) };
        let used = Amount { jobs: 1, gpus: 2, cpu_milli: 3500, memory_milli: 6 * (1 << 30) * 1000 };
        let want = Amount { jobs: 1, gpus: 1, cpu_milli: 1000, memory_milli: 4 * (1 << 30) * 1000 };
        assert_eq!(
            shortfall(&cap, used, want),
            vec!["jobs: 1 of 1 in use", "gpus: needs 1, 0 of 2 free", "cpu: needs 1, 500m of 4 free", "memory: needs 4Gi, 2Gi of 8Gi free"]
        );
        assert!(shortfall(&Capacity::default(), used, want).is_empty(), "absent keys are unlimited");
    }
}
