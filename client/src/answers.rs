//! `parley eval answers`: are the replies right? Runs a JSONL set of short conversations against a
//! server, each in a fresh session, typed and spoken (espeak-ng voices); the last reply is judged
//! by the words it must contain. Reports accuracy per mode and category, reply length, and replies
//! that loop (a repeated run of 4 words).
use crate::eval::{EvalOptions, Mode, synthesize, text_conversation};
use crate::talk::{Clip, TalkOptions};
use anyhow::Context;
use futures_util::StreamExt;
use parley_protocol::ServerEvent;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Words in a run that, repeated, make a reply a loop.
pub const LOOP_NGRAM: usize = 4;

/// One line of a set: the turns said in one session, and what the last reply must contain (any
/// one of `expect_any`, as whole words, case-insensitive). Extra fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AnswerLine {
    pub id: String,
    pub category: String,
    pub turns: Vec<String>,
    pub expect_any: Vec<String>,
    /// The last reply must also be at most this many words ("answer in one word").
    #[serde(default)]
    pub max_words: Option<usize>,
}

/// Parses a JSONL set; blank lines are skipped. Errors name the (1-based) line number.
pub fn parse_answers(text: &str) -> anyhow::Result<Vec<AnswerLine>> {
    let mut lines: Vec<AnswerLine> = Vec::new();
    for (n, raw) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if raw.is_empty() {
            continue;
        }
        let line: AnswerLine = serde_json::from_str(raw).map_err(|e| {
            anyhow::anyhow!(
                "line {n}: {e} (expected {{\"id\", \"category\", \"turns\": [..], \"expect_any\": [..], \"max_words\"?}})"
            )
        })?;
        anyhow::ensure!(
            !line.turns.is_empty() && line.turns.iter().all(|t| !t.trim().is_empty()),
            "line {n}: every turn must have text, and there must be one"
        );
        anyhow::ensure!(line.expect_any.iter().any(|w| !w.trim().is_empty()), "line {n}: empty expect_any");
        anyhow::ensure!(!lines.iter().any(|l| l.id == line.id), "line {n}: duplicate id {:?}", line.id);
        lines.push(line);
    }
    Ok(lines)
}

/// Reads and parses a JSONL set file.
pub fn read_answers(path: &Path) -> anyhow::Result<Vec<AnswerLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_answers(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// Lower-case words (letters, digits, and the apostrophes and hyphens inside them).
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '-'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether `phrase` occurs in `reply` as whole words, case-insensitive ("paris" in "Paris.",
/// not in "Parisian"; "fifty-six" in "It is fifty-six").
pub fn contains_phrase(reply: &str, phrase: &str) -> bool {
    let (reply, phrase) = (words(reply), words(phrase));
    !phrase.is_empty() && reply.windows(phrase.len()).any(|w| w == phrase.as_slice())
}

/// Whether a run of [`LOOP_NGRAM`] words comes twice in `reply`.
pub fn has_loop(reply: &str) -> bool {
    let words = words(reply);
    let grams: Vec<&[String]> = words.windows(LOOP_NGRAM).collect();
    grams.iter().enumerate().any(|(i, g)| grams[i + 1..].contains(g))
}

/// One line run in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerRun {
    pub id: String,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    pub category: String,
    /// What the server heard, turn by turn (audio mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transcripts: Vec<String>,
    /// The last reply, as sent (only what passed the safety gates).
    pub reply_text: String,
    pub reply_words: usize,
    /// It contains an expected phrase (and keeps to `max_words`).
    pub correct: bool,
    pub looped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AnswerRun {
    fn new(line: &AnswerLine, mode: Mode, voice: Option<String>, reply: String, error: Option<String>) -> Self {
        let reply_words = words(&reply).len();
        let found = line.expect_any.iter().any(|p| contains_phrase(&reply, p));
        Self {
            id: line.id.clone(),
            mode,
            voice,
            category: line.category.clone(),
            transcripts: Vec::new(),
            correct: found && line.max_words.is_none_or(|max| reply_words <= max),
            looped: has_loop(&reply),
            reply_text: reply,
            reply_words,
            error,
        }
    }
}

/// Scores over a group of runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Score {
    pub n: usize,
    pub correct: usize,
    /// `correct / n` (null without runs).
    pub accuracy: Option<f64>,
    /// Runs with no reply text.
    pub no_reply: usize,
    pub looped: usize,
    /// Mean words of the last reply, over runs with a reply.
    pub mean_reply_words: Option<f64>,
}

pub fn score<'a>(runs: impl IntoIterator<Item = &'a AnswerRun>) -> Score {
    let mut s = Score::default();
    let mut words = Vec::new();
    for run in runs {
        s.n += 1;
        s.correct += usize::from(run.correct);
        s.looped += usize::from(run.looped);
        if run.reply_words == 0 {
            s.no_reply += 1;
        } else {
            words.push(run.reply_words as f64);
        }
    }
    s.accuracy = (s.n > 0).then(|| s.correct as f64 / s.n as f64);
    s.mean_reply_words = (!words.is_empty()).then(|| words.iter().sum::<f64>() / words.len() as f64);
    s
}

/// One mode's scores: all lines, and per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeScores {
    pub overall: Score,
    pub per_category: BTreeMap<String, Score>,
}

/// The report written by `parley eval answers --report`.
#[derive(Debug, Clone, Serialize)]
pub struct AnswersReport {
    pub server: String,
    pub set: String,
    pub modes: Vec<Mode>,
    pub summary: BTreeMap<&'static str, ModeScores>,
    /// Sorted by id, then mode.
    pub runs: Vec<AnswerRun>,
}

impl AnswersReport {
    pub fn new(server: &str, set: &str, modes: &[Mode], mut runs: Vec<AnswerRun>) -> Self {
        runs.sort_by(|a, b| (&a.id, a.mode).cmp(&(&b.id, b.mode)));
        let summary = modes
            .iter()
            .map(|&mode| {
                let mine: Vec<&AnswerRun> = runs.iter().filter(|r| r.mode == mode).collect();
                let mut per_category = BTreeMap::new();
                for run in &mine {
                    per_category.entry(run.category.clone()).or_insert_with(Vec::new).push(*run);
                }
                let per_category = per_category.into_iter().map(|(c, r)| (c, score(r))).collect();
                (mode.as_str(), ModeScores { overall: score(mine), per_category })
            })
            .collect();
        Self { server: server.to_string(), set: set.to_string(), modes: modes.to_vec(), summary, runs }
    }

    /// The accuracy table (mode × category) and the wrong answers, for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<6} {:<14} {:>4} {:>16} {:>8} {:>6} {:>10}\n",
            "mode", "category", "n", "accuracy", "no_reply", "loops", "words avg"
        );
        for mode in &self.modes {
            let Some(scores) = self.summary.get(mode.as_str()) else { continue };
            let rows = scores.per_category.iter().map(|(c, s)| (c.as_str(), s));
            for (category, s) in std::iter::once(("(all)", &scores.overall)).chain(rows) {
                let accuracy = s.accuracy.map_or("-".into(), |a| format!("{:.1}% ({}/{})", 100.0 * a, s.correct, s.n));
                let words = s.mean_reply_words.map_or("-".into(), |w| format!("{w:.1}"));
                out += &format!(
                    "{:<6} {category:<14} {:>4} {accuracy:>16} {:>8} {:>6} {words:>10}\n",
                    mode.as_str(),
                    s.n,
                    s.no_reply,
                    s.looped
                );
            }
        }
        let wrong: Vec<&AnswerRun> = self.runs.iter().filter(|r| !r.correct).collect();
        out += &format!("\nwrong: {}\n", wrong.len());
        for run in wrong {
            let heard = run.transcripts.last().map(|t| format!("  heard: {t:?}")).unwrap_or_default();
            out += &format!("  {:<6} {:<12} {:?}{heard}\n", run.mode.as_str(), run.id, run.reply_text);
        }
        out
    }
}

/// Runs every line in every mode, each in a fresh session, `concurrency` sessions at once, and
/// prints progress to stderr. `set` names the set in the report.
pub async fn run_answers(options: &EvalOptions, set: &str, lines: &[AnswerLine]) -> anyhow::Result<AnswersReport> {
    crate::eval::preflight(options).await?;
    let jobs = crate::eval::jobs(lines, options);
    let total = jobs.len();
    let done = AtomicUsize::new(0);
    let runs: Vec<AnswerRun> = futures_util::stream::iter(jobs)
        .map(|(line, mode, voice)| {
            let done = &done;
            async move {
                let run = match mode {
                    Mode::Text => run_text(options, line).await,
                    Mode::Audio => run_audio(options, line, voice.unwrap_or_default()).await,
                };
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                let verdict = if run.correct { "right" } else { "wrong" };
                eprintln!("[{n}/{total}] {} {} -> {verdict}: {:?}", run.id, run.mode.as_str(), run.reply_text);
                run
            }
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    Ok(AnswersReport::new(&options.server, set, &options.modes, runs))
}

/// The reply text of a turn's events: `response.text.done`, or what was streamed of a reply cut
/// before its end.
fn reply_of(events: &[ServerEvent]) -> String {
    let done = events.iter().rev().find_map(|e| match e {
        ServerEvent::ResponseTextDone { text, .. } => Some(text.clone()),
        _ => None,
    });
    done.unwrap_or_else(|| {
        let deltas = events.iter().filter_map(|e| match e {
            ServerEvent::ResponseTextDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        });
        deltas.collect()
    })
}

async fn run_text(options: &EvalOptions, line: &AnswerLine) -> AnswerRun {
    let mut events = vec![Vec::new(); line.turns.len()];
    let mut audio = false;
    let result = text_conversation(options, &line.turns, &mut events, &mut audio).await;
    let reply = events.last().map(|e| reply_of(e)).unwrap_or_default();
    AnswerRun::new(line, Mode::Text, None, reply, result.err().map(|e| format!("{e:#}")))
}

/// Every turn said by `voice` and streamed in one session through [`crate::talk`]; the reply
/// judged is the last one to the last clip's speech.
async fn run_audio(options: &EvalOptions, line: &AnswerLine, voice: String) -> AnswerRun {
    let (turns, rate, who) = (line.turns.clone(), options.sample_rate, voice.clone());
    let clips = tokio::task::spawn_blocking(move || {
        let clip = |(i, text): (usize, &String)| {
            synthesize(&who, text, rate).map(|s| Clip { name: i.to_string(), samples: s })
        };
        turns.iter().enumerate().map(clip).collect::<anyhow::Result<Vec<Clip>>>()
    });
    let clips = match clips.await {
        Ok(Ok(clips)) => clips,
        Ok(Err(e)) => return AnswerRun::new(line, Mode::Audio, Some(voice), String::new(), Some(format!("{e:#}"))),
        Err(e) => return AnswerRun::new(line, Mode::Audio, Some(voice), String::new(), Some(e.to_string())),
    };
    let talk = TalkOptions {
        server: options.server.clone(),
        sample_rate: options.sample_rate,
        pause_ms: 300,
        wait_for_reply: true,
        reply_timeout_ms: options.reply_timeout_ms,
        ..TalkOptions::default()
    };
    match crate::talk(&talk, &clips).await {
        Ok(result) => {
            let last = (line.turns.len() - 1).to_string();
            let reply = result.report.turns.iter().rev().find(|t| t.input == last && !t.reply_text.is_empty());
            let reply = reply.map(|t| t.reply_text.clone()).unwrap_or_default();
            let mut run = AnswerRun::new(line, Mode::Audio, Some(voice), reply, None);
            run.transcripts = result.report.turns.iter().map(|t| t.transcript.clone()).collect();
            run
        }
        Err(e) => AnswerRun::new(line, Mode::Audio, Some(voice), String::new(), Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_match_whole_words_case_insensitively() {
        assert!(contains_phrase("The capital of France is Paris.", "paris"));
        assert!(!contains_phrase("A Parisian café.", "paris"));
        assert!(contains_phrase("It is fifty-six.", "fifty-six"));
        assert!(!contains_phrase("It is fifty.", "fifty-six"));
        assert!(contains_phrase("Carbon dioxide, or CO2.", "carbon dioxide"));
        assert!(contains_phrase("That's 100 degrees", "100"));
        assert!(!contains_phrase("That's 1000 degrees", "100"));
        assert!(!contains_phrase("anything", ""));
    }

    #[test]
    fn a_repeated_run_of_four_words_is_a_loop() {
        assert!(has_loop("No, no, no, you can't. No, no, no, you can't."));
        assert!(!has_loop("The capital of France is Paris. Paris is lovely."));
        assert!(!has_loop("one two three"));
    }

    #[test]
    fn lines_parse_and_are_scored() {
        let set = "{\"id\": \"a\", \"category\": \"facts\", \"turns\": [\"Capital of France?\"], \"expect_any\": [\"paris\"]}\n\n\
                   {\"id\": \"b\", \"category\": \"instructions\", \"turns\": [\"One word: sky?\"], \"expect_any\": [\"blue\"], \"max_words\": 3}\n";
        let lines = parse_answers(set).unwrap();
        assert_eq!((lines.len(), lines[1].max_words), (2, Some(3)));
        assert!(parse_answers("{\"id\": \"a\", \"category\": \"x\", \"turns\": [], \"expect_any\": [\"y\"]}").is_err());
        let err =
            parse_answers(&format!("{}\n{}", set.lines().next().unwrap(), set.lines().next().unwrap())).unwrap_err();
        assert!(err.to_string().contains("line 2: duplicate id"), "{err}");

        let runs = [
            AnswerRun::new(&lines[0], Mode::Text, None, "It is Paris.".into(), None),
            AnswerRun::new(&lines[1], Mode::Text, None, "The sky is blue on a clear day.".into(), None),
            AnswerRun::new(&lines[1], Mode::Audio, Some("en-us".into()), String::new(), None),
        ];
        assert_eq!(runs.iter().map(|r| r.correct).collect::<Vec<_>>(), [true, false, false]);
        let report = AnswersReport::new("ws://x", "set", &[Mode::Text, Mode::Audio], runs.to_vec());
        let text = &report.summary["text"];
        assert_eq!((text.overall.n, text.overall.correct, text.overall.accuracy), (2, 1, Some(0.5)));
        assert_eq!(text.overall.mean_reply_words, Some(5.5));
        assert_eq!(report.summary["audio"].overall.no_reply, 1);
        assert_eq!(text.per_category["instructions"].correct, 0);
        let table = report.table();
        assert!(table.contains("50.0% (1/2)") && table.contains("wrong: 2"), "{table}");
    }
}
