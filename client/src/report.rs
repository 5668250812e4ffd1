//! The JSON report of a session (`parley talk --report FILE`), accounted per server turn: each
//! server turn gets its own transcript, reply and latency, measured from the reference end of the
//! utterance it answered ([`crate::anchor`]), and every utterance of the clips is accounted for
//! (answered, talked over, or left without a reply).
use crate::talk::ReceivedFrame;
use parley_protocol::ServerEvent;
use serde::Serialize;

/// An endpoint (`speech_stopped`) this long after the reference end of speech is late, ms.
pub const LATE_ENDPOINT_MS: f64 = 1000.0;

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub server: String,
    pub pipeline: String,
    pub accounting: Accounting,
    /// Every utterance of the clips streamed, in order, and what became of it.
    pub utterances: Vec<UtteranceReport>,
    /// One per server turn, in order.
    pub turns: Vec<TurnReport>,
}

/// Counts over a session (or, summed, a benchmark run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    /// Utterances in the clips streamed (the turns a listener expects).
    pub utterances: usize,
    /// Turns the server heard (`speech_started`).
    pub server_turns: usize,
    /// Utterances answered after their end: each has a voice-to-voice latency.
    pub answered: usize,
    /// Replies that began before the end of the speech they came in (the user was still talking).
    pub talk_overs: usize,
    /// Utterances with no reply after their end (talked over or not answered at all).
    pub missing_replies: usize,
    /// Server turns whose endpoint came more than [`LATE_ENDPOINT_MS`] after the speech's end.
    pub late_endpoints: usize,
    /// Replies to an utterance that another turn had answered already.
    pub extra_replies: usize,
}

impl std::ops::AddAssign for Accounting {
    fn add_assign(&mut self, o: Self) {
        self.utterances += o.utterances;
        self.server_turns += o.server_turns;
        self.answered += o.answered;
        self.talk_overs += o.talk_overs;
        self.missing_replies += o.missing_replies;
        self.late_endpoints += o.late_endpoints;
        self.extra_replies += o.extra_replies;
    }
}

/// One utterance of a clip (reference start and end, ms into the clip) and the turns about it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UtteranceReport {
    pub input: String,
    pub start_ms: f64,
    pub end_ms: f64,
    /// The server turn whose reply came first after the end.
    pub answered_by: Option<u64>,
    /// Server turns whose reply began before the end.
    pub talked_over_by: Vec<u64>,
}

/// What became of a server turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its reply began after the end of the utterance it came in: voice-to-voice is measured.
    Answered,
    /// Its reply began while the utterance still had speech ahead.
    TalkedOver,
    /// Its reply came after another turn had answered the same utterance.
    ExtraReply,
    /// No reply audio.
    #[default]
    NoReply,
}

/// One server turn and its reply.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnReport {
    /// The clip the turn's utterance is in.
    pub input: String,
    pub server_turn: u64,
    /// Index of its utterance in [`Report::utterances`].
    pub utterance: Option<usize>,
    pub outcome: Outcome,
    /// For a talk-over: how long before the utterance's end the reply began, ms.
    pub talked_over_ms: Option<f64>,
    /// `speech_stopped` received − the reference end of speech sent, ms.
    pub endpoint_after_ms: Option<f64>,
    pub transcript: String,
    pub reply_text: String,
    pub reply_audio_ms: u64,
    /// `safety.decision` events, as received.
    pub safety: Vec<serde_json::Value>,
    /// `reply.cancelled` events, as received.
    pub cancelled: Vec<serde_json::Value>,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// First reply audio frame received − send time of the frame holding the reference end of
    /// speech; only for an answered turn (never negative, never a stand-in zero).
    pub voice_to_voice: Option<f64>,
    /// The server's `turn.latency` total (speech end seen → first reply frame sent).
    pub server_total: Option<f64>,
    /// The server's stage boundaries, ms after its anchor.
    pub server_marks: Vec<(String, f64)>,
    /// Durations between consecutive server marks.
    pub server_stages: Vec<(String, f64)>,
}

/// An utterance as streamed: its clip, reference bounds, and when the frames holding them left.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub input: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub start_sent_us: u64,
    pub end_sent_us: u64,
}

/// The report of a session: `utterances` as streamed (in order), and every event and reply frame
/// received (with arrival times, µs on the session clock).
pub fn account(utterances: &[Streamed], events: &[(u64, ServerEvent)], frames: &[ReceivedFrame]) -> Report {
    let mut report = Report {
        utterances: utterances
            .iter()
            .map(|u| UtteranceReport {
                input: u.input.clone(),
                start_ms: u.start_ms,
                end_ms: u.end_ms,
                ..Default::default()
            })
            .collect(),
        ..Report::default()
    };
    let mut order: Vec<u64> = Vec::new();
    for (_, event) in events {
        if let Some(turn) = event_turn(event)
            && !order.contains(&turn)
        {
            order.push(turn);
        }
    }
    for turn in order {
        let mine: Vec<&(u64, ServerEvent)> = events.iter().filter(|(_, e)| event_turn(e) == Some(turn)).collect();
        report.turns.push(turn_report(turn, &mine, frames, utterances, &mut report.utterances));
    }
    let a = &mut report.accounting;
    a.utterances = utterances.len();
    a.server_turns = events.iter().filter(|(_, e)| matches!(e, ServerEvent::SpeechStarted { .. })).count();
    a.answered = report.utterances.iter().filter(|u| u.answered_by.is_some()).count();
    a.missing_replies = a.utterances - a.answered;
    for turn in &report.turns {
        a.talk_overs += usize::from(turn.outcome == Outcome::TalkedOver);
        a.extra_replies += usize::from(turn.outcome == Outcome::ExtraReply);
        a.late_endpoints += usize::from(turn.endpoint_after_ms.is_some_and(|ms| ms > LATE_ENDPOINT_MS));
    }
    report
}

/// The server turn an event belongs to, if it names one.
fn event_turn(event: &ServerEvent) -> Option<u64> {
    match event {
        ServerEvent::SpeechStarted { turn, .. }
        | ServerEvent::SpeechStopped { turn, .. }
        | ServerEvent::TranscriptionDelta { turn, .. }
        | ServerEvent::TranscriptionCompleted { turn, .. }
        | ServerEvent::ResponseTextDelta { turn, .. }
        | ServerEvent::ResponseTextDone { turn, .. }
        | ServerEvent::ResponseAudioStarted { turn, .. }
        | ServerEvent::ResponseAudioDone { turn, .. }
        | ServerEvent::ReplyCancelled { turn, .. }
        | ServerEvent::SafetyDecision { turn, .. }
        | ServerEvent::TurnLatency { turn, .. } => Some(*turn),
        _ => None,
    }
}

/// The last utterance that had begun by `at_us` (client clock), if any.
fn utterance_at(utterances: &[Streamed], at_us: u64) -> Option<usize> {
    utterances.iter().rposition(|u| u.start_sent_us <= at_us)
}

fn turn_report(
    turn: u64,
    events: &[&(u64, ServerEvent)],
    frames: &[ReceivedFrame],
    streamed: &[Streamed],
    utterances: &mut [UtteranceReport],
) -> TurnReport {
    let mut report = TurnReport { server_turn: turn, ..TurnReport::default() };
    let mut reply_at = None;
    let mut stopped_at = None;
    let mut started_at = None;
    let mut latency = None;
    for (at, event) in events {
        match event {
            ServerEvent::SpeechStarted { .. } => started_at = started_at.or(Some(*at)),
            ServerEvent::SpeechStopped { .. } => stopped_at = stopped_at.or(Some(*at)),
            ServerEvent::TranscriptionCompleted { transcript, .. } => report.transcript = transcript.clone(),
            ServerEvent::ResponseTextDone { text, .. } => report.reply_text = text.clone(),
            ServerEvent::ResponseAudioStarted { first_seq, .. } => {
                // The first reply frame: the first of this reply's frames to arrive after the event.
                reply_at = reply_at.or(frames.iter().find(|f| f.received_us >= *at && f.seq >= *first_seq));
            }
            ServerEvent::ResponseAudioDone { audio_ms, .. } => report.reply_audio_ms += audio_ms,
            ServerEvent::SafetyDecision { .. } => report.safety.push(serde_json::to_value(event).unwrap_or_default()),
            ServerEvent::ReplyCancelled { sent_ms, .. } => {
                report.reply_audio_ms += sent_ms;
                report.cancelled.push(serde_json::to_value(event).unwrap_or_default());
            }
            ServerEvent::TurnLatency { marks, total_ms, .. } => latency = Some((marks.clone(), *total_ms)),
            _ => {}
        }
    }
    let reply_us = reply_at.map(|f| f.received_us);
    // The utterance the turn is about: the one under way when its reply began, or else when its
    // endpoint (or its start) was heard.
    report.utterance = reply_us.or(stopped_at).or(started_at).and_then(|at| utterance_at(streamed, at));
    if let Some(u) = report.utterance {
        let end_us = streamed[u].end_sent_us;
        report.input = streamed[u].input.clone();
        report.endpoint_after_ms = stopped_at.filter(|at| *at >= end_us).map(|at| (at - end_us) as f64 / 1000.0);
        if let Some(reply_us) = reply_us {
            if reply_us < end_us {
                report.outcome = Outcome::TalkedOver;
                report.talked_over_ms = Some((end_us - reply_us) as f64 / 1000.0);
                utterances[u].talked_over_by.push(turn);
            } else if utterances[u].answered_by.is_some() {
                report.outcome = Outcome::ExtraReply;
            } else {
                report.outcome = Outcome::Answered;
                report.latency_ms.voice_to_voice = Some((reply_us - end_us) as f64 / 1000.0);
                utterances[u].answered_by = Some(turn);
            }
        }
    }
    if let Some((marks, total)) = latency {
        let out = &mut report.latency_ms;
        out.server_total = Some(total);
        let mut previous = 0.0;
        for mark in marks {
            out.server_marks.push((mark.stage.clone(), mark.at_ms));
            if mark.stage != parley_protocol::event::mark::SPEECH_END {
                out.server_stages.push((mark.stage, mark.at_ms - previous));
            }
            previous = mark.at_ms;
        }
    }
    report
}

/// Where each utterance of `clips` (reference bounds, in samples at `rate`) was streamed, from
/// the sequence number of each clip's first frame and the send time of every frame.
pub fn streamed(
    clips: &[(String, Vec<crate::anchor::Utterance>)],
    first_seq: &[Option<usize>],
    sent_us: &[u64],
    rate: u32,
) -> Vec<Streamed> {
    let frame = parley_protocol::frame_samples(rate);
    let ms = |sample: usize| sample as f64 * 1000.0 / rate as f64;
    let mut out = Vec::new();
    for ((name, utterances), first) in clips.iter().zip(first_seq) {
        let Some(first) = first else { continue };
        for u in utterances {
            let sent = |sample: usize| sent_us.get(first + sample / frame).copied();
            if let (Some(start_sent_us), Some(end_sent_us)) = (sent(u.start), sent(u.end)) {
                out.push(Streamed {
                    input: name.clone(),
                    start_ms: ms(u.start),
                    end_ms: ms(u.end),
                    start_sent_us,
                    end_sent_us,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utterance(start_ms: u64, end_ms: u64) -> Streamed {
        Streamed {
            input: "clip".into(),
            start_ms: start_ms as f64,
            end_ms: end_ms as f64,
            start_sent_us: start_ms * 1000,
            end_sent_us: end_ms * 1000,
        }
    }

    fn frame(seq: u32, ms: u64) -> ReceivedFrame {
        ReceivedFrame { seq, timestamp_us: 0, received_us: ms * 1000 }
    }

    #[test]
    fn each_server_turn_is_measured_from_its_own_utterance() {
        // Three utterances; turn 1 answers the first 300 ms after its end, turn 2 talks over the
        // second (its reply starts 200 ms before the end), turn 3 answers the second, and the
        // third utterance gets no reply. Turn 4 is heard but never answered.
        let utterances = [utterance(0, 1000), utterance(2000, 3000), utterance(5000, 6000)];
        let at = |ms: u64| ms * 1000;
        let events = vec![
            (at(100), ServerEvent::SpeechStarted { turn: 1, audio_start_ms: 0 }),
            (at(1200), ServerEvent::SpeechStopped { turn: 1, audio_end_ms: 1000 }),
            (at(1250), ServerEvent::TranscriptionCompleted { turn: 1, transcript: "one".into() }),
            (at(1290), ServerEvent::ResponseAudioStarted { turn: 1, first_seq: 0 }),
            (at(1400), ServerEvent::ResponseTextDone { turn: 1, text: "first.".into() }),
            (at(2100), ServerEvent::SpeechStarted { turn: 2, audio_start_ms: 2000 }),
            (at(2790), ServerEvent::ResponseAudioStarted { turn: 2, first_seq: 10 }),
            (at(2800), ServerEvent::ResponseTextDone { turn: 2, text: "second.".into() }),
            (at(2810), ServerEvent::SpeechStarted { turn: 3, audio_start_ms: 2800 }),
            (at(4600), ServerEvent::SpeechStopped { turn: 3, audio_end_ms: 3000 }),
            (at(4650), ServerEvent::ResponseAudioStarted { turn: 3, first_seq: 20 }),
            (at(5100), ServerEvent::SpeechStarted { turn: 4, audio_start_ms: 5000 }),
        ];
        let frames = [frame(0, 1300), frame(10, 2800), frame(20, 4700)];
        let report = account(&utterances, &events, &frames);
        let outcomes: Vec<Outcome> = report.turns.iter().map(|t| t.outcome).collect();
        assert_eq!(outcomes, [Outcome::Answered, Outcome::TalkedOver, Outcome::Answered, Outcome::NoReply]);
        assert_eq!(report.turns[0].latency_ms.voice_to_voice, Some(300.0));
        assert_eq!((report.turns[0].transcript.as_str(), report.turns[0].reply_text.as_str()), ("one", "first."));
        assert_eq!(report.turns[1].reply_text, "second.");
        assert_eq!((report.turns[1].talked_over_ms, report.turns[1].latency_ms.voice_to_voice), (Some(200.0), None));
        assert_eq!(report.turns[2].latency_ms.voice_to_voice, Some(1700.0));
        assert_eq!(report.turns[2].endpoint_after_ms, Some(1600.0));
        assert_eq!(report.turns[3].utterance, Some(2));
        assert_eq!(
            report.accounting,
            Accounting {
                utterances: 3,
                server_turns: 4,
                answered: 2,
                talk_overs: 1,
                missing_replies: 1,
                late_endpoints: 1,
                extra_replies: 0
            }
        );
        assert_eq!(report.utterances[1].talked_over_by, [2]);
        assert_eq!(report.utterances[1].answered_by, Some(3));
    }
}
