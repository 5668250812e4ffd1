//! The session's input ring: the network reader pushes 16 kHz samples and one [`FrameStamp`]
//! per received frame; the pipeline pops them. Two SPSC rings (ringbuf), no locks, no
//! allocation per frame; a `Notify` wakes the pipeline. Overflow policy: drop the newest
//! samples and count them (the client sent faster than real time, or the pipeline stalled).
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// Where one received frame landed in the 16 kHz stream, and when and how it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameStamp {
    /// Sequence number from the frame header.
    pub seq: u32,
    /// Client timestamp from the frame header, in µs.
    pub client_ts_us: u64,
    /// When the server received the frame.
    pub arrived: Instant,
    /// Index (in the session's 16 kHz stream) one past the frame's last sample.
    pub end_sample: u64,
}

/// Stamps kept on the consumer side for [`AudioInput::stamp_at`] lookups: 5 s of frames.
const RECENT_STAMPS: usize = 250;

/// Creates a connected producer/consumer pair holding `capacity` samples.
pub fn input_ring(capacity: usize) -> (InputFeed, AudioInput) {
    let (samples_tx, samples_rx) = HeapRb::<f32>::new(capacity).split();
    // One stamp per frame of at least 2.5 ms (the shortest Opus frame), so stamps never overflow first.
    let (stamps_tx, stamps_rx) = HeapRb::<FrameStamp>::new(capacity / 40 + 8).split();
    let wake = Arc::new(Notify::new());
    (
        InputFeed { samples: samples_tx, stamps: stamps_tx, wake: wake.clone(), pushed: 0 },
        AudioInput {
            samples: samples_rx,
            stamps: stamps_rx,
            recent: VecDeque::with_capacity(RECENT_STAMPS),
            wake,
            position: 0,
        },
    )
}

/// Producer side, owned by the session's network reader.
pub struct InputFeed {
    samples: HeapProd<f32>,
    stamps: HeapProd<FrameStamp>,
    wake: Arc<Notify>,
    pushed: u64,
}

impl InputFeed {
    /// Pushes one frame's 16 kHz samples and its stamp, wakes the pipeline, and returns how many
    /// samples did not fit (dropped).
    pub fn push(&mut self, samples: &[f32], seq: u32, client_ts_us: u64, arrived: Instant) -> usize {
        let accepted = self.samples.push_slice(samples);
        self.pushed += accepted as u64;
        if accepted > 0 {
            let _ = self.stamps.try_push(FrameStamp { seq, client_ts_us, arrived, end_sample: self.pushed });
        }
        self.wake.notify_one();
        samples.len() - accepted
    }

    /// Samples that fit now (and stamps: one per push of at least 40 samples).
    pub fn free(&self) -> usize {
        self.samples.vacant_len().min(self.stamps.vacant_len() * 40)
    }
}

/// Consumer side, owned by the pipeline: 16 kHz mono f32 audio and the frame stamps.
pub struct AudioInput {
    samples: HeapCons<f32>,
    stamps: HeapCons<FrameStamp>,
    recent: VecDeque<FrameStamp>,
    wake: Arc<Notify>,
    position: u64,
}

impl AudioInput {
    /// Waits for the next push (returns at once if one happened since the last wait). Never
    /// returns early just because fewer samples than a chunk are waiting: prefer [`wait_for`](Self::wait_for).
    pub async fn readable(&mut self) {
        self.wake.notified().await;
    }

    /// Waits until at least `min` samples are ready to pop (cancel-safe: drop it any time).
    pub async fn wait_for(&mut self, min: usize) {
        while self.samples.occupied_len() < min {
            self.wake.notified().await;
        }
    }

    /// Samples ready to pop.
    pub fn available(&self) -> usize {
        self.samples.occupied_len()
    }

    /// Pops up to `out.len()` samples; returns how many.
    pub fn pop(&mut self, out: &mut [f32]) -> usize {
        let n = self.samples.pop_slice(out);
        self.position += n as u64;
        while let Some(stamp) = self.stamps.try_pop() {
            if self.recent.len() == RECENT_STAMPS {
                self.recent.pop_front();
            }
            self.recent.push_back(stamp);
        }
        n
    }

    /// Samples popped so far: the stream position of the next sample.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The stamp of the frame holding stream sample `sample`, if it is among the recent ones.
    pub fn stamp_at(&self, sample: u64) -> Option<FrameStamp> {
        let i = self.recent.partition_point(|s| s.end_sample <= sample);
        self.recent.get(i).copied()
    }

    /// The stamp of the frame holding the last popped sample.
    pub fn last_stamp(&self) -> Option<FrameStamp> {
        self.position.checked_sub(1).and_then(|s| self.stamp_at(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_stamps_line_up_and_overflow_drops_newest() {
        let (mut feed, mut input) = input_ring(1000);
        let now = Instant::now();
        assert_eq!(feed.push(&[0.5; 320], 0, 100, now), 0);
        assert_eq!(feed.push(&[0.25; 320], 1, 120, now), 0);
        assert_eq!(feed.push(&[0.1; 320], 2, 140, now), 0);
        assert_eq!(feed.push(&[0.1; 320], 3, 160, now), 280, "only 40 samples fit");
        let mut out = [0.0; 400];
        assert_eq!(input.pop(&mut out), 400);
        assert_eq!(out[319], 0.5);
        assert_eq!(out[320], 0.25);
        assert_eq!(input.stamp_at(0).unwrap().seq, 0);
        assert_eq!(input.stamp_at(320).unwrap().seq, 1);
        assert_eq!(input.last_stamp().unwrap().client_ts_us, 120);
        assert_eq!(input.stamp_at(999).unwrap().seq, 3);
        assert_eq!(input.stamp_at(1000), None);
    }
}
