//! Figures, targets and the two report files (`report.md`, `report.json`).
//!
//! Every figure is a set of samples (one per run) summarised as median, min and max. A row puts
//! Tideline's figure next to the peer measured in the same run; the ratio is of medians, and a
//! target is judged on the median.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

/// Median, min and max of a figure's samples.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }

    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "runs": self.n})
    }
}

/// A goal for a row, judged on medians.
#[derive(Debug, Clone)]
pub enum Goal {
    /// Tideline / peer >= x.
    RatioAtLeast(f64),
    /// Tideline / peer <= x.
    RatioAtMost(f64),
    /// Tideline >= x (in the row's unit).
    AtLeast(f64),
    /// Tideline <= x (in the row's unit).
    AtMost(f64),
}

impl Goal {
    fn text(&self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(x) => format!("≥ {x}× peer"),
            Goal::RatioAtMost(x) => format!("≤ {x}× peer"),
            Goal::AtLeast(x) => format!("≥ {} {unit}", fmt_num(*x)),
            Goal::AtMost(x) => format!("≤ {} {unit}", fmt_num(*x)),
        }
    }

    fn met(&self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::RatioAtLeast(x) => ratio.map(|r| r >= *x),
            Goal::RatioAtMost(x) => ratio.map(|r| r <= *x),
            Goal::AtLeast(x) => Some(value >= *x),
            Goal::AtMost(x) => Some(value <= *x),
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: String,
    pub name: String,
    pub unit: String,
    pub tideline: Option<Stat>,
    pub peer: Option<(String, Option<Stat>)>,
    pub goals: Vec<Goal>,
    pub note: String,
}

impl Row {
    pub fn new(section: &str, name: &str, unit: &str, samples: &[f64]) -> Row {
        Row {
            section: section.to_owned(),
            name: name.to_owned(),
            unit: unit.to_owned(),
            tideline: Stat::of(samples),
            peer: None,
            goals: Vec::new(),
            note: String::new(),
        }
    }

    pub fn peer(mut self, name: &str, samples: &[f64]) -> Row {
        self.peer = Some((name.to_owned(), Stat::of(samples)));
        self
    }

    pub fn goal(mut self, goal: Goal) -> Row {
        self.goals.push(goal);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        let ours = self.tideline?.median;
        let theirs = self.peer.as_ref()?.1?.median;
        (theirs != 0.0).then(|| ours / theirs)
    }

    /// None when there is no goal or it cannot be judged (a figure is missing).
    pub fn met(&self) -> Option<bool> {
        if self.goals.is_empty() {
            return None;
        }
        let value = self.tideline?.median;
        let ratio = self.ratio();
        self.goals
            .iter()
            .map(|g| g.met(value, ratio))
            .try_fold(true, |all, m| m.map(|m| all && m))
    }

    fn verdict(&self) -> &'static str {
        match (self.goals.is_empty(), self.met()) {
            (true, _) => "",
            (false, Some(true)) => "pass",
            (false, Some(false)) => "**miss**",
            (false, None) => "n/a",
        }
    }

    fn json(&self) -> Value {
        json!({
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "tideline": self.tideline.map(|s| s.json()),
            "peer": self.peer.as_ref().map(|(name, s)| json!({"name": name, "figure": s.map(|s| s.json())})),
            "ratio": self.ratio(),
            "target": self.goals.iter().map(|g| g.text(&self.unit)).collect::<Vec<_>>().join(" and "),
            "met": self.met(),
            "note": self.note,
        })
    }
}

/// Formats a number with a precision that suits its size.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 => format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        Some(s) => fmt_num(s.median),
        None => "–".into(),
    }
}

/// The whole report.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Scenarios that failed, with their error.
    pub failures: Vec<(String, String)>,
    pub environment: Vec<(String, String)>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::from("# Tideline benchmark report\n\n");
        for (k, v) in &self.environment {
            let _ = writeln!(md, "- {k}: {v}");
        }
        md.push_str(
            "\nEvery figure: median (min–max) over the runs; ratio = Tideline median / peer median.\n\n",
        );
        md.push_str("| section | measurement | unit | Tideline | peer | peer figure | ratio | target | result |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let (peer, peer_stat) = match &row.peer {
                Some((name, stat)) => (name.clone(), fmt_stat(stat)),
                None => ("".into(), "".into()),
            };
            let target = row
                .goals
                .iter()
                .map(|g| g.text(&row.unit))
                .collect::<Vec<_>>()
                .join(" and ");
            let _ = writeln!(
                md,
                "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} |",
                row.section,
                row.name,
                if row.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", row.note)
                },
                row.unit,
                fmt_stat(&row.tideline),
                peer,
                peer_stat,
                row.ratio().map(|r| format!("{r:.2}×")).unwrap_or_default(),
                target,
                row.verdict()
            );
        }
        if !self.failures.is_empty() {
            md.push_str("\n## Scenarios that failed\n\n");
            for (scenario, error) in &self.failures {
                let _ = writeln!(md, "- **{scenario}**: `{}`", error.replace('\n', " "));
            }
        }
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }

    pub fn json(&self) -> Value {
        json!({
            "environment": self.environment.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "failures": self.failures.iter().map(|(s, e)| json!({"scenario": s, "error": e})).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&self.json())?,
        )?;
        Ok(())
    }
}
