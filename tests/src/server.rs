//! A real Parley server on 127.0.0.1:0 for one test, with the pipeline the test chooses: in the
//! test's runtime ([`TestServer`]), or on a runtime of its own, as a process would be ([`Instance`]).
use parley_server::config::Config;
use parley_server::conversation::Pipeline;
use parley_server::conversation::voice::{VoiceConfig, VoicePipeline};
use parley_server::metrics::Metrics;
use parley_server::models::Manifest;
use parley_server::safety::SafetyConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The voice pipeline (every model, from the provisioned cache; seconds: call it off the async
/// runtime), its safety audit log at [`audit_log`]`(test)`.
pub fn voice_pipeline(test: &str) -> Arc<VoicePipeline> {
    let manifest = Manifest::load_default().unwrap_or_else(|e| panic!("{e}"));
    let safety = SafetyConfig { audit_log: audit_log(test), ..Default::default() };
    let pipeline = VoicePipeline::load(manifest, VoiceConfig::default(), &safety, &Default::default());
    Arc::new(pipeline.unwrap_or_else(|e| panic!("{e}")))
}

/// The safety audit log of [`TestServer::voice`]`(test, …)` in this process.
pub fn audit_log(test: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("parley-test-{test}-audit-{}.jsonl", std::process::id()))
}

/// Longest a server may take to drain after its shutdown signal.
const DRAIN_WAIT: Duration = Duration::from_secs(15);

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Starts `run_with_pipeline` on an ephemeral loopback port in the current runtime.
    pub async fn start(config: Config, pipeline: Arc<dyn Pipeline>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = oneshot::channel::<()>();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            parley_server::run_with_pipeline(listener, config, pipeline, m, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer { addr, metrics, shutdown: Some(tx), task }
    }

    /// Starts `config` with the voice pipeline (every model, from the provisioned cache); its
    /// safety audit log goes to [`audit_log`]`(test)`.
    pub async fn voice(test: &str, config: Config) -> Self {
        let test = test.to_string();
        let pipeline = tokio::task::spawn_blocking(move || voice_pipeline(&test)).await.unwrap();
        Self::start(config, pipeline).await
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/voice", self.addr)
    }

    /// Signals shutdown and waits for the sessions to drain.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        self.drained().await;
    }

    /// Signals shutdown (as SIGTERM would) without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `run` to return after a shutdown signal.
    pub async fn drained(self) {
        tokio::time::timeout(DRAIN_WAIT, self.task).await.expect("run returns after the drain").unwrap();
    }
}

/// One instance on its own runtime: `terminate` is what SIGTERM does; `kill` drops the runtime,
/// and every socket with it, at once.
pub struct Instance {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    exited: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Instance {
    pub fn start(config: Config, pipeline: Arc<dyn Pipeline>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let (done, exited) = tokio::sync::oneshot::channel::<()>();
        let m = metrics.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            parley_server::run_with_pipeline(listener, config, pipeline, m, async {
                let _ = signal.await;
            })
            .await
            .unwrap();
            let _ = done.send(());
        });
        Instance { addr, metrics, runtime: Some(runtime), shutdown: Some(shutdown), exited: Some(exited) }
    }

    pub fn sessions(&self) -> u64 {
        self.metrics.sessions_active.load(Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.metrics.sessions_total.load(Relaxed)
    }

    /// Tasks alive on the instance's runtime (its listener, connections and sessions).
    pub fn tasks(&self) -> usize {
        self.runtime.as_ref().map_or(0, |r| r.metrics().num_alive_tasks())
    }

    /// The shutdown signal, as SIGTERM gives it.
    pub fn terminate(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until `run` returned (after `terminate`).
    pub async fn exited(&mut self) {
        if let Some(rx) = self.exited.take() {
            let _ = rx.await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}
