//! No import cycles between the SDK's top-level modules (issue 14 named `bus` <-> `inbox/postgres`
//! <-> `request`). Reads `src/`, takes each module's `crate::<module>` paths (outside `#[cfg(test)]`
//! blocks and comments) and the paths through the crate root's re-exports, and fails on any cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module a source file belongs to (`src/saga/store.rs` -> `saga`; `src/lib.rs` -> none).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "lib").then_some(name)
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without what follows its first `#[cfg(test)]`.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// Identifiers following `crate::` in `code` (each first segment of a `crate::{a, b::c}` group too).
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| s.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        match rest.strip_prefix('{') {
            Some(group) => out.extend(group.split('}').next().unwrap_or_default().split(',').map(ident)),
            None => out.push(ident(rest)),
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

#[test]
fn no_cycles_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    // Root re-exports (`pub use bus::{Bus, Context}`): `crate::Bus` depends on `bus`.
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    for line in lib.lines().map(str::trim).filter(|l| l.starts_with("pub use ")) {
        let rest = line.trim_start_matches("pub use ").trim_end_matches(';');
        let module = rest.split("::").next().unwrap_or_default().to_owned();
        let names = rest.split_once("::").map(|(_, n)| n).unwrap_or_default();
        for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = name.rsplit("::").next().unwrap_or_default().trim();
            if !name.is_empty() {
                reexports.insert(name.to_owned(), module.clone());
            }
        }
    }
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &all {
        let Some(module) = module_of(&src, f) else { continue };
        if module == "guide" {
            continue; // docs only
        }
        let deps = graph.entry(module.clone()).or_default();
        for p in crate_paths(&code(&std::fs::read_to_string(f).unwrap())) {
            let target = reexports.get(&p).cloned().unwrap_or(p);
            if target != module {
                deps.insert(target);
            }
        }
    }
    assert!(graph.contains_key("bus") && graph["bus"].contains("transport"), "the scan sees the modules: {graph:?}");
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for d in graph.get(n).into_iter().flatten() {
            if graph.contains_key(d) {
                if let Some(c) = visit(d, graph, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut state, &mut Vec::new()) {
            panic!("import cycle between modules: {}", cycle.join(" -> "));
        }
    }
}
