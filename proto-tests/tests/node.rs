//! `initialize` for real, in a network namespace this test creates: the link and addresses
//! appear (checked over netlink), a second run changes nothing, and `server` with its default
//! bind hosts serves credentials on 169.254.170.23 and [fd00:ec2::23]. Needs root and
//! iproute2's `ip` (`scripts/test`, run as root in CI, installs it); without them the test
//! fails saying what is missing, it never passes unchecked.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use proto_tests::agent::agent_binary;
use proto_tests::http::{send, RawRequest};
use proto_tests::keys::{write_jwks, Pod, TestKeys};
use proto_tests::FakeEksAuth;

const LINK: &str = "pod-id-link0";
const V4: &str = "169.254.170.23";
const V6: &str = "fd00:ec2::23";

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        let name = format!("pia-test-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        run(ns.exec("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// Run `f` on a thread that has entered the namespace, with its own runtime, so every
    /// socket it opens lives in the namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Kills the agent on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn initialize_twice_then_serve_on_the_link_local_addresses() {
    assert!(
        is_root(),
        "not root: creating the test's network namespace needs root; run the tests as root \
         (scripts/test does in CI)"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "no `ip`: iproute2 is needed to create the test's network namespace (scripts/test \
         installs it)"
    );
    let ns = Netns::create();

    let first = run(ns
        .exec(agent_binary())
        .args(["initialize", "--log-format", "text"]));
    assert!(first.contains(&format!("added [{V4},{V6}]")), "{first}");
    let second = run(ns
        .exec(agent_binary())
        .args(["initialize", "--log-format", "text"]));
    assert!(
        second.contains("added []") && second.contains(&format!("already present [{V4},{V6}]")),
        "{second}"
    );
    let link = if first.contains("fell back to lo") {
        "lo"
    } else {
        LINK
    };

    // Read back with getifaddrs(3), not with the agent's own netlink code.
    let addrs: Vec<IpAddr> = ns.within(move || {
        let all = nix::ifaddrs::getifaddrs().expect("getifaddrs");
        all.filter(|i| i.interface_name == link)
            .filter_map(|i| i.address)
            .filter_map(|a| {
                let v4 = a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()));
                v4.or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect()
    });
    for want in [V4, V6] {
        assert!(
            addrs.contains(&want.parse::<IpAddr>().unwrap()),
            "{want} not on {link}: {addrs:?}"
        );
    }

    // The fake EKS Auth and the client live in the namespace too; the agent is started in it
    // with its default --bind-hosts and --port.
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let keys = TestKeys::shared();
    write_jwks(&jwks, &[&keys.rsa]).unwrap();
    let token = Pod::new("team-a", "app", "app-0").token().sign(&keys.rsa);

    ns.within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let upstream = FakeEksAuth::start().await;
            let child = ns_agent(&jwks, &upstream.url());
            let _agent = Running(child);
            for (addr, host) in [
                (SocketAddr::new(V4.parse().unwrap(), 80), V4.to_owned()),
                (SocketAddr::new(V6.parse().unwrap(), 80), format!("[{V6}]")),
            ] {
                let response = poll_credentials(addr, &host, &token).await;
                assert_eq!(response.status, 200, "{addr}: {response:?}");
                assert!(response
                    .json_str("AccessKeyId")
                    .unwrap()
                    .starts_with("ASIA"));
            }
            assert_eq!(
                upstream.calls(),
                1,
                "the second address is served from the cache"
            );
        });
    });
}

/// The agent, started inside the namespace the calling thread is in (`ip netns exec` would
/// start it in the named namespace; here the spawning thread already is, and children inherit
/// it).
fn ns_agent(jwks: &std::path::Path, endpoint: &str) -> Child {
    Command::new(agent_binary())
        .args(
            "server --cluster-name node-test --probe-port 0 --metrics-address 127.0.0.1 \
             --metrics-port 0 --region us-west-2 --log-format json"
                .split_whitespace(),
        )
        .args(["--endpoint", endpoint])
        .arg("--jwks-file")
        .arg(jwks)
        .args(["--issuer", proto_tests::keys::DEFAULT_ISSUER])
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .envs(proto_tests::agent::NO_AMBIENT_AWS)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the agent in the namespace")
}

/// Retry until the listener is up (bounded: 20 s).
async fn poll_credentials(
    addr: SocketAddr,
    host: &str,
    token: &str,
) -> proto_tests::http::RawResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = RawRequest::get("/v1/credentials")
            .header("Host", host)
            .header("Authorization", token)
            .header("Connection", "close");
        match send(addr, &req).await {
            // Listening comes before the keys are loaded: 503 with Retry-After until then,
            // which an SDK retries too.
            Ok(r) if r.status == 503 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{addr}: {e}"),
        }
    }
}
