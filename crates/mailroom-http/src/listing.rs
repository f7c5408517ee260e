//! Listing as RabbitMQ's management API does it: `sort` and `sort_reverse` (a field, dotted for nested
//! ones), `columns` (comma-separated, dotted), and, only with `page`, the `name` filter (substring, or a
//! regex with `use_regex=true`) and a page object instead of a plain array.

use crate::api::ApiError;
pub use crate::api::Query;
use hyper::StatusCode;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;

/// Page size when `page` is given without `page_size` (RabbitMQ's default).
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `page_size` RabbitMQ accepts.
pub const MAX_PAGE_SIZE: usize = 500;

/// Follows a dotted path (`arguments.x-max-length`, `message_stats.publish`) into a JSON value.
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().unwrap_or(0.0).partial_cmp(&y.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
        (None, None) => Ordering::Equal,
    }
}

/// Keeps only the `columns` of an item (dotted paths keep the nested field inside its parent object).
fn project(item: &Value, columns: &[&str]) -> Value {
    let mut out = Map::new();
    for column in columns {
        // A nested column (`arguments.x-max-length`) keeps its parent whole, as RabbitMQ does for maps.
        let first = column.split('.').next().unwrap_or(column);
        if let Some(v) = item.get(first) {
            out.insert(first.to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

/// Applies the listing parameters of `query` to `items` (already in their default order, by name).
pub fn list(mut items: Vec<Value>, query: &Query) -> Result<Value, ApiError> {
    let total_count = items.len();
    if let Some(field) = query.get("sort").filter(|s| !s.is_empty()) {
        items.sort_by(|a, b| compare(lookup(a, field), lookup(b, field)));
    }
    if query.flag("sort_reverse") {
        items.reverse();
    }
    let columns: Option<Vec<&str>> =
        query.get("columns").filter(|c| !c.is_empty()).map(|c| c.split(',').map(str::trim).collect());
    let shape = |items: Vec<Value>| -> Vec<Value> {
        match &columns {
            Some(cols) => items.iter().map(|i| project(i, cols)).collect(),
            None => items,
        }
    };
    let Some(page) = query.get("page") else { return Ok(Value::Array(shape(items))) };
    let page_size_raw = query.get("page_size");
    let invalid = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Invalid pagination parameters: page number {page}, page size {}",
                page_size_raw.unwrap_or("undefined")
            ),
        )
        .with_error("invalid_pagination_parameters")
    };
    let page: usize = page.parse().map_err(|_| invalid())?;
    let page_size: usize = match page_size_raw {
        Some(s) => s.parse().map_err(|_| invalid())?,
        None => DEFAULT_PAGE_SIZE,
    };
    if page == 0 || page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(invalid());
    }
    if let Some(name) = query.get("name").filter(|n| !n.is_empty()) {
        let name_of = |v: &Value| v.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
        if query.flag("use_regex") {
            let re =
                regex_lite::Regex::new(name).map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?;
            items.retain(|v| re.is_match(&name_of(v)));
        } else {
            let needle = name.to_lowercase();
            items.retain(|v| name_of(v).to_lowercase().contains(&needle));
        }
    }
    let filtered_count = items.len();
    let page_count = filtered_count.div_ceil(page_size).max(1);
    if page > page_count {
        return Err(ApiError::bad_request(format!(
            "Page out of range, page: {page} page size: {page_size}, len: {filtered_count}"
        ))
        .with_error("page_out_of_range"));
    }
    let page_items: Vec<Value> = items.into_iter().skip((page - 1) * page_size).take(page_size).collect();
    Ok(json!({
        "filtered_count": filtered_count,
        "item_count": page_items.len(),
        "items": shape(page_items),
        "page": page,
        "page_count": page_count,
        "page_size": page_size,
        "total_count": total_count,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Value> {
        (0..5).map(|i| json!({"name": format!("q{i}"), "messages": 10 - i, "arguments": {"x": i}})).collect()
    }

    #[test]
    fn sorts_projects_and_pages() {
        let q = Query::parse(Some("sort=messages&columns=name,arguments.x"));
        let out = list(items(), &q).unwrap();
        assert_eq!(out[0], json!({"name": "q4", "arguments": {"x": 4}}));
        let q = Query::parse(Some("page=2&page_size=2&sort=name&sort_reverse=true"));
        let out = list(items(), &q).unwrap();
        assert_eq!(out["page_count"], 3);
        assert_eq!(out["items"][0]["name"], "q2");
        assert_eq!(out["total_count"], 5);
        let q = Query::parse(Some("page=1&name=%5Eq%5B13%5D%24&use_regex=true"));
        let out = list(items(), &q).unwrap();
        assert_eq!(out["filtered_count"], 2);
        let q = Query::parse(Some("page=1&name=Q3"));
        assert_eq!(list(items(), &q).unwrap()["filtered_count"], 1);
        // The name filter applies only with a page, as in RabbitMQ.
        assert_eq!(list(items(), &Query::parse(Some("name=q3"))).unwrap().as_array().unwrap().len(), 5);
    }

    #[test]
    fn rejects_bad_pages() {
        for bad in ["page=0", "page=1&page_size=501", "page=x", "page=4&page_size=2"] {
            assert!(list(items(), &Query::parse(Some(bad))).is_err(), "{bad}");
        }
    }
}
