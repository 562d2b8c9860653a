//! Plain-text tables for humans: left-aligned columns, a header row, cells that may span
//! several lines (a frontend's backends), no colours and no trailing spaces.

/// A table under construction.
#[derive(Clone, Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; a cell may hold several lines (`\n`). Missing cells are empty.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders the table; columns are separated by two spaces.
    pub fn render(&self) -> String {
        let ncols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(ncols) {
                for line in cell.lines() {
                    widths[i] = widths[i].max(line.chars().count());
                }
            }
        }
        let mut out = String::new();
        let mut emit = |cells: &[&str]| {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < cells.len() {
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        };
        let header: Vec<&str> = self.header.iter().map(String::as_str).collect();
        emit(&header);
        for row in &self.rows {
            let lines: Vec<Vec<&str>> = (0..ncols)
                .map(|i| row.get(i).map(|c| c.lines().collect()).unwrap_or_default())
                .collect();
            let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
            for l in 0..height {
                let cells: Vec<&str> = lines
                    .iter()
                    .map(|c| c.get(l).copied().unwrap_or(""))
                    .collect();
                emit(&cells);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_spans_lines() {
        let mut t = Table::new(&["FRONTEND", "TYPE", "BACKENDS"]);
        t.row(vec![
            "10.96.100.208:8080/TCP".into(),
            "ClusterIP".into(),
            "1 => 10.244.1.10:80\n2 => 10.244.1.11:80".into(),
        ]);
        t.row(vec![
            "0.0.0.0:30001/TCP (nodePort)".into(),
            "NodePort".into(),
        ]);
        let want = "\
FRONTEND                      TYPE       BACKENDS
10.96.100.208:8080/TCP        ClusterIP  1 => 10.244.1.10:80
                                         2 => 10.244.1.11:80
0.0.0.0:30001/TCP (nodePort)  NodePort
";
        assert_eq!(t.render(), want);
    }

    #[test]
    fn empty_table_is_just_the_header() {
        let t = Table::new(&["ID", "ADDRESS"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "ID  ADDRESS\n");
    }
}
