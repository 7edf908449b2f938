//! The bench's output: one row per measured figure, ours next to the
//! ratio to each peer; tables of their own for the cases that compare ours
//! with itself (7: with and without a scraper; 8: through HAProxy and
//! direct); and notes on how the figures were taken.

use crate::servers::{KINDS, Kind};

/// Which direction of a figure is good.
#[derive(Clone, Copy, Debug)]
pub enum Better {
    Higher,
    Lower,
}

/// One measured figure for every server.
pub struct Row {
    /// What was measured, e.g. `2. echoes/s, 256 conns`.
    pub case: String,
    /// Unit printed after each value.
    pub unit: &'static str,
    pub better: Better,
    /// Indexed like [`Kind::ALL`]; `None` where that server failed or
    /// was not measured.
    pub values: [Option<f64>; KINDS],
}

/// Everything the run printed at the end.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    tables: Vec<Table>,
    notes: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    /// Adds a row and echoes it to stderr as progress.
    pub fn row(&mut self, row: Row) {
        eprintln!("  {}", render_row(&row));
        self.rows.push(row);
    }

    /// Adds a table of its own, printed after the main one, and echoes it
    /// to stderr as progress.
    pub fn table(&mut self, table: Table) {
        eprint!("{}", indent(&table.render(), "  "));
        self.tables.push(table);
    }

    /// Adds a note printed under the table.
    pub fn note(&mut self, note: String) {
        eprintln!("  note: {note}");
        self.notes.push(note);
    }

    /// Records a failure; the run then exits non-zero.
    pub fn failure(&mut self, failure: String) {
        eprintln!("  FAILED: {failure}");
        self.failures.push(failure);
    }

    /// True if anything failed.
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }

    /// The whole table, notes and failures.
    pub fn render(&self) -> String {
        let header = columns(
            "case",
            "ours",
            PEERS.map(|peer| format!("vs {}", peer.name())),
            PEERS.map(|peer| peer.name().to_string()),
        );
        let rule = "-".repeat(header.chars().count());
        let mut lines = Vec::new();
        if !self.rows.is_empty() {
            lines.extend([header, rule]);
            lines.extend(self.rows.iter().map(render_row));
            lines.push(
                "ratios are ours / peer; (higher) or (lower) marks which way is better; \
                 - means not measured"
                    .into(),
            );
        }
        for table in &self.tables {
            lines.push(String::new());
            lines.extend(table.render().lines().map(str::to_string));
        }
        lines.extend(self.notes.iter().map(|note| format!("note: {note}")));
        lines.extend(self.failures.iter().map(|f| format!("FAILED: {f}")));
        lines.iter().map(|line| format!("{line}\n")).collect()
    }
}

/// A table with columns of its own: a title, a header, and rows of cells
/// already formatted; the first column is aligned left, the rest right.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (at, cell) in row.iter().enumerate().take(columns) {
                widths[at] = widths[at].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut line = String::new();
            for (at, width) in widths.iter().enumerate() {
                let cell = cells.get(at).map_or("", String::as_str);
                if at == 0 {
                    line.push_str(&format!("{cell:<width$}"));
                } else {
                    line.push_str(&format!(" | {cell:>width$}"));
                }
            }
            line.trim_end().to_string()
        };
        let header = line(&self.header);
        let rule = "-".repeat(header.chars().count());
        let mut lines = vec![self.title.clone(), header, rule];
        lines.extend(self.rows.iter().map(|row| line(row)));
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// `text` with `prefix` before each line.
fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// The servers ours is compared with, in column order.
const PEERS: [Kind; KINDS - 1] = [Kind::Tokio, Kind::Blocking, Kind::Floor, Kind::UringFloor];

/// One line of the table: the case, ours, a ratio per peer, a value per peer.
fn columns(
    case: &str,
    ours: &str,
    ratios: [String; KINDS - 1],
    peers: [String; KINDS - 1],
) -> String {
    let mut line = format!("{case:<40} | {ours:>12}");
    for ratio in ratios {
        line.push_str(&format!(" | {ratio:>11}"));
    }
    for peer in peers {
        line.push_str(&format!(" | {peer:>12}"));
    }
    line
}

fn render_row(row: &Row) -> String {
    let value = |kind: Kind| {
        let at = Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("ALL lists every kind");
        row.values[at]
    };
    let ours = value(Kind::Ours);
    let ratio = |peer: Option<f64>| match (ours, peer) {
        (Some(ours), Some(peer)) if peer > 0.0 => format!("{:.2}x", ours / peer),
        _ => "-".to_string(),
    };
    let shown = |v: Option<f64>| v.map_or("-".to_string(), |v| format_value(v, row.unit));
    let direction = match row.better {
        Better::Higher => "(higher)",
        Better::Lower => "(lower)",
    };
    columns(
        &format!("{} {direction}", row.case),
        &shown(ours),
        PEERS.map(|peer| ratio(value(peer))),
        PEERS.map(|peer| shown(value(peer))),
    )
}

/// Three significant figures or so, with k/M for large counts.
pub fn format_value(v: f64, unit: &str) -> String {
    let number = if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{number} {unit}")
}
