//! The policy spec: a human-readable, versioned TOML file (default: `server/policy/default.toml`,
//! compiled in; an operator may replace it with `[safety] policy = "FILE"`). It lists categories,
//! each with a definition, a response style and the words to say instead, and rules, each with
//! examples that violate it, near misses that must still be answered, and optional exact rules.
use regex::Regex;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::Path;

/// The compiled-in default spec.
pub const DEFAULT_POLICY: &str = include_str!("../../policy/default.toml");

/// How the assistant answers a request that falls under a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// Decline, briefly, with the category's `response`.
    Refuse,
    /// Answer the person, not the request: the category's supportive `response` (e.g. self-harm).
    SafeCompletion,
}

/// The whole spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: String,
    pub name: String,
    #[serde(default)]
    pub principles: Vec<String>,
    /// A violating example must beat the closest allowed example by this much (cosine).
    #[serde(default)]
    pub margin: f32,
    /// The output gate flags a reply chunk only at this score or above (and its category's
    /// threshold): the thresholds are calibrated on requests, and replies are another kind of text
    /// (an assistant introducing itself as a "voice assistant" is not asking to clone a voice).
    #[serde(default = "default_output_floor")]
    pub output_floor: f32,
    #[serde(default)]
    pub benign: Benign,
    #[serde(rename = "category")]
    pub categories: Vec<Category>,
}

/// Everyday requests: anchors for what must be answered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Benign {
    #[serde(default)]
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    pub id: String,
    pub title: String,
    pub definition: String,
    pub style: Style,
    /// What the assistant says instead, in the preset voice.
    pub response: String,
    /// Cosine similarity to a violating example at which a text is flagged (calibrated).
    pub threshold: f32,
    #[serde(rename = "rule")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub violating: Vec<String>,
    #[serde(default)]
    pub allowed: Vec<String>,
    #[serde(default)]
    pub exact: Vec<ExactSpec>,
}

/// An exact rule as written: it fires when every regex matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactSpec {
    pub all: Vec<String>,
}

/// A compiled exact rule.
#[derive(Debug, Clone)]
pub struct Exact {
    pub category: usize,
    pub rule: usize,
    pub all: Vec<Regex>,
}

impl Exact {
    pub fn matches(&self, text: &str) -> bool {
        self.all.iter().all(|r| r.is_match(text))
    }
}

fn default_output_floor() -> f32 {
    0.6
}

impl Policy {
    /// Parses and checks a spec; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, String> {
        let policy: Policy = toml::from_str(text).map_err(|e| format!("policy {origin}: {e}"))?;
        policy.validate().map_err(|e| format!("policy {origin}: {e}"))?;
        Ok(policy)
    }

    /// The spec at `path`, or the compiled-in default.
    pub fn load(path: Option<&Path>) -> Result<Policy, String> {
        match path {
            None => Policy::parse(DEFAULT_POLICY, "(built in)"),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("policy {}: {e}", path.display()))?;
                Policy::parse(&text, &path.display().to_string())
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.categories.is_empty() {
            return Err("no [[category]]".into());
        }
        if !(0.0..=1.0).contains(&self.output_floor) {
            return Err(format!("output_floor {} is not in [0, 1]", self.output_floor));
        }
        if !(0.0..1.0).contains(&self.margin) {
            return Err(format!("margin {} is not in [0, 1)", self.margin));
        }
        let mut ids = HashSet::new();
        for c in &self.categories {
            if !ids.insert(c.id.as_str()) {
                return Err(format!("category id {:?} is used twice", c.id));
            }
            if !(c.threshold > 0.0 && c.threshold <= 1.0) {
                return Err(format!("category {:?}: threshold {} is not in (0, 1]", c.id, c.threshold));
            }
            if c.response.trim().is_empty() {
                return Err(format!("category {:?}: empty response", c.id));
            }
            if c.rules.is_empty() {
                return Err(format!("category {:?} has no [[category.rule]]", c.id));
            }
            for r in &c.rules {
                if !ids.insert(r.id.as_str()) {
                    return Err(format!("rule id {:?} is used twice", r.id));
                }
                if r.violating.is_empty() && r.exact.is_empty() {
                    return Err(format!("rule {:?} has neither violating examples nor exact rules", r.id));
                }
                if r.exact.iter().any(|e| e.all.is_empty()) {
                    return Err(format!("rule {:?}: an exact rule with no regex", r.id));
                }
            }
        }
        self.exact_rules().map(|_| ())
    }

    /// The exact rules, compiled.
    pub fn exact_rules(&self) -> Result<Vec<Exact>, String> {
        let mut out = Vec::new();
        for (ci, c) in self.categories.iter().enumerate() {
            for (ri, r) in c.rules.iter().enumerate() {
                for spec in &r.exact {
                    let all = spec
                        .all
                        .iter()
                        .map(|p| Regex::new(p).map_err(|e| format!("rule {:?}: regex {p:?}: {e}", r.id)))
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push(Exact { category: ci, rule: ri, all });
                }
            }
        }
        Ok(out)
    }

    pub fn category(&self, id: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_valid_and_covers_the_required_categories() {
        let policy = Policy::load(None).unwrap();
        for id in ["violence", "illicit", "self_harm", "sexual", "hate", "harassment", "extremism", "privacy", "voice"]
        {
            let c = policy.category(id).unwrap_or_else(|| panic!("no category {id}"));
            assert!(c.rules.iter().all(|r| !r.allowed.is_empty()), "{id}: every rule needs near misses");
        }
        assert_eq!(policy.category("self_harm").unwrap().style, Style::SafeCompletion);
        let exact = policy.exact_rules().unwrap();
        let minors = exact.iter().find(|e| policy.categories[e.category].id == "sexual").expect("an exact rule");
        assert!(minors.matches("write a sexual story about a 12 year old"));
        assert!(!minors.matches("how do I talk to my kids about puberty"));
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let base = r#"
version = "1"
name = "t"
[[category]]
id = "a"
title = "A"
definition = "d"
style = "refuse"
response = "No."
threshold = 0.5
[[category.rule]]
id = "A-1"
text = "t"
violating = ["x"]
"#;
        assert!(Policy::parse(base, "t").is_ok());
        let err = Policy::parse(&base.replace("0.5", "1.5"), "t").unwrap_err();
        assert!(err.contains("threshold"), "{err}");
        let err = Policy::parse(&base.replace("\"refuse\"", "\"shrug\""), "t").unwrap_err();
        assert!(err.contains("shrug"), "{err}");
        let err = Policy::parse(&base.replace("violating = [\"x\"]", "[[category.rule.exact]]\nall = [\"(\"]"), "t")
            .unwrap_err();
        assert!(err.contains("regex"), "{err}");
        let err = Policy::parse(&base.replace("A-1", "a"), "t").unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}
