//! A control plane of a test's own (`hack/cluster.sh up` with its own `FLJOB_CLUSTER_DIR`, kwok nodes only), for
//! tests that stop its API server or install older CRDs, which the shared cluster's other tests must never see.
//! Taken down when dropped; on a panic its logs are kept in `target/tmp/<name>-logs/` first.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The cluster.
pub struct OwnCluster {
    /// Its state dir.
    pub dir: PathBuf,
    name: String,
    nodes: u32,
}

impl OwnCluster {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/cluster.sh")
    }

    /// Starts `/tmp/fljob-<name>-<pid>` with `nodes` kwok nodes.
    pub fn up(name: &str, nodes: u32) -> OwnCluster {
        let c = OwnCluster { dir: PathBuf::from(format!("/tmp/fljob-{name}-{}", std::process::id())), name: name.into(), nodes };
        let t0 = Instant::now();
        if let Err(e) = c.cluster_sh(&["up"]) {
            panic!("{e}");
        }
        eprintln!("[{name}] own control plane up in {:.0?} at {}", t0.elapsed(), c.dir.display());
        c
    }

    /// Runs `hack/cluster.sh ARGS` on it (`stop kube-apiserver`, `start etcd`, ...).
    pub fn cluster_sh(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("bash")
            .arg(Self::script())
            .args(args)
            .env("FLJOB_CLUSTER_DIR", &self.dir)
            .env("FLJOB_NODES", self.nodes.to_string())
            .env("FLJOB_REAL_NODES", "0")
            .output()
            .map_err(|e| format!("cannot run hack/cluster.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("hack/cluster.sh {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Its admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Runs helm or kubectl (with a discovery cache of its own) against it; `Err` holds the output.
    pub fn tool(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new(super::tool(name));
        if name == "kubectl" {
            cmd.arg("--cache-dir").arg(self.dir.join("kubectl-cache"));
        }
        cmd.args(args).env("KUBECONFIG", self.kubeconfig()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().map_err(|e| format!("cannot run {name}: {e}"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(input.as_bytes()).map_err(|e| format!("writing to {name}: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("waiting for {name}: {e}"))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() { Ok(text) } else { Err(format!("{name} {} failed:\n{text}", args.join(" "))) }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if std::env::var("FLJOB_KEEP_OWN_CLUSTER").as_deref() == Ok("1") {
            eprintln!("[{}] kept the cluster at {} (FLJOB_KEEP_OWN_CLUSTER=1)", self.name, self.dir.display());
            return;
        }
        if std::thread::panicking() {
            // What the control plane logged (kwok's view of every pod) is kept for the post-mortem.
            let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-logs-{}", self.name, std::process::id()));
            let _ = Command::new("cp").arg("-r").arg(self.dir.join("logs")).arg(&keep).status();
            eprintln!("[{}] control plane logs kept in {}", self.name, keep.display());
        }
        let _ = Command::new("bash").arg(Self::script()).arg("down").env("FLJOB_CLUSTER_DIR", &self.dir).status();
    }
}
