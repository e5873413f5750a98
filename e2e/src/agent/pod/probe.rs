//! Readiness probes: httpGet or tcpSocket from the host to the pod's address.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::PodRun;

impl PodRun {
    pub(super) fn probe_spec(&self) -> Option<&Probe> {
        self.container().and_then(|c| c.readiness_probe.as_ref())
    }

    pub(super) async fn probe(&mut self) {
        if self.c.child.is_none() {
            self.c.next_probe = None;
            return;
        }
        let Some(probe) = self.probe_spec().cloned() else {
            self.c.ready = true;
            self.c.next_probe = None;
            return;
        };
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        self.c.next_probe = Some(Instant::now() + period);
        let ok = match self.ip() {
            Some(ip) => run_probe(&probe, ip, self.container(), timeout).await,
            None => false,
        };
        if ok {
            self.c.probe_ok += 1;
            self.c.probe_fail = 0;
            if self.c.probe_ok >= probe.success_threshold.unwrap_or(1).max(1) {
                self.c.ready = true;
            }
        } else {
            self.c.probe_fail += 1;
            self.c.probe_ok = 0;
            if self.c.probe_fail >= probe.failure_threshold.unwrap_or(3).max(1) {
                self.c.ready = false;
            }
        }
    }
}

fn resolve_port(port: &IntOrString, c: Option<&Container>) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c?
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One readiness check from the host to the pod's address: httpGet (2xx/3xx) or
/// tcpSocket (connect). exec and grpc probes are not supported and count as success.
pub(super) async fn run_probe(
    probe: &Probe,
    ip: Ipv4Addr,
    c: Option<&Container>,
    timeout: Duration,
) -> bool {
    let attempt = async {
        if let Some(h) = &probe.http_get {
            let port = resolve_port(&h.port, c)?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let mut s = tokio::net::TcpStream::connect(SocketAddr::from((ip, port))).await.ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/sluice\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let r = s.read(&mut buf[n..]).await.ok()?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(t) = &probe.tcp_socket {
            let port = resolve_port(&t.port, c)?;
            Some(tokio::net::TcpStream::connect(SocketAddr::from((ip, port))).await.is_ok())
        } else {
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
