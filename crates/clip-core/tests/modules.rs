//! The shape of the library: clip-core's modules depend on each other in one direction only, so
//! each can be read (and tested) with only what is below it. A module's dependencies are the
//! `crate::NAME` paths in its code (comments left out); inside `data/`, the `super::NAME` paths.
//! A cycle fails this test, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The code of a file without its comments (line comments and doc comments).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names following `prefix` (`crate::`, `super::`) in `text`, as identifiers.
fn targets(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, _)| {
            text[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|t| !t.is_empty() && t.chars().next().unwrap().is_lowercase())
        .collect()
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`data/store.rs` → `data`), `None` for lib.rs.
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib").then_some(name)
}

/// clip-core's module graph: module → the modules its code names.
fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in sources(&src()) {
        let Some(m) = top_module(&f) else { continue };
        let deps = targets(&code(&f), "crate::");
        let entry = graph.entry(m.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != m));
    }
    graph
}

#[test]
fn clip_core_modules_form_no_cycle() {
    let graph = crate_graph();
    assert!(graph.len() >= 20, "{graph:?}");
    // The graph reads as it should: files at the bottom, the trainer at the top.
    assert!(graph["files"].is_empty(), "files is a leaf: {:?}", graph["files"]);
    assert!(graph["fit"].contains("run_dir") && graph["run_dir"].contains("checkpoint"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("clip-core's modules form a cycle: {}", cycle.join(" → "));
    }
}

/// What `data/mod.rs` re-exports: item name → the submodule that defines it.
fn reexports(dir: &Path) -> BTreeMap<String, String> {
    let text = code(&dir.join("mod.rs"));
    let mut out = BTreeMap::new();
    for stmt in text.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap().trim();
            if !name.is_empty() {
                out.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    out
}

/// The items a file takes from `super::` (`super::x::…`, `super::{A, b::C}`, `super::A`).
fn super_items(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("super::") {
        let rest = &text[i + "super::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let first = item.trim().split("::").next().unwrap_or("").trim();
                if !first.is_empty() {
                    out.insert(first.to_string());
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn data_submodules_form_no_cycle() {
    let dir = src().join("data");
    let defined_in = reexports(&dir);
    assert!(defined_in.contains_key("Dataset"), "{defined_in:?}");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in sources(&dir) {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "mod" {
            continue;
        }
        // A submodule by name, or an item re-exported from one.
        let deps = super_items(&code(&f)).into_iter().filter_map(|item| {
            if dir.join(format!("{item}.rs")).is_file() {
                Some(item)
            } else {
                defined_in.get(&item).cloned()
            }
        });
        graph
            .entry(name.clone())
            .or_default()
            .extend(deps.filter(|d| *d != name));
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("data/'s modules form a cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        targets(
            "use crate::files::{x};\nlet y = crate::run_dir::LAST; // crate::fit",
            "crate::"
        ),
        ["files", "run_dir", "fit"].iter().map(|s| s.to_string()).collect()
    );
}
