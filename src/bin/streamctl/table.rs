//! Text tables, in the two forms the project prints: plain aligned columns
//! (`streamctl`) and Markdown (the load tool, pasteable into BENCHMARKS.md).
//!
//! One file, two crates: `streamctl` has it as a module and
//! `benches/load.rs` includes this same file with `#[path]`, so it must not
//! import anything of either crate (std only).

// Each crate uses one of the two forms; the other one is dead code there.
#![allow(dead_code)]

/// A table: a header row, then rows of cells, each column as wide as its
/// widest cell (in characters).
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header and no rows yet.
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Appends a row; it may have fewer cells than the header.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether it has no rows besides the header.
    pub fn is_empty(&self) -> bool {
        self.rows.len() <= 1
    }

    /// The width of each column: its widest cell.
    fn widths(&self) -> Vec<usize> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        (0..columns)
            .map(|c| {
                let cells = self.rows.iter().filter_map(|r| r.get(c));
                cells.map(|s| s.chars().count()).max().unwrap_or(0)
            })
            .collect()
    }

    /// Plain text: columns left-aligned, two spaces apart, no trailing
    /// blanks, a newline after every row.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(&widths) {
                line.push_str(&format!("{cell:<width$}  "));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Markdown: the first column (it names the row) left-aligned, the
    /// others (figures) right-aligned, missing cells blank, a newline after
    /// every row.
    pub fn markdown(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            let cells: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| {
                    let cell = row.get(c).map_or("", String::as_str);
                    if c == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if i == 0 {
                let rule: Vec<String> = widths
                    .iter()
                    .enumerate()
                    .map(|(c, w)| {
                        let dashes = "-".repeat(w.saturating_sub(1));
                        match c {
                            0 => format!(":{dashes}"),
                            _ => format!("{dashes}:"),
                        }
                    })
                    .collect();
                out.push_str(&format!("| {} |\n", rule.join(" | ")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    fn sample() -> Table {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        t.row(vec!["b".into(), "missing".into()]);
        t
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        assert_eq!(
            sample().render(),
            "A          LONGER\nwide cell  x\nb          missing\n"
        );
    }

    #[test]
    fn markdown_names_rows_left_and_aligns_figures_right() {
        let mut t = sample();
        t.row(vec!["short".into()]);
        assert_eq!(
            t.markdown(),
            "| A         |  LONGER |\n\
             | :-------- | ------: |\n\
             | wide cell |       x |\n\
             | b         | missing |\n\
             | short     |         |\n"
        );
    }
}
