//! Figures from outside the operator: Prometheus text (the API server's and the operator's /metrics), the
//! operator process's CPU and memory from /proc, and percentiles.

use std::collections::BTreeMap;

/// One sample: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// The samples of metric `name` in a Prometheus / OpenMetrics text exposition.
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (metric, rest) = l.split_at(l.find(['{', ' '])?);
            if metric != name {
                return None;
            }
            let (labels, rest) = match rest.strip_prefix('{') {
                Some(r) => {
                    let close = r.rfind('}')?;
                    (parse_labels(&r[..close]), &r[close + 1..])
                }
                None => (BTreeMap::new(), rest),
            };
            Some((labels, rest.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim_start_matches(',').trim().to_string();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
    }
    out
}

/// A request count keyed by (verb, resource[/subresource]), the way the operator's own counter names them.
pub type Requests = BTreeMap<(String, String), f64>;

/// The operator's `fljob_api_requests_total`.
pub fn operator_requests(text: &str) -> Requests {
    let mut out = Requests::new();
    for (l, v) in samples(text, "fljob_api_requests_total") {
        let key = (l.get("verb").cloned().unwrap_or_default(), l.get("resource").cloned().unwrap_or_default());
        *out.entry(key).or_default() += v;
    }
    out
}

/// The operator's `fljob_status_writes_total`, keyed "from->to".
pub fn status_writes(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "fljob_status_writes_total") {
        let key = format!("{}->{}", l.get("from").map_or("?", String::as_str), l.get("to").map_or("?", String::as_str));
        *out.entry(key).or_default() += v;
    }
    out
}

/// The operator's `fljob_events_total`, by reason.
pub fn events(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "fljob_events_total") {
        *out.entry(l.get("reason").cloned().unwrap_or_default()).or_default() += v;
    }
    out
}

/// The API server's `apiserver_request_total`, every client, resource requests only, summed over codes and scopes.
/// APPLY (server-side apply) is a PATCH as the client sees it.
pub fn apiserver_requests(text: &str) -> Requests {
    let mut out = Requests::new();
    for (l, v) in samples(text, "apiserver_request_total") {
        let resource = l.get("resource").cloned().unwrap_or_default();
        if resource.is_empty() {
            continue;
        }
        let sub = l.get("subresource").cloned().unwrap_or_default();
        let resource = if sub.is_empty() { resource } else { format!("{resource}/{sub}") };
        let verb = match l.get("verb").map(String::as_str).unwrap_or("") {
            "POST" => "create",
            "PUT" => "update",
            "PATCH" | "APPLY" => "patch",
            "DELETE" => "delete",
            "DELETECOLLECTION" => "deletecollection",
            "GET" => "get",
            "LIST" => "list",
            "WATCH" | "WATCHLIST" => "watch",
            _ => "other",
        };
        *out.entry((verb.to_string(), resource)).or_default() += v;
    }
    out
}

/// `apiserver_flowcontrol_dispatched_requests_total` by FlowSchema: what the API server let through for each
/// identity (our FlowSchemas match one ServiceAccount each).
pub fn dispatched_by_schema(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "apiserver_flowcontrol_dispatched_requests_total") {
        *out.entry(l.get("flow_schema").cloned().unwrap_or_default()).or_default() += v;
    }
    out
}

/// Sum and count of a histogram's samples for one label value (e.g. `controller="fljob"`).
pub fn histogram_sum_count(text: &str, name: &str, key: &str, value: &str) -> (f64, f64) {
    let pick = |suffix: &str| {
        samples(text, &format!("{name}_{suffix}"))
            .into_iter()
            .filter(|(l, _)| l.get(key).map(String::as_str) == Some(value))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    (pick("sum"), pick("count"))
}

/// `b - a`, key by key (keys only in `b` count from 0); zero differences are left out.
pub fn diff(a: &Requests, b: &Requests) -> Requests {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| v.abs() > 1e-9)
        .collect()
}

/// Whether a verb writes.
pub fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
}

/// CPU time (utime + stime) of a process, in seconds, and the clock-tick rate used to convert it.
pub fn cpu_seconds(pid: u32, ticks_per_sec: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields after it are space separated.
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat(5) are utime and stime; `after` starts at field 3.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec)
}

/// Clock ticks per second (`getconf CLK_TCK`); 100 (Linux's USER_HZ everywhere) when getconf is missing.
pub fn clock_ticks() -> (f64, bool) {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|t| (t, true))
        .unwrap_or((100.0, false))
}

/// A `kB` field of /proc/<pid>/status (VmHWM: peak RSS; VmRSS: now), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`, in the same unit; None when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}
