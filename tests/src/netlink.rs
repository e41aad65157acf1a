//! Real links between a gateway and its cloud, made on this machine: two network
//! namespaces joined by one veth pair, shaped like cellular, satellite or a flaky site
//! network. Needs root (as CI has) and `ip`, `tc` and `nft`.
//!
//! - The cloud (a real Mosquitto on port 1883 of its namespace) and a persistent
//!   `mosquitto_sub` collector run in the cloud namespace; the gateway (`outpost`, started
//!   with `ip netns exec`) runs in the gateway namespace.
//! - Bandwidth: a `tbf` qdisc on both ends of the veth (each direction).
//! - Loss: an nftables `numgen random` rule on the veth's ingress in both namespaces, so
//!   each direction loses the given share of packets.
//! - Black hole: an nftables `drop` on the veth's ingress in both namespaces: packets
//!   vanish, nobody sends a RST (dropping on output would return EPERM to the sender).
//! - Link down: the cloud end of the veth set down, so the gateway end loses its carrier.
//! - Delay: this kernel has no `netem`, so a TCP relay of the harness, listening on the
//!   gateway namespace's loopback, holds each chunk for the one-way delay in each
//!   direction; the bridge's `address` points at it. The relay terminates TCP, so the
//!   veth segment (where loss happens) has a short RTT: TCP recovers from loss faster than
//!   over a real long path, while MQTT (keep alive, in-flight window) sees the full RTT.
//!
//! Every namespace, process and thread made here is torn down by `Drop`, also on panic.
//! Sockets for the gateway namespace (the relay, publishers) are created on a thread that
//! entered it with `setns`: a socket stays in the namespace it was made in.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{outpost_bin, parse_listening_port, strip_ansi};

/// The cloud broker's port inside its own namespace (nothing else listens there).
pub const CLOUD_PORT: u16 = 1883;

/// Chunks the relay holds per direction before it stops reading (its buffer bound).
const RELAY_CHUNKS: usize = 256;
/// Largest chunk the relay reads at once.
const RELAY_CHUNK: usize = 16 * 1024;
/// The relay gives up reaching the cloud after this long (the bridge has given up before).
const RELAY_CONNECT: Duration = Duration::from_secs(10);
/// Bound for a namespace command or process start.
const WAIT: Duration = Duration::from_secs(10);

/// How a link behaves: one-way delay, loss per direction, bandwidth per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Propagation delay in each direction.
    pub delay: Duration,
    /// Packets lost per thousand, in each direction.
    pub loss_permille: u32,
    /// Bandwidth in kbit/s in each direction (0 = unshaped).
    pub rate_kbit: u32,
}

impl Shape {
    /// A clean link: no delay, no loss, no bandwidth limit.
    pub const CLEAN: Shape = Shape {
        delay: Duration::ZERO,
        loss_permille: 0,
        rate_kbit: 0,
    };
    /// Cellular: 300 ms each way, 1% loss, 1 Mbit/s.
    pub const CELLULAR: Shape = Shape {
        delay: Duration::from_millis(300),
        loss_permille: 10,
        rate_kbit: 1000,
    };
    /// Geostationary satellite: 600 ms each way, 0.5% loss, 256 kbit/s.
    pub const SATELLITE: Shape = Shape {
        delay: Duration::from_millis(600),
        loss_permille: 5,
        rate_kbit: 256,
    };
}

/// Runs `cmd` to completion; panics with its stderr if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (needs iproute2 and nftables)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Runs `nft -f -` with `script` inside namespace `ns`.
fn nft(ns: &str, script: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec nft (apt-get install nftables)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("write nft script");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft in {ns} failed on\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills every process still in namespace `ns` (only processes this harness started can
/// be there: the namespace is private to one test).
fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A tokio runtime on a thread inside a network namespace: every socket its tasks create
/// belongs to that namespace.
struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn enter(ns: &str) -> NsRuntime {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .unwrap_or_else(|e| panic!("open /var/run/netns/{ns}: {e}"));
        let (tx, rx) = std_mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn(move || {
                // setns changes only this thread; the test's own threads stay outside.
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the gateway namespace (needs root)");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("namespace runtime");
                let _ = tx.send(rt.handle().clone());
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("spawn namespace thread");
        let handle = rx.recv_timeout(WAIT).expect("namespace runtime started");
        NsRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two namespaces joined by a veth pair, with the cloud side and the shaping under the
/// test's control. Dropping it kills what runs inside and deletes both namespaces.
pub struct NetLink {
    /// The gateway's namespace.
    pub gw_ns: String,
    /// The cloud's namespace.
    pub cloud_ns: String,
    /// The veth end in the gateway namespace.
    pub gw_if: String,
    /// The veth end in the cloud namespace.
    pub cloud_if: String,
    /// The cloud end's address.
    pub cloud_ip: Ipv4Addr,
    delay_ms: Arc<AtomicU64>,
    relay_port: u16,
    cloud: Option<Child>,
    dir: tempfile::TempDir,
    rt: Option<NsRuntime>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl NetLink {
    /// Makes the namespaces, the veth pair (a private /30), loopback up in each, the
    /// nftables chains for loss and black hole, and the delaying relay (no delay yet).
    pub fn new() -> NetLink {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names have at most 15 bytes; namespace names are free.
        let tag = format!("{:x}{seq:x}", pid % 0x10_0000);
        let gw_ns = format!("outpost-gw-{pid}-{seq}");
        let cloud_ns = format!("outpost-cloud-{pid}-{seq}");
        let gw_if = format!("og{tag}");
        let cloud_if = format!("oc{tag}");
        // Both ends live in namespaces of their own, so the same /30 in two tests cannot
        // clash; it still varies to keep captures readable.
        let third = (seq % 250) as u8;
        let cloud_ip = Ipv4Addr::new(10, 200, third, 1);
        let gw_ip = Ipv4Addr::new(10, 200, third, 2);
        let dir = tempfile::tempdir().expect("tempdir");
        use std::os::unix::fs::PermissionsExt;
        // Mosquitto started as root drops to its own user and must write its database.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod tempdir");
        let mut link = NetLink {
            gw_ns,
            cloud_ns,
            gw_if,
            cloud_if,
            cloud_ip,
            delay_ms: Arc::new(AtomicU64::new(0)),
            relay_port: 0,
            cloud: None,
            dir,
            rt: None,
        };
        // From here on, Drop cleans up whatever was made, also if a step below fails.
        ip(&["netns", "add", &link.gw_ns]);
        ip(&["netns", "add", &link.cloud_ns]);
        ip(&[
            "link",
            "add",
            &link.gw_if,
            "netns",
            &link.gw_ns,
            "type",
            "veth",
            "peer",
            "name",
            &link.cloud_if,
            "netns",
            &link.cloud_ns,
        ]);
        for (ns, ifname, addr) in [
            (&link.gw_ns, &link.gw_if, gw_ip),
            (&link.cloud_ns, &link.cloud_if, cloud_ip),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                ifname,
            ]);
            ip(&["-n", ns, "link", "set", ifname, "up"]);
            // Loss and the black hole act on what arrives over the veth only: the
            // namespace's loopback (publishers, relay, collector) stays clean.
            nft(
                ns,
                &format!(
                    "table inet outpost {{\n\
                       chain loss {{ }}\n\
                       chain hole {{ }}\n\
                       chain input {{ type filter hook input priority 0; policy accept;\n\
                         iifname \"{ifname}\" jump hole\n\
                         iifname \"{ifname}\" jump loss\n\
                       }}\n\
                     }}\n"
                ),
            );
        }
        let rt = NsRuntime::enter(&link.gw_ns);
        let target = SocketAddr::from((cloud_ip, CLOUD_PORT));
        let delay = Arc::clone(&link.delay_ms);
        let (tx, rx) = std_mpsc::channel();
        rt.handle.spawn(async move {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the relay");
            let _ = tx.send(listener.local_addr().expect("relay addr").port());
            relay(listener, target, delay).await;
        });
        link.rt = Some(rt);
        link.relay_port = rx.recv_timeout(WAIT).expect("relay listening");
        link
    }

    /// Applies `shape`: the relay's delay, `tbf` on both veth ends, the loss rule.
    pub fn shape(&self, shape: Shape) {
        self.delay_ms
            .store(shape.delay.as_millis() as u64, Ordering::Relaxed);
        for (ns, ifname) in [(&self.gw_ns, &self.gw_if), (&self.cloud_ns, &self.cloud_if)] {
            // `replace` also works when no qdisc of ours is there yet.
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "root",
                ])
                .stderr(Stdio::null())
                .status();
            if shape.rate_kbit > 0 {
                // A queue of about 250 ms at the link rate (a modem's buffer), and a burst
                // of a few full-size frames so the rate holds at small time scales.
                let limit = (u64::from(shape.rate_kbit) * 1000 / 8 / 4).max(16_000);
                run(Command::new("ip").args([
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    ifname,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{}kbit", shape.rate_kbit),
                    "burst",
                    "6000",
                    "limit",
                    &limit.to_string(),
                ]));
            }
            let rule = if shape.loss_permille > 0 {
                format!(
                    "add rule inet outpost loss numgen random mod 1000 < {} drop\n",
                    shape.loss_permille
                )
            } else {
                String::new()
            };
            nft(ns, &format!("flush chain inet outpost loss\n{rule}"));
        }
    }

    /// Turns the silent black hole on or off: every packet over the veth is dropped on
    /// arrival in both directions, and nobody answers with a RST.
    pub fn black_hole(&self, on: bool) {
        for ns in [&self.gw_ns, &self.cloud_ns] {
            let script = if on {
                "flush chain inet outpost hole\nadd rule inet outpost hole drop\n"
            } else {
                "flush chain inet outpost hole\n"
            };
            nft(ns, script);
        }
    }

    /// Takes the site link down (the cloud end of the veth down: the gateway end loses its
    /// carrier and its route) or up again.
    pub fn link_up(&self, up: bool) {
        ip(&[
            "-n",
            &self.cloud_ns,
            "link",
            "set",
            &self.cloud_if,
            if up { "up" } else { "down" },
        ]);
    }

    /// The bridge `address` that reaches the cloud through the delaying relay.
    pub fn cloud_address(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.relay_port)
    }

    /// Runs `fut` on the gateway namespace's runtime (its sockets are in that namespace).
    pub fn spawn_in_gateway<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt
            .as_ref()
            .expect("namespace runtime")
            .handle
            .spawn(fut)
    }

    /// Starts the cloud: Mosquitto in its namespace with a persistent store, `extra` lines
    /// appended to its config; waits until it listens.
    pub fn start_cloud(&mut self, extra: &str) {
        let conf = self.dir.path().join("cloud.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {CLOUD_PORT}\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 sys_interval 1\n{extra}\n",
                self.dir.path().display()
            ),
        )
        .expect("write cloud.conf");
        let child = self
            .ns_command(&self.cloud_ns, mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.cloud = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let ok = self
                .ns_command(&self.cloud_ns, "mosquitto_sub")
                .args(["-h", "127.0.0.1", "-t", "probe", "-E", "-W", "2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cloud mosquitto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn ns_command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a persistent QoS 2 collector (`mosquitto_sub -c -q 2`) at the cloud on
    /// `filter`; it exits after `secs` seconds (not after a count: a QoS 1 duplicate would
    /// make it stop one message short). Its session is made
    /// first (subscribe, wait for the SUBACK, leave), so the cloud queues for it from then
    /// on whatever happens to the collector process.
    pub fn collector(&self, id: &str, filter: &str, secs: u32) -> Collector {
        let registered = self
            .ns_command(&self.cloud_ns, "mosquitto_sub")
            .args(["-h", "127.0.0.1", "-i", id, "-c", "-q", "2", "-t", filter])
            .args(["-E", "-W", "10"])
            .stdout(Stdio::null())
            .status()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        assert!(registered.success(), "collector {id} could not subscribe");
        let out = self.dir.path().join(format!("{id}.out"));
        let file = std::fs::File::create(&out).expect("collector output");
        let child = self
            .ns_command(&self.cloud_ns, "mosquitto_sub")
            .args(["-h", "127.0.0.1", "-i", id, "-c", "-q", "2", "-t", filter])
            .args(["-v", "-W", &secs.to_string()])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        Collector { child, out }
    }

    /// Starts `outpost` in the gateway namespace with `config` (its state in a directory
    /// of the link's own) and waits for its listener.
    pub fn start_gateway(&self, config: &str) -> Gateway {
        let dir = self
            .dir
            .path()
            .join(format!("gateway-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).expect("gateway dir");
        let config_path = dir.join("outpost.toml");
        std::fs::write(&config_path, config).expect("write outpost.toml");
        let mut g = Gateway {
            ns: self.gw_ns.clone(),
            dir,
            config_path,
            child: None,
            port: 0,
            log: Arc::new(Mutex::new(String::new())),
        };
        g.spawn();
        g
    }
}

impl Default for NetLink {
    fn default() -> NetLink {
        NetLink::new()
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        if let Some(mut c) = self.cloud.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Stops the relay and publishers before their namespace goes.
        self.rt.take();
        for ns in [&self.gw_ns, &self.cloud_ns] {
            kill_all_in(ns);
            // Deleting a namespace destroys the veth end inside it, and so the pair.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn mosquitto_bin() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto")
}

/// A persistent QoS 2 session at the cloud collecting what the bridge forwards.
pub struct Collector {
    child: Child,
    out: PathBuf,
}

impl Collector {
    /// What it printed so far (`topic payload` lines).
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `done` holds for the lines (checked every 200 ms) or `wait` passes;
    /// returns the lines either way.
    pub fn wait_until(&self, wait: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + wait;
        loop {
            let lines = self.lines();
            if done(&lines) || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `outpost` binary running in the gateway namespace; killed on drop.
pub struct Gateway {
    ns: String,
    dir: PathBuf,
    config_path: PathBuf,
    child: Option<Child>,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    fn spawn(&mut self) {
        // `ip netns exec` execs the program, so the child's PID is outpost's own.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(outpost_bin())
            .arg("--config")
            .arg(&self.config_path)
            .env("STATE_DIRECTORY", &self.dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .env_remove("OUTPOST_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec outpost");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let (tx, rx) = std_mpsc::channel::<u16>();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = parse_listening_port(&line)
                    && let Some(t) = tx.take()
                {
                    let _ = t.send(port);
                }
                if let Ok(mut l) = log.lock() {
                    l.push_str(&strip_ansi(&line));
                    l.push('\n');
                }
            }
        });
        match rx.recv_timeout(WAIT) {
            Ok(port) => self.port = port,
            Err(_) => {
                self.kill9();
                panic!(
                    "outpost did not listen in {}; stderr:\n{}",
                    self.ns,
                    self.log()
                );
            }
        }
    }

    /// The gateway's MQTT port on its namespace's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything it wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many times `needle` occurs in the log.
    pub fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits up to `wait` for `needle` to occur `times` times; true if it did.
    pub fn wait_for_log(&self, needle: &str, times: usize, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.count(needle) >= times {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- gateway stderr ----\n{}", self.log());
        }
    }
}

/// Accepts on `listener` and relays each connection to `target`, holding every chunk for
/// the current delay in each direction.
async fn relay(listener: TcpListener, target: SocketAddr, delay: Arc<AtomicU64>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let _ = inbound.set_nodelay(true);
        tokio::spawn(relay_one(inbound, target, Arc::clone(&delay)));
    }
}

async fn relay_one(inbound: TcpStream, target: SocketAddr, delay: Arc<AtomicU64>) {
    let (ir, iw) = inbound.into_split();
    let (up_tx, up_rx) = mpsc::channel(RELAY_CHUNKS);
    let read_up = hold(ir, up_tx, Arc::clone(&delay));
    tokio::pin!(read_up);
    // If the gateway gives up while the cloud is unreachable, so does the relay, as a
    // kernel would abort the SYNs of a socket its owner closed: a late connect must not
    // carry a stale CONNECT that takes over the bridge's newer session.
    let outbound = tokio::select! {
        c = tokio::time::timeout(RELAY_CONNECT, TcpStream::connect(target)) => match c {
            Ok(Ok(s)) => s,
            _ => return,
        },
        _ = &mut read_up => return,
    };
    let _ = outbound.set_nodelay(true);
    let (or, ow) = outbound.into_split();
    let (down_tx, down_rx) = mpsc::channel(RELAY_CHUNKS);
    let up = async {
        let _ = tokio::join!(&mut read_up, release(up_rx, ow));
    };
    let down = async {
        let _ = tokio::join!(hold(or, down_tx, delay), release(down_rx, iw));
    };
    // Either side closing closes both, once what it sent has been delivered.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Reads chunks and queues each with the time it may leave.
async fn hold<R: AsyncReadExt + Unpin>(
    mut r: R,
    tx: mpsc::Sender<(tokio::time::Instant, Vec<u8>)>,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let due = tokio::time::Instant::now()
                    + Duration::from_millis(delay.load(Ordering::Relaxed));
                if tx.send((due, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes each queued chunk once its time has come; shuts the write side down at the end.
async fn release<W: AsyncWriteExt + Unpin>(
    mut rx: mpsc::Receiver<(tokio::time::Instant, Vec<u8>)>,
    mut w: W,
) {
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if w.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}
