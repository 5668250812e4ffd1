//! Scale-out behind a real load balancer: Debian's HAProxy running `deploy/haproxy.cfg` in front of
//! three instances (echo pipeline, utterance mode), each on its own runtime as a process would be.
//! Sessions spread across the instances (leastconn); a full instance's 503 sends new sessions
//! elsewhere; a draining instance (the SIGTERM path) takes no new sessions while its running turn
//! finishes; a killed instance closes only its own sessions, and the clients' reconnects land on
//! the others; with fast health checks (`/readyz`) a full instance gets no attempt at all.
use futures_util::StreamExt;
use parley_protocol::ServerEvent;
use parley_server::config::{Config, EchoMode};
use parley_server::conversation::echo::EchoPipeline;
use parley_server::metrics::Refusal;
use parley_tests::server::Instance;
use parley_tests::ws::{Ws, connect, next_event, speak};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const MAX_SESSIONS: usize = 4;

/// An instance of four sessions, the echo in utterance mode.
fn instance() -> Instance {
    let mut config = Config { max_sessions: MAX_SESSIONS, ..Config::default() };
    config.echo.mode = EchoMode::Utterance;
    config.echo.endpoint_silence_ms = 300;
    let pipeline = Arc::new(EchoPipeline::new(config.echo.clone()));
    Instance::start(config, pipeline)
}

/// HAProxy running the shipped configuration; stopped when dropped.
struct Balancer {
    child: Child,
    addr: SocketAddr,
}

impl Balancer {
    async fn start(instances: &[Instance], check_inter: &str) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(config)
            .env("PARLEY_LB_BIND", addr.to_string())
            .env("PARLEY_A", instances[0].addr.to_string())
            .env("PARLEY_B", instances[1].addr.to_string())
            .env("PARLEY_C", instances[2].addr.to_string())
            .env("PARLEY_CHECK_INTER", check_inter)
            .spawn()
            .expect("haproxy runs (scripts/setup-system installs it)");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "haproxy never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Balancer { child, addr }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/voice", self.addr)
    }

    /// A session through the balancer (its first event read).
    async fn session(&self) -> Ws {
        let mut ws = connect(&self.url()).await;
        assert!(matches!(next_event(&mut ws).await, ServerEvent::SessionCreated { .. }));
        ws
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spread(instances: &[Instance]) -> Vec<u64> {
    instances.iter().map(Instance::sessions).collect()
}

/// Waits (10 s at most) until `test` holds.
async fn settle(what: &str, test: impl Fn() -> bool) {
    parley_tests::wait_until(what, Duration::from_secs(10), test).await
}

/// Whether `ws` is still served: a tone then silence in real time comes back as an echo.
async fn echoes(ws: &mut Ws) -> bool {
    if !speak(ws, 20, 60).await {
        return false;
    }
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return false,
            message = ws.next() => match message {
                Some(Ok(Message::Binary(_))) => return true,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_spreads_sessions_and_routes_around_full_draining_and_dead_instances() {
    let mut instances = [instance(), instance(), instance()];
    // Checks this rare do not run during the test: the 503s and failed connections alone must
    // move sessions (HAProxy's `retry-on 503 conn-failure` and `redispatch`).
    let balancer = Balancer::start(&instances, "1h").await;

    // Spread: nine sessions, three each.
    let mut sessions = Vec::new();
    for _ in 0..9 {
        sessions.push(balancer.session().await);
    }
    assert_eq!(spread(&instances), [3, 3, 3], "leastconn");
    drop(sessions);
    settle("the sessions to close", || spread(&instances) == [0, 0, 0]).await;

    // Full: a fills up directly; six new sessions through the balancer land on b and c.
    let mut direct = Vec::new();
    for _ in 0..MAX_SESSIONS {
        direct.push(connect(&format!("ws://{}/v1/voice", instances[0].addr)).await);
    }
    settle("a to be full", || instances[0].sessions() == MAX_SESSIONS as u64).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(balancer.session().await);
    }
    assert_eq!(spread(&instances), [4, 3, 3]);
    let refused = instances[0].metrics.sessions_refused(Refusal::Full);
    assert!(refused >= 1, "the balancer never tried the full instance");
    println!(
        "full: a refused {refused} upgrade(s) with 503; HAProxy retried them on b and c: {:?}",
        spread(&instances)
    );
    drop(direct);
    drop(sessions);
    settle("the sessions to close", || spread(&instances) == [0, 0, 0]).await;

    // Drain: one session on each instance starts a turn; b gets the shutdown signal while its
    // reply plays. b takes no new session; its turn finishes, then its session closes (1001) and
    // b exits; the others go on.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(balancer.session().await);
    }
    assert_eq!(spread(&instances), [1, 1, 1]);
    let mut talking = Vec::new();
    for ws in sessions {
        let (mut tx, rx) = ws.split();
        let sender = tokio::spawn(async move {
            speak(&mut tx, 75, u32::MAX).await;
        });
        talking.push((sender, rx));
    }
    settle("the replies to start", || instances.iter().all(|i| i.metrics.frames_sent.load(Relaxed) > 0)).await;
    let signalled = Instant::now();
    instances[1].terminate();
    let before = instances[1].accepted();
    let mut fresh = Vec::new();
    for _ in 0..4 {
        fresh.push(balancer.session().await);
    }
    assert_eq!(instances[1].accepted(), before, "a draining instance took a session");
    // Each client reads to its close (or 3 s): when it closed, with which code, after its reply's end?
    let closes = futures_util::future::join_all(talking.into_iter().map(|(sender, mut rx)| async move {
        let mut done = false;
        let close = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match rx.next().await {
                    Some(Ok(Message::Text(text))) => {
                        done |= matches!(ServerEvent::parse(text.as_str()), Ok(ServerEvent::ResponseAudioDone { .. }))
                    }
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        sender.abort();
        (close.ok(), done, signalled.elapsed())
    }))
    .await;
    let going_away: Vec<_> = closes.iter().filter(|(close, ..)| *close == Some(Some(1001))).collect();
    assert_eq!(going_away.len(), 1, "{closes:?}");
    let (_, done, closed_after) = going_away[0];
    assert!(done, "the draining instance's turn was cut: {closes:?}");
    tokio::time::timeout(Duration::from_secs(15), instances[1].exited()).await.unwrap();
    println!(
        "drain: b's running turn finished and its session closed (1001) {closed_after:?} after the signal; b exited after {:?}; new sessions: {:?}",
        signalled.elapsed(),
        spread(&instances)
    );
    drop(fresh);
    settle("the sessions to close", || instances[0].sessions() == 0 && instances[2].sessions() == 0).await;

    // Kill: c dies with two sessions open; a's go on; c's clients reconnect onto a.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(balancer.session().await);
    }
    assert_eq!([instances[0].sessions(), instances[2].sessions()], [2, 2]);
    instances[2].kill();
    let mut served = 0;
    let mut cut = 0;
    for ws in &mut sessions {
        if echoes(ws).await { served += 1 } else { cut += 1 }
    }
    assert_eq!((served, cut), (2, 2), "only the killed instance's sessions end");
    for _ in 0..cut {
        let mut ws = balancer.session().await;
        assert!(echoes(&mut ws).await);
        sessions.push(ws);
    }
    assert_eq!(instances[0].sessions(), 4, "the reconnects landed on a");
    println!("kill: c's 2 sessions were cut, a's 2 went on, 2 reconnects landed on a");
    drop(sessions);
    drop(balancer);

    // Fast checks: a full instance is marked down by its /readyz and gets no attempt at all.
    let mut instances = [instance(), instance(), instance()];
    let balancer = Balancer::start(&instances, "100ms").await;
    let mut direct = Vec::new();
    for _ in 0..MAX_SESSIONS {
        direct.push(connect(&format!("ws://{}/v1/voice", instances[0].addr)).await);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(balancer.session().await);
    }
    assert_eq!(spread(&instances), [4, 3, 3]);
    assert_eq!(instances[0].metrics.sessions_refused(Refusal::Full), 0, "the balancer tried a full instance");
    drop(direct);
    for instance in &mut instances {
        instance.kill();
    }
}
