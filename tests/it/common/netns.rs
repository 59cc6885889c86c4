//! Network namespaces for transparency tests (root only): a namespace of the test's own with
//! its loopback up, addresses for pretend hosts, iptables `REDIRECT` rules, and threads that
//! run inside it. Deleted on drop.

use std::process::Command;

/// A network namespace of our own; deleted on drop.
pub struct Netns(String);

impl Netns {
    /// Creates `proxystack-{tag}-{pid}` with `lo` up and `addrs` (`"10.0.0.1/32"`,
    /// `"fe80::1/64"`) on `lo`: a loopback-only world where a test can give itself any
    /// address and from which no packet can leave the machine. `Err` with the reason when
    /// not root or namespaces are missing.
    pub fn create(tag: &str, addrs: &[&str]) -> Result<Self, String> {
        if !is_root() {
            return Err("needs root (network namespaces)".into());
        }
        let ns = Netns(format!("proxystack-{tag}-{}", std::process::id()));
        sh(&["ip", "netns", "add", &ns.0])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        for addr in addrs {
            ns.exec(&["ip", "addr", "add", addr, "dev", "lo"])?;
        }
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        sh(&[&["ip", "netns", "exec", &self.0][..], args].concat())
    }

    /// Redirects outgoing TCP to `dest` (`ip[/len]`, optionally only `dport`) to local
    /// `to_port`, except connections whose socket carries `mark` (what the proxy dials
    /// itself). Falls back to `iptables-legacy` where the nft backend is missing.
    pub fn redirect(
        &self,
        dest: &str,
        dport: Option<u16>,
        mark: u32,
        to_port: u16,
    ) -> Result<(), String> {
        let (mark, to_port) = (format!("{mark:#x}"), to_port.to_string());
        let dport = dport.map(|p| p.to_string());
        let rule = |bin: &str| {
            let mut args = vec![bin, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dest];
            if let Some(p) = &dport {
                args.extend(["--dport", p.as_str()]);
            }
            args.extend(["-m", "mark", "!", "--mark", &mark]);
            args.extend(["-j", "REDIRECT", "--to-ports", &to_port]);
            self.exec(&args)
        };
        rule("iptables")
            .or_else(|first| rule("iptables-legacy").map_err(|second| format!("{first}; {second}")))
    }

    /// Moves the calling thread into the namespace; sockets it creates live there.
    pub fn enter(&self) {
        enter(&self.0);
    }

    /// Runs the future `f` makes to completion on a new thread inside the namespace, with
    /// its own current-thread runtime: every socket the future opens is inside.
    pub fn block_on<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.0.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "delete", &self.0]);
    }
}

fn enter(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns(2) on a namespace fd we opened; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs a command; `Err` names it with its stderr.
pub fn sh(args: &[&str]) -> Result<(), String> {
    let (program, rest) = args.split_first().ok_or("empty command")?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process runs as root (namespaces and iptables need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
