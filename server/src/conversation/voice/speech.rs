//! The speech stage of a reply: output gate → TTS → voice gate → session, chunk by chunk, with the first audio of each chunk ahead of its rest.
use crate::conversation::{ReplyOutput, SessionClosed, TurnMarks};
use crate::engine::Priority;
use crate::models::tts::{Rest, Synthesizer};
use crate::safety::voice::{MAX_CHECK_MS, MIN_CHECK_MS, check_windows};
use parley_protocol::ServerEvent;
use parley_protocol::event::{SafetyStage, mark};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::engines::{Engines, engine_error};
use super::gates::Gates;
use super::reply::ReplyRunning;
use crate::conversation::history::Spoken;
/// A reply's next chunk is made within this under load (its words generated, judged, synthesized,
/// its voice checked), so its work is due this long before the audio before it has played. Until
/// then it holds back while other replies' first audio is made ([`Engines::hold_back`]); from then
/// on its engine jobs go ahead of theirs ([`Priority::By`]).
pub(super) const NEXT_CHUNK_LEAD: Duration = Duration::from_millis(600);

/// What the reply task hands its TTS stage.
pub(super) enum Piece {
    /// The first reply token arrived at this time (a latency mark).
    FirstToken(Instant),
    /// A chunk of the model's reply: judged by the output gate before it is synthesized.
    Clause(String),
    /// The policy's own words: spoken without the output gate (the voice gate still applies).
    Say(String),
}

/// The reply model pauses between tokens while the first chunk is synthesized: on two cores its
/// next tokens (not needed until that audio has played) would take the cores the first audio
/// needs. Measured on this machine: first audio ~100 ms sooner, with the TTS on 2 threads. It does
/// not pause while other sessions' jobs wait for the model (the engine would idle in front of them).
/// Shared by the reply model and the TTS stage, it also keeps when the reply's audio so far will
/// have played, and ends the reply's count in [`Engines::first_audio_due`] with its first audio.
pub(super) struct FirstAudioWait {
    pub(super) pending: Mutex<bool>,
    pub(super) done: std::sync::Condvar,
    pub(super) running: Arc<ReplyRunning>,
    /// When the audio synthesized so far will have played, counted from when the first audio
    /// existed (`None` before): the next chunk is needed by then.
    pub(super) heard_until: Mutex<Option<Instant>>,
    /// Chunks of the reply model's text synthesized whole so far.
    pub(super) chunks_said: AtomicUsize,
}

impl FirstAudioWait {
    pub(super) fn new(running: Arc<ReplyRunning>) -> Self {
        FirstAudioWait {
            pending: Mutex::new(false),
            done: Default::default(),
            running,
            heard_until: Mutex::new(None),
            chunks_said: AtomicUsize::new(0),
        }
    }

    /// Counts `audio` more of the reply as synthesized (the first: from now).
    pub(super) fn add_audio(&self, audio: Duration) {
        let mut heard = self.heard_until.lock().unwrap_or_else(|e| e.into_inner());
        *heard = Some(heard.unwrap_or_else(Instant::now) + audio);
    }

    /// When the audio synthesized so far will have played: `None` before the first audio exists.
    pub(super) fn heard_until(&self) -> Option<Instant> {
        *self.heard_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the work on the reply's next chunk is due ([`NEXT_CHUNK_LEAD`]): `None` before its first
    /// audio exists.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.heard_until().and_then(|heard| heard.checked_sub(NEXT_CHUNK_LEAD))
    }

    pub(super) fn begin(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// The first audio exists (or never will): the model goes on.
    pub(super) fn end(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.done.notify_all();
        self.running.first_audio_made();
    }

    /// Blocks (the engine thread) while the first chunk is being synthesized, at most `limit`,
    /// and only as long as `others_waiting` says no.
    pub(super) fn wait(&self, limit: Duration, others_waiting: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while *pending && !others_waiting() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return };
            let slice = left.min(Duration::from_millis(10));
            pending = self.done.wait_timeout(pending, slice).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// A synthesized chunk waiting for the voice gate.
pub(super) struct Pending {
    pub(super) text: String,
    pub(super) audio: Vec<f32>,
    /// The rest of the chunk before it, whose first audio went ahead (see [`TtsStage::say`]).
    pub(super) continues: bool,
}

/// The second half of a reply: output gate → TTS → voice gate → session, chunk by chunk.
pub(super) struct TtsStage {
    pub(super) engines: Arc<Engines>,
    pub(super) gates: Gates,
    pub(super) output: ReplyOutput,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) halt: Arc<AtomicBool>,
    pub(super) first_audio: Arc<FirstAudioWait>,
    pub(super) ref_ts_us: u64,
    /// Spoken; off: text only (no synthesis, no voice gate).
    pub(super) audio: bool,
    pub(super) marks: TurnMarks,
    pub(super) marks_sent: bool,
    /// Chunks handed to the session, in order.
    pub(super) spoken: Vec<Spoken>,
    /// Synthesized chunks not yet checked by the voice gate (less than [`MIN_CHECK_MS`] of audio).
    pub(super) pending: Vec<Pending>,
    /// The last [`MAX_CHECK_MS`] of audio the voice gate passed.
    pub(super) passed: Vec<f32>,
    /// When the chunk being said first had audio handed to the session (not its rest's).
    pub(super) chunk_sent: Option<Instant>,
}

impl TtsStage {
    /// The stage of one reply, speaking with `gates`' engines to its output.
    pub(super) fn new(
        gates: Gates,
        cancel: Arc<AtomicBool>,
        halt: Arc<AtomicBool>,
        first_audio: Arc<FirstAudioWait>,
        ref_ts_us: u64,
        audio: bool,
        marks: TurnMarks,
    ) -> Self {
        TtsStage {
            engines: gates.engines.clone(),
            output: gates.output.clone(),
            gates,
            cancel,
            halt,
            first_audio,
            ref_ts_us,
            audio,
            marks,
            marks_sent: false,
            spoken: Vec::new(),
            pending: Vec::new(),
            passed: Vec::new(),
            chunk_sent: None,
        }
    }

    pub(super) fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed)
    }

    /// Runs until the pieces end or the reply stops; returns the chunks handed to the session.
    pub(super) async fn run(mut self, mut pieces: mpsc::Receiver<Piece>) -> Vec<Spoken> {
        let mut previous = String::new();
        while let Some(piece) = self.next_piece(&mut pieces).await {
            let (text, judge) = match piece {
                Piece::FirstToken(at) => {
                    self.marks.marks.push((mark::FIRST_TOKEN, at));
                    continue;
                }
                Piece::Clause(text) => (text, true),
                Piece::Say(text) => (text, false),
            };
            if self.stopped() {
                break;
            }
            let (received, needed) = (Instant::now(), self.first_audio.heard_until());
            let at_ms = self.spoken.iter().map(|s| s.audio_ms).sum::<f64>() + self.pending_ms();
            // A later chunk (its first audio exists) gives way to other replies' first audio.
            if let Some(until) = self.waiting_due().or(self.first_audio.next_due()) {
                self.engines.hold_back(until, || self.stopped()).await;
            }
            if !self.check_waiting_if_due().await {
                break;
            }
            let held = Instant::now();
            if judge {
                // The chunk is judged together with the one before, so content split across a
                // chunk boundary is seen whole.
                let judged = format!("{previous} {text}");
                match self.gates.content(SafetyStage::Output, judged.trim()).await {
                    Ok(Some(decision)) if !decision.stops() => previous = text.clone(),
                    Ok(Some(decision)) => {
                        // Never spoken: generation stops and the policy's words are said instead.
                        self.halt.store(true, Ordering::Relaxed);
                        let response = self.gates.response(&decision);
                        self.say(response).await;
                        break;
                    }
                    Ok(None) | Err(SessionClosed) => {
                        self.halt.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let (judged, words) = (Instant::now(), text.split_whitespace().count());
            self.chunk_sent = None;
            if !self.say(text).await {
                break;
            }
            if judge {
                self.first_audio.chunks_said.fetch_add(1, Ordering::Relaxed);
            }
            if let (Some(needed), Some(sent)) = (needed, self.chunk_sent.take()) {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                tracing::debug!(
                    words,
                    at_ms,
                    slack_ms = ms(needed.saturating_duration_since(received)),
                    hold_ms = ms(held - received),
                    gate_ms = ms(judged - held),
                    say_ms = ms(sent.saturating_duration_since(judged)),
                    late_ms = ms(sent.saturating_duration_since(needed)),
                    "later chunk spoken"
                );
            }
        }
        self.first_audio.end();
        self.check_voice().await;
        self.spoken
    }

    /// The next piece of the reply's text. Meanwhile, audio waiting for the voice gate because it
    /// is too short to check alone is checked once it is due ([`TtsStage::waiting_due`]).
    pub(super) async fn next_piece(&mut self, pieces: &mut mpsc::Receiver<Piece>) -> Option<Piece> {
        let Some(due) = self.waiting_due() else { return pieces.recv().await };
        tokio::select! {
            piece = pieces.recv() => return piece,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        if !self.check_waiting_if_due().await {
            return None;
        }
        pieces.recv().await
    }

    /// When audio waiting for the voice gate (a later chunk shorter than [`MIN_CHECK_MS`], held to
    /// be checked with the next one) must be checked without it: [`NEXT_CHUNK_LEAD`] before the
    /// audio sent so far has played, as the next chunk's synthesis may not end in time. `None`
    /// when none waits, or the reply's first audio is still to come.
    pub(super) fn waiting_due(&self) -> Option<Instant> {
        if self.pending.is_empty() || self.spoken.is_empty() {
            return None;
        }
        let waiting = Duration::from_secs_f64(self.pending_ms() / 1000.0);
        self.first_audio.heard_until()?.checked_sub(waiting + NEXT_CHUNK_LEAD)
    }

    /// Checks the waiting audio, with the end of the audio before it, if it is due. False when
    /// the reply must stop.
    pub(super) async fn check_waiting_if_due(&mut self) -> bool {
        match self.waiting_due() {
            Some(due) if due <= Instant::now() => {
                tracing::debug!(waiting_ms = self.pending_ms(), "short chunk checked without the next");
                self.check_voice().await
            }
            _ => !self.stopped(),
        }
    }

    /// When the synthesis of the reply's `first` chunk or a later one is due: the first chunk's
    /// (`None`) goes ahead of later chunks; a later one's by when it is due, since another
    /// session's next chunk may be due first.
    pub(super) fn due(&self, first: bool) -> Option<Instant> {
        self.first_audio.next_due().filter(|_| !first)
    }

    /// Synthesizes one chunk and queues it for the voice gate, which runs once at least
    /// [`MIN_CHECK_MS`] of audio waits. The first [`MIN_CHECK_MS`] of the first chunk, and of a
    /// later chunk whose work is due, is decoded, checked and sent before the rest of it is decoded
    /// (its rest is checked at once, with the end of that audio before it). False when the reply
    /// must stop.
    pub(super) async fn say(&mut self, text: String) -> bool {
        if self.marks.marks.iter().all(|(m, _)| *m != mark::FIRST_CHUNK_SAFE) {
            self.marks.marks.push((mark::FIRST_CHUNK_SAFE, Instant::now()));
        }
        if !self.audio {
            return self.write(text).await;
        }
        let first = self.spoken.is_empty() && self.pending.is_empty();
        let owned = text.clone();
        let head = Duration::from_secs_f64(MIN_CHECK_MS / 1000.0);
        let engine = self.engines.tts.clone();
        let due = self.due(first);
        let job = move |tts: &mut Synthesizer| {
            // The first MIN_CHECK_MS goes ahead of the rest of the first chunk, but not while
            // other sessions' audio waits: the rest would go ahead of their due chunks, or wait
            // behind their first words while the first part plays. And of a later chunk whose
            // work is due: the audio before it ends within NEXT_CHUNK_LEAD.
            let head_first = match due {
                None => engine.waiting() == 0,
                Some(due) => Instant::now() >= due,
            };
            if head_first { tts.synthesize_head(&owned, head) } else { Ok((tts.synthesize(&owned)?, None)) }
        };
        let spoken = self.engines.tts.try_run(due.map_or(Priority::High, Priority::By), job).await;
        let (audio, rest) = match spoken {
            Ok(spoken) => spoken,
            Err(e) => {
                self.first_audio.end();
                let _ = self.output.event(engine_error("speech synthesis failed", &e)).await;
                return false;
            }
        };
        if first {
            self.marks.marks.push((mark::FIRST_AUDIO, Instant::now()));
        }
        let queued = self.queue(Pending { text, audio, continues: false }).await;
        // The first audio is out (or checked and waiting for more): the reply model goes on.
        self.first_audio.end();
        queued && self.say_rest(rest, first).await
    }

    /// A text-only reply's chunk, which passed the output gate: out at once. False when the reply
    /// must stop.
    async fn write(&mut self, text: String) -> bool {
        self.first_audio.end();
        if !self.marks_sent {
            self.marks_sent = true;
            if self.output.marks(self.marks.clone()).await.is_err() {
                return false;
            }
        }
        let delta = if self.spoken.is_empty() { text.clone() } else { format!(" {text}") };
        self.spoken.push(Spoken { text, audio_ms: 0.0 });
        let turn = self.gates.turn;
        self.output.event(ServerEvent::ResponseTextDelta { turn, delta }).await.is_ok() && !self.stopped()
    }

    /// Synthesizes and queues the rest of a chunk (the reply's `first` or a later one) whose first
    /// audio went ahead.
    pub(super) async fn say_rest(&mut self, rest: Option<Rest>, first: bool) -> bool {
        let Some(rest) = rest else { return true };
        if self.stopped() {
            return false;
        }
        // Needed before the first part has played (0.8 s).
        let priority = self.due(first).map_or(Priority::High, Priority::By);
        match self.engines.tts.try_run(priority, move |tts| tts.synthesize_rest(rest)).await {
            Ok(audio) => self.queue(Pending { text: String::new(), audio, continues: true }).await,
            Err(e) => {
                let _ = self.output.event(engine_error("speech synthesis failed", &e)).await;
                false
            }
        }
    }

    /// Queues synthesized audio for the voice gate and checks it once there is enough (a chunk's
    /// rest at once). False when the reply must stop.
    pub(super) async fn queue(&mut self, piece: Pending) -> bool {
        self.first_audio.add_audio(Duration::from_secs_f64(piece.audio.len() as f64 / self.engines.tts_rate as f64));
        // A rest whose first audio was sent is needed before that audio has played.
        let rest_of_sent = piece.continues && self.pending.is_empty();
        self.pending.push(piece);
        if self.pending_ms() >= MIN_CHECK_MS || rest_of_sent { self.check_voice().await } else { true }
    }

    /// Synthesized audio waiting for the voice gate, ms.
    pub(super) fn pending_ms(&self) -> f64 {
        self.pending.iter().map(|p| p.audio.len()).sum::<usize>() as f64 * 1000.0 / self.engines.tts_rate as f64
    }

    /// Runs the voice gate on the waiting audio and hands what passes to the session (text
    /// delta, then audio); audio too short to check alone (a chunk's rest, a short chunk whose
    /// next would come too late, the reply's last words) is checked with the end of the audio the
    /// gate passed before it. Only a whole reply shorter than a check is judged alone. False when
    /// the reply must stop.
    pub(super) async fn check_voice(&mut self) -> bool {
        if self.pending.is_empty() || self.cancel.load(Ordering::Relaxed) {
            return !self.stopped();
        }
        let rate = self.engines.tts_rate;
        let turn = self.gates.turn;
        let pending = std::mem::take(&mut self.pending);
        // Audio shorter than a check is checked with the end of the audio the gate passed before
        // it, in one whole model segment (MAX_CHECK_MS). The preset voice's last words scored
        // under the short threshold alone in 2 of 40 replies, and in 0.8 s windows with silence
        // around them under the full one in 11 of 25; 1.0-1.6 s windows never did.
        let waiting: usize = pending.iter().map(|p| p.audio.len()).sum();
        let samples = |ms: f64| (ms * rate as f64 / 1000.0) as usize;
        let before = &self.passed;
        let lead = if waiting < samples(MIN_CHECK_MS) { samples(MAX_CHECK_MS) - waiting } else { 0 };
        let lead = lead.min(before.len());
        let mut audio = before[before.len() - lead..].to_vec();
        audio.extend(pending.iter().flat_map(|p| p.audio.iter().copied()));
        let mut bounds = Vec::with_capacity(pending.len());
        let mut at = lead;
        for p in &pending {
            bounds.push(at..at + p.audio.len());
            at += p.audio.len();
        }
        let mut announced = vec![false; pending.len()];
        // Checked window by window, so the first frame waits for one short check only.
        for window in check_windows(audio.len(), rate) {
            let checked = audio[window.clone()].to_vec();
            let lead_in = lead.saturating_sub(window.start).min(checked.len());
            let passed = matches!(self.gates.voice(checked, lead_in).await, Ok(Some(d)) if !d.stops());
            if !passed {
                // Cut: none of this audio leaves the server, and the reply stops; the client gets
                // `reply.cancelled` with reason `safety` after the gate's decision.
                self.halt.store(true, Ordering::Relaxed);
                self.cancel.store(true, Ordering::Relaxed);
                let _ = self.output.cut(turn).await;
                return false;
            }
            self.passed.extend_from_slice(&audio[window.start.max(lead)..window.end]);
            self.passed.drain(..self.passed.len().saturating_sub(samples(MAX_CHECK_MS)));
            if !self.marks_sent {
                self.marks_sent = true;
                self.marks.marks.push((mark::FIRST_AUDIO_SAFE, Instant::now()));
                if self.output.marks(self.marks.clone()).await.is_err() {
                    return false;
                }
            }
            for (i, p) in pending.iter().enumerate() {
                let part = bounds[i].start.max(window.start)..bounds[i].end.min(window.end);
                if part.is_empty() {
                    continue;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return false;
                }
                if !announced[i] {
                    announced[i] = true;
                    self.chunk_sent.get_or_insert_with(Instant::now);
                    let audio_ms = p.audio.len() as f64 * 1000.0 / rate as f64;
                    match self.spoken.last_mut() {
                        Some(last) if p.continues => last.audio_ms += audio_ms,
                        _ => {
                            let delta = if self.spoken.is_empty() { p.text.clone() } else { format!(" {}", p.text) };
                            self.spoken.push(Spoken { text: p.text.clone(), audio_ms });
                            if self.output.event(ServerEvent::ResponseTextDelta { turn, delta }).await.is_err() {
                                return false;
                            }
                        }
                    }
                }
                if self.output.audio(turn, audio[part].to_vec(), rate, self.ref_ts_us).await.is_err() {
                    return false;
                }
            }
        }
        !self.stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::voice::VoiceConfig;
    use crate::conversation::{Output, ReplyControl};
    use crate::models::Manifest;
    use crate::safety::SafetyConfig;

    /// A later chunk too short for the voice gate alone ("Yes.") goes out, checked with the end of
    /// the audio before it, before that audio has played, when no next chunk comes to be checked
    /// with it: before, it waited for the next chunk's synthesis (a 19 ms stall at 4 sessions).
    /// Real models (needs the provisioned model cache, as the `tests` crate does), no sampling
    /// noise in the voice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_later_chunk_goes_out_before_the_audio_before_it_has_played() {
        let manifest = Arc::new(Manifest::load_default().unwrap_or_else(|e| panic!("{e}")));
        let audit_log = std::env::temp_dir().join(format!("parley-unit-audit-{}.jsonl", std::process::id()));
        let safety = SafetyConfig { audit_log, ..Default::default() };
        let engines =
            Arc::new(Engines::load(&manifest, &VoiceConfig::default(), &safety, &Default::default()).unwrap());
        let quiet = |tts: &mut Synthesizer| {
            if let Synthesizer::Piper(tts) = tts {
                tts.set_noise(false);
            }
        };
        engines.tts.run(Priority::High, quiet).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let output = ReplyOutput::new(tx, Arc::new(ReplyControl::new(engines.tts_rate)));
        let turn = 1;
        let gates = Gates { engines: engines.clone(), output, session: "test".into(), key: None, turn };
        let first_audio = Arc::new(FirstAudioWait::new(ReplyRunning::new(&engines)));
        let marks = TurnMarks { turn, anchor: Instant::now(), marks: Vec::new() };
        let stage = TtsStage::new(gates, Default::default(), Default::default(), first_audio, 0, true, marks);
        let (pieces, piece_rx) = mpsc::channel(8);
        let stage = tokio::spawn(stage.run(piece_rx));
        pieces.send(Piece::Clause("Here is a short story about a cat who lived by the sea.".into())).await.unwrap();
        pieces.send(Piece::Clause("Yes.".into())).await.unwrap();
        // The pieces stay open: the reply model has not made its next chunk.
        let (mut first_sent, mut first_ms, mut short_ms, mut texts) = (None, 0.0, 0.0, Vec::new());
        while short_ms == 0.0 || !rx.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            match next.expect("the short chunk was not sent while the reply went on").expect("the reply ended") {
                Output::Event(ServerEvent::ResponseTextDelta { delta, .. }) => texts.push(delta),
                Output::Audio { pcm, sample_rate, .. } => {
                    let ms = pcm.len() as f64 * 1000.0 / sample_rate as f64;
                    let sent = *first_sent.get_or_insert_with(Instant::now);
                    if texts.len() < 2 {
                        first_ms += ms;
                    } else {
                        let played = sent + Duration::from_secs_f64(first_ms / 1000.0);
                        assert!(short_ms > 0.0 || Instant::now() < played, "sent after the audio before it had played");
                        short_ms += ms;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert_eq!(texts[1].trim(), "Yes.");
        assert!(short_ms < MIN_CHECK_MS, "the chunk was {short_ms} ms of audio: not short");
        drop(pieces);
        let spoken = stage.await.unwrap();
        assert_eq!(spoken.len(), 2);
    }
}
