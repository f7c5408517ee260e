//! Human-readable output of `mailroom admin`: a JSON array of objects as an aligned table (chosen columns,
//! dotted paths into nested objects), an object as `key: value` lines.

use serde_json::Value;

/// Longest cell shown; longer values are cut with `…` (`--json` shows them whole).
const MAX_CELL: usize = 60;

/// Renders `value`: arrays of objects as a table of `columns` (or, if empty, the first object's scalar
/// fields), objects as `key: value` lines, anything else as JSON.
pub fn render(value: &Value, columns: &[&str]) -> String {
    match value {
        Value::Array(rows) if rows.is_empty() => "(none)\n".to_owned(),
        Value::Array(rows) if rows.iter().all(Value::is_object) => {
            let columns: Vec<String> = if columns.is_empty() {
                scalar_keys(&rows[0])
            } else {
                columns.iter().map(|c| (*c).to_owned()).collect()
            };
            table(rows, &columns)
        }
        Value::Object(map) => {
            let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
            map.iter().map(|(k, v)| format!("{k:width$}  {}\n", cell(v))).collect()
        }
        other => format!("{}\n", serde_json::to_string_pretty(other).unwrap_or_default()),
    }
}

/// The keys of `row` whose values are not objects or arrays, in order.
fn scalar_keys(row: &Value) -> Vec<String> {
    row.as_object()
        .map(|m| m.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default()
}

/// One table: a header, then a line per row; columns padded to their widest cell.
fn table(rows: &[Value], columns: &[String]) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|row| columns.iter().map(|c| lookup(row, c).map(cell).unwrap_or_default()).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.chars().count()]).max().unwrap_or(0))
        .collect();
    let line = |values: &[String]| {
        let mut s: String =
            values.iter().zip(&widths).map(|(v, w)| format!("{v:w$}", w = *w)).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(columns);
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// The value at a dotted path (`queue.name`).
fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(row, |v, key| v.get(key))
}

/// A value as one table cell: strings bare, everything else as compact JSON, cut at [`MAX_CELL`].
fn cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let s = s.replace(['\n', '\r', '\t'], " ");
    if s.chars().count() > MAX_CELL {
        let cut: String = s.chars().take(MAX_CELL - 1).collect();
        format!("{cut}…")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_of_objects_become_aligned_tables() {
        let rows = json!([
            {"name": "orders", "messages": 12, "queue": {"name": "x"}},
            {"name": "a", "messages": 3, "queue": {"name": "longer-name"}},
        ]);
        let out = render(&rows, &["name", "messages", "queue.name"]);
        assert_eq!(out, "name    messages  queue.name\norders  12        x\na       3         longer-name\n");
        assert_eq!(render(&json!([]), &["name"]), "(none)\n");
        // No columns given: the first row's scalar fields (serde_json keeps keys sorted).
        assert_eq!(render(&rows, &[]), "messages  name\n12        orders\n3         a\n");
    }

    #[test]
    fn objects_become_key_value_lines_and_long_cells_are_cut() {
        let long = "x".repeat(100);
        let out = render(&json!({"status": "ok", "body": long}), &[]);
        assert!(out.starts_with("body    xxx") && out.ends_with("…\nstatus  ok\n"), "{out}");
        assert_eq!(out.lines().next().unwrap().chars().count(), "body    ".len() + MAX_CELL);
    }
}
