//! Engine threads: each model is owned by one OS thread (ort's `Session::run` takes `&mut self`,
//! and inference must never run on the network runtime). Sessions submit jobs through a bounded
//! two-level queue and await the result; latency-critical jobs go ahead of background ones.
//!
//! Overflow policy: a job submitted to a full queue is refused at once with [`EngineError::Busy`]
//! (the caller reports it to its client) and counted in [`Engine::refused`]; nothing queues unboundedly.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

use crate::models::ModelError;

/// How urgent a job is. `High` jobs (final ASR, first TTS chunk) run before any other, except a
/// `By` job whose time has come; the rest run earliest deadline first, a `Low` job's deadline
/// being when it was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    High,
    Low,
    /// Must start by then (a later reply chunk: its listener runs out of audio soon after). Once
    /// that time has come it goes ahead of `High` jobs: a stall in a reply being heard costs more
    /// than the same wait before another's first words.
    By(Instant),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the {0} engine is busy (queue full); try again")]
    Busy(&'static str),
    #[error("the {0} engine has stopped")]
    Stopped(&'static str),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The reply came from an external endpoint, which failed.
    #[error(transparent)]
    Api(#[from] crate::models::chat_api::ApiError),
}

type Job<M> = Box<dyn FnOnce(&mut M) + Send>;

struct Queue<M> {
    high: VecDeque<Job<M>>,
    /// By deadline; equal deadlines in the order submitted. The flag: a `By` deadline, which
    /// overtakes `High` jobs once it has come.
    low: VecDeque<(Instant, bool, Job<M>)>,
    /// A job is running on the thread.
    running: bool,
    closed: bool,
}

struct Shared<M> {
    queue: Mutex<Queue<M>>,
    ready: Condvar,
    capacity: usize,
    refused: AtomicU64,
}

/// A model owned by its own thread. Cloning shares the same thread and queue.
pub struct Engine<M> {
    name: &'static str,
    shared: Arc<Shared<M>>,
}

impl<M> Clone for Engine<M> {
    fn clone(&self) -> Self {
        Engine { name: self.name, shared: self.shared.clone() }
    }
}

impl<M: 'static> Engine<M> {
    /// Starts the thread, builds the model on it with `load`, and returns once the model is
    /// loaded (or with the load error). `capacity` bounds the jobs waiting at each priority.
    pub fn spawn(
        name: &'static str,
        capacity: usize,
        load: impl FnOnce() -> Result<M, ModelError> + Send + 'static,
    ) -> Result<Engine<M>, ModelError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { high: VecDeque::new(), low: VecDeque::new(), running: false, closed: false }),
            ready: Condvar::new(),
            capacity,
            refused: AtomicU64::new(0),
        });
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
        let worker = shared.clone();
        thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let mut model = match load() {
                    Ok(model) => {
                        let _ = loaded_tx.send(Ok(()));
                        model
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(job) = worker.next_job() {
                    job(&mut model);
                }
            })
            .map_err(|e| ModelError::Invalid(format!("cannot start the {name} engine thread: {e}")))?;
        loaded_rx.recv().map_err(|_| ModelError::Invalid(format!("the {name} engine thread died while loading")))??;
        Ok(Engine { name, shared })
    }

    /// Runs `f` on the engine thread and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce(&mut M) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            priority,
            Box::new(move |model| {
                let _ = tx.send(f(model));
            }),
        )?;
        rx.await.map_err(|_| EngineError::Stopped(self.name))
    }

    /// [`Engine::run`] for a job that can fail: its model error and the engine's come back as one.
    pub async fn try_run<T: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce(&mut M) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, EngineError> {
        Ok(self.run(priority, f).await??)
    }

    /// Runs `f` on the engine thread, blocking the calling (non-async) thread until it is done.
    pub fn run_blocking<R: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce(&mut M) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            priority,
            Box::new(move |model| {
                let _ = tx.send(f(model));
            }),
        )?;
        rx.recv().map_err(|_| EngineError::Stopped(self.name))
    }

    fn submit(&self, priority: Priority, job: Job<M>) -> Result<(), EngineError> {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.closed {
            return Err(EngineError::Stopped(self.name));
        }
        let deadline = match priority {
            Priority::High => None,
            Priority::Low => Some((Instant::now(), false)),
            Priority::By(deadline) => Some((deadline, true)),
        };
        let waiting = if deadline.is_some() { queue.low.len() } else { queue.high.len() };
        if waiting >= self.shared.capacity {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::Busy(self.name));
        }
        match deadline {
            None => queue.high.push_back(job),
            Some((deadline, hard)) => {
                let at = queue.low.partition_point(|(due, _, _)| *due <= deadline);
                queue.low.insert(at, (deadline, hard, job));
            }
        }
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting to run (not counting the one running).
    pub fn waiting(&self) -> usize {
        let queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.high.len() + queue.low.len()
    }

    /// Whether a job is waiting that goes ahead of `Low` ones and of `By` ones not yet due: a `High`
    /// job, or a `By` job whose time has come.
    pub fn urgent_waiting(&self) -> bool {
        let queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        !queue.high.is_empty() || queue.overdue(Instant::now()).is_some()
    }

    /// Whether no job is running or waiting.
    pub fn idle(&self) -> bool {
        let queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        !queue.running && queue.high.is_empty() && queue.low.is_empty()
    }

    /// Jobs refused because the queue was full, since start.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Stops the thread after the jobs already queued.
    pub fn close(&self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.shared.ready.notify_all();
    }
}

impl<M> Queue<M> {
    /// Where the first `By` job whose time has come is in `low`.
    fn overdue(&self, now: Instant) -> Option<usize> {
        self.low.iter().take_while(|(due, _, _)| *due <= now).position(|(_, hard, _)| *hard)
    }
}

impl<M> Shared<M> {
    fn next_job(&self) -> Option<Job<M>> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.running = false;
        loop {
            let job = match queue.overdue(Instant::now()) {
                Some(at) => queue.low.remove(at).map(|(_, _, job)| job),
                None => queue.high.pop_front().or_else(|| queue.low.pop_front().map(|(_, _, job)| job)),
            };
            if let Some(job) = job {
                queue.running = true;
                return Some(job);
            }
            if queue.closed {
                return None;
            }
            queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a job that keeps `engine` busy, so the next jobs queue up behind it, until the returned
    /// function is called.
    fn hold_busy(engine: &Engine<Vec<&'static str>>) -> impl FnOnce() {
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let gate = engine.clone();
        let blocker = thread::spawn(move || {
            gate.run_blocking(Priority::High, move |_| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap()
            })
        });
        started_rx.recv().unwrap();
        move || {
            release_tx.send(()).unwrap();
            blocker.join().unwrap().unwrap();
        }
    }

    #[test]
    fn high_priority_jobs_run_first_then_by_deadline_and_full_queues_refuse() {
        let engine = Engine::spawn("test", 2, || Ok(Vec::<&'static str>::new())).unwrap();
        assert!(engine.idle());
        let release = hold_busy(&engine);
        assert!(!engine.idle(), "a job is running");
        let later = Priority::By(Instant::now() + std::time::Duration::from_secs(1));
        engine.submit(later, Box::new(|log| log.push("later"))).unwrap();
        engine.submit(Priority::Low, Box::new(|log| log.push("low"))).unwrap();
        engine.submit(Priority::High, Box::new(|log| log.push("high"))).unwrap();
        assert!(matches!(engine.submit(Priority::Low, Box::new(|_| {})), Err(EngineError::Busy("test"))));
        assert_eq!(engine.refused(), 1);
        release();
        // The queued jobs may still be waiting (the lane is full until they run): retry.
        let order = loop {
            let last = Priority::By(Instant::now() + std::time::Duration::from_secs(2));
            match engine.run_blocking(last, |log| log.clone()) {
                Err(EngineError::Busy(_)) => thread::yield_now(),
                other => break other.unwrap(),
            }
        };
        assert_eq!(order, ["high", "low", "later"]);
        // The last job may still be finishing on the thread.
        while !engine.idle() {
            thread::yield_now();
        }
        assert_eq!(engine.waiting(), 0);
    }

    #[test]
    fn a_job_whose_time_has_come_goes_ahead_of_high_ones() {
        let engine = Engine::spawn("test", 4, || Ok(Vec::<&'static str>::new())).unwrap();
        let release = hold_busy(&engine);
        engine.submit(Priority::Low, Box::new(|log| log.push("low"))).unwrap();
        engine.submit(Priority::High, Box::new(|log| log.push("high"))).unwrap();
        thread::sleep(std::time::Duration::from_millis(1));
        assert!(engine.urgent_waiting(), "a High job waits");
        engine.submit(Priority::By(Instant::now()), Box::new(|log| log.push("due"))).unwrap();
        release();
        let order = engine.run_blocking(Priority::Low, |log| log.clone()).unwrap();
        // The `Low` job is before the due one by deadline, but is never promoted.
        assert_eq!(order, ["due", "high", "low"]);
        let release = hold_busy(&engine);
        // Far enough ahead that a descheduled test thread (CI on two loaded cores) does not pass it.
        let later = Instant::now() + std::time::Duration::from_millis(300);
        engine.submit(Priority::Low, Box::new(|_| {})).unwrap();
        engine.submit(Priority::By(later), Box::new(|_| {})).unwrap();
        assert!(!engine.urgent_waiting(), "neither a Low job nor one not yet due is urgent");
        thread::sleep(later.saturating_duration_since(Instant::now()));
        assert!(engine.urgent_waiting(), "a job whose time has come is");
        release();
    }

    #[test]
    fn load_errors_are_returned() {
        let err = Engine::<()>::spawn("broken", 1, || Err(ModelError::Invalid("no".into()))).err().unwrap();
        assert_eq!(err.to_string(), "no");
    }
}
