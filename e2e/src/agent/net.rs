//! Host networking for pods: the bridge `sluice0` (198.18.0.1/24), one network
//! namespace per pod with a veth pair onto the bridge, and Service cluster IPs as /32
//! addresses on the bridge.
//!
//! Nothing here routes off the machine: no NAT, no forwarding rules; each pod's only
//! route is the default route via the bridge address, and the host reaches pods through
//! the bridge's connected /24 route.
//!
//! When namespaces cannot be created, [`Network::fallback`] gives each pod a loopback
//! address (`127.0.1.x`) instead; pods then share the host network stack (two pods that
//! bind the same `0.0.0.0:port` collide), which the agent logs loudly.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// Name of the bridge the agent creates.
pub const BRIDGE: &str = "sluice0";
/// Prefix of the network namespaces the agent creates (`sluice-p<n>`).
pub const NETNS_PREFIX: &str = "sluice-p";
const VETH_PREFIX: &str = "slv";

/// Runs `ip` with the given arguments.
///
/// # Errors
/// When `ip` exits non-zero; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// How pods are given their network identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A network namespace per pod on the bridge (the normal mode).
    Namespaces,
    /// One loopback address per pod, no isolation (fallback).
    Loopback,
}

/// The pod network: mode and address pool.
#[derive(Debug)]
pub struct Network {
    mode: Mode,
    used: Mutex<Pool>,
}

/// Addresses in use, and the last one handed out: allocation continues after it
/// (round-robin) so a just-released address, still in neighbour caches with the old
/// veth's MAC, is not reused at once.
#[derive(Debug, Default)]
struct Pool {
    used: BTreeSet<u8>,
    last: u8,
}

/// A pod's network identity; [`Network::release`] undoes it.
#[derive(Debug, Clone)]
pub struct PodNet {
    /// The pod's IP address.
    pub ip: Ipv4Addr,
    /// The namespace the process runs in (`None` in loopback mode).
    pub netns: Option<String>,
    index: u8,
}

impl Network {
    /// Removes leftovers of an earlier agent (namespaces `sluice-p*`, the bridge), then
    /// creates the bridge and checks that a namespace with a veth works. Falls back to
    /// loopback mode (logged as an error) when it does not.
    pub fn setup(bridge_ip: Ipv4Addr) -> Self {
        cleanup_host();
        match Self::setup_bridge(bridge_ip).and_then(|()| Self::probe_netns()) {
            Ok(()) => Self { mode: Mode::Namespaces, used: Mutex::new(Pool::default()) },
            Err(e) => {
                tracing::error!(
                    "NETWORK NAMESPACES UNAVAILABLE ({e:#}); FALLING BACK TO ONE LOOPBACK IP PER \
                     POD (127.0.1.x). Pods share the host network: two pods binding the same \
                     port will collide."
                );
                Self::fallback()
            }
        }
    }

    /// Loopback mode without trying namespaces.
    pub fn fallback() -> Self {
        Self { mode: Mode::Loopback, used: Mutex::new(Pool::default()) }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn setup_bridge(bridge_ip: Ipv4Addr) -> Result<()> {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    fn probe_netns() -> Result<()> {
        let ns = format!("{NETNS_PREFIX}probe");
        let r = (|| {
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])
        })();
        ip_quiet(&["netns", "del", &ns]);
        r
    }

    /// Allocates an address and, in namespace mode, creates the pod's namespace with
    /// `eth0` on the bridge, `lo` up and a default route via the bridge.
    ///
    /// # Errors
    /// When the pool (253 addresses) is exhausted or an `ip` command fails.
    pub fn allocate(&self, bridge_ip: Ipv4Addr) -> Result<PodNet> {
        let index = {
            let mut pool = self.used.lock().unwrap_or_else(|p| p.into_inner());
            let after = pool.last.max(1);
            let i = (after + 1..=254u8)
                .chain(2..=after)
                .find(|i| !pool.used.contains(i))
                .context("pod address pool exhausted")?;
            pool.used.insert(i);
            pool.last = i;
            i
        };
        let o = bridge_ip.octets();
        match self.mode {
            Mode::Loopback => {
                let ip = Ipv4Addr::new(127, 0, 1, index);
                Ok(PodNet { ip, netns: None, index })
            }
            Mode::Namespaces => {
                let addr = Ipv4Addr::new(o[0], o[1], o[2], index);
                let ns = format!("{NETNS_PREFIX}{index}");
                let host = format!("{VETH_PREFIX}{index}h");
                let peer = format!("{VETH_PREFIX}{index}p");
                let net = PodNet { ip: addr, netns: Some(ns.clone()), index };
                let r = (|| {
                    ip_quiet(&["netns", "del", &ns]);
                    ip_quiet(&["neigh", "flush", "to", &addr.to_string(), "dev", BRIDGE]);
                    ip(&["netns", "add", &ns])?;
                    ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
                    ip(&["link", "set", &host, "master", BRIDGE])?;
                    ip(&["link", "set", &host, "up"])?;
                    ip(&["link", "set", &peer, "netns", &ns])?;
                    ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
                    ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                    ip(&["-n", &ns, "route", "add", "default", "via", &bridge_ip.to_string()])
                })();
                if let Err(e) = r {
                    self.release(&net);
                    return Err(e);
                }
                Ok(net)
            }
        }
    }

    /// Deletes the pod's namespace (which destroys its veth pair) and frees the address.
    pub fn release(&self, net: &PodNet) {
        if let Some(ns) = &net.netns {
            ip_quiet(&["netns", "del", ns]);
            ip_quiet(&["link", "del", &format!("{VETH_PREFIX}{}h", net.index)]);
        }
        if net.netns.is_some() {
            ip_quiet(&["neigh", "flush", "to", &net.ip.to_string(), "dev", BRIDGE]);
        }
        self.used.lock().unwrap_or_else(|p| p.into_inner()).used.remove(&net.index);
    }

    /// Adds a Service cluster IP as a /32 on the bridge (on `lo` in loopback mode) so
    /// forwarders can listen on it.
    ///
    /// # Errors
    /// When `ip addr add` fails for another reason than the address already existing.
    pub fn add_service_ip(&self, addr: Ipv4Addr) -> Result<()> {
        let dev = self.service_dev();
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{addr}/32"), "dev", dev])
            .output()
            .context("running ip")?;
        let err = String::from_utf8_lossy(&out.stderr);
        // Already there: another port of the same Service added it (iproute2 says
        // "File exists" or "Address already assigned" depending on its version).
        if !out.status.success()
            && !err.contains("File exists")
            && !err.contains("already assigned")
        {
            bail!("ip addr add {addr}/32 dev {dev}: {}", err.trim());
        }
        Ok(())
    }

    /// Removes a Service cluster IP added by [`Network::add_service_ip`].
    pub fn del_service_ip(&self, addr: Ipv4Addr) {
        ip_quiet(&["addr", "del", &format!("{addr}/32"), "dev", self.service_dev()]);
    }

    fn service_dev(&self) -> &'static str {
        match self.mode {
            Mode::Namespaces => BRIDGE,
            Mode::Loopback => "lo",
        }
    }
}

/// Deletes every namespace named `sluice-p*` and the bridge `sluice0` (with the veths
/// attached to it). Safe to call when nothing exists; used at agent start and stop, and
/// by test fixtures after a crash.
pub fn cleanup_host() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(NETNS_PREFIX) {
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    ip_quiet(&["link", "del", BRIDGE]);
}

/// The host-wide lock file that makes one node agent per machine.
pub const LOCK_PATH: &str = "/run/sluice-node-agent.lock";

/// An exclusive `flock` on [`LOCK_PATH`], released on drop (or when the process dies).
#[derive(Debug)]
pub struct HostLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn try_lock() -> Result<Option<HostLock>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("opening {LOCK_PATH}"))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(HostLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).context("flock"),
    }
}

/// Takes the host lock, waiting up to `timeout` while another agent holds it (this is
/// how concurrent test processes take turns on the bridge and subnet).
///
/// # Errors
/// When the lock is still held after `timeout`.
pub async fn acquire_host_lock(timeout: std::time::Duration) -> Result<HostLock> {
    let deadline = std::time::Instant::now() + timeout;
    let mut logged = false;
    loop {
        if let Some(lock) = try_lock()? {
            return Ok(lock);
        }
        if !logged {
            tracing::warn!(
                "another sluice-node-agent holds {LOCK_PATH}; waiting up to {timeout:?}"
            );
            logged = true;
        }
        if std::time::Instant::now() > deadline {
            bail!("another sluice-node-agent still holds {LOCK_PATH} after {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// [`cleanup_host`], but only when no agent is running (the host lock is free).
/// For test fixtures cleaning up after an agent that may have been killed.
pub fn cleanup_host_if_unused() {
    if let Ok(Some(_lock)) = try_lock() {
        cleanup_host();
    }
}
