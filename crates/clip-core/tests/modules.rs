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

// ---------------------------------------------------------------------------------------------
// Every crate of the workspace (issue #34): no circle among a crate's modules, and no file or
// function past its size outside tests and xtask, apart from the named exceptions below.

/// The workspace root: two folders above clip-core.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The workspace's member folders, as the root Cargo.toml lists them.
fn members() -> Vec<PathBuf> {
    let root = workspace();
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| root.join(m.as_str().unwrap()))
        .collect()
}

/// A member's crate roots: its library (`[lib] path`, or src/lib.rs), src/main.rs and the
/// programs in src/bin/.
fn crate_roots(member: &Path) -> Vec<PathBuf> {
    let manifest: toml::Table = std::fs::read_to_string(member.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let lib = manifest
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
        .map_or_else(|| member.join("src/lib.rs"), |p| member.join(p));
    let mut roots: Vec<PathBuf> = [lib, member.join("src/main.rs")]
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    if let Ok(dir) = std::fs::read_dir(member.join("src/bin")) {
        for e in dir {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") {
                roots.push(p);
            } else if p.join("main.rs").is_file() {
                roots.push(p.join("main.rs"));
            }
        }
    }
    roots.sort();
    roots
}

/// `text` without its `#[cfg(test)]` modules (from the attribute to the module's closing brace).
fn without_test_modules(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        let next = lines.get(i + 1).map(|l| l.trim_start()).unwrap_or("");
        if lines[i].trim() == "#[cfg(test)]" && (next.starts_with("mod ") || next.starts_with("pub mod ")) {
            let indent = &lines[i + 1][..lines[i + 1].len() - next.len()];
            if lines[i + 1].trim_end().ends_with(';') {
                i += 2;
                continue;
            }
            let close = format!("{indent}}}");
            i += 2;
            while i < lines.len() && lines[i] != close {
                i += 1;
            }
            i += 1;
            continue;
        }
        out.push(lines[i]);
        i += 1;
    }
    out.join("\n")
}

/// The file modules `file` declares (`mod x;`, `pub(crate) mod x;`), as the files that hold them.
fn declared_modules(file: &Path, is_root: bool) -> Vec<(String, PathBuf)> {
    let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
    let dir = if is_root || stem == "mod" {
        file.parent().unwrap().to_path_buf()
    } else {
        file.parent().unwrap().join(&stem)
    };
    let mut out = vec![];
    for line in code(file).lines() {
        let mut l = line.trim();
        for vis in ["pub(crate) ", "pub(super) ", "pub "] {
            l = l.strip_prefix(vis).unwrap_or(l);
        }
        let Some(name) = l.strip_prefix("mod ").and_then(|n| n.strip_suffix(';')) else {
            continue;
        };
        let name = name.trim().to_string();
        let path = [dir.join(format!("{name}.rs")), dir.join(&name).join("mod.rs")]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{}: mod {name}; has no file", file.display()));
        out.push((name, path));
    }
    out
}

/// A module's file and the files of every module below it.
fn module_files(file: &Path) -> Vec<PathBuf> {
    let mut out = vec![file.to_path_buf()];
    for (_, sub) in declared_modules(file, false) {
        out.extend(module_files(&sub));
    }
    out
}

/// The first names of the paths after `prefix` in `text`: `crate::a::X` → a, and each path of a
/// group, `crate::{a::X, b::{Y, Z}, c}` → a, b, c.
fn path_heads(text: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        if text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.insert(ident(rest));
            continue;
        };
        // The group's items at depth 0, up to its closing brace.
        let (mut depth, mut start) = (0, 0);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.insert(ident(group[start..j].trim()));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.insert(ident(group[start..j].trim()));
                    start = j + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

/// One crate root's module graph: each module the root declares → the others its files name
/// (`crate::x`, and `super::x` in the module's own file, where `super` is the root).
fn root_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let top = declared_modules(root, true);
    let names: BTreeSet<String> = top.iter().map(|(n, _)| n.clone()).collect();
    let mut graph = BTreeMap::new();
    for (name, file) in &top {
        let mut deps = BTreeSet::new();
        for f in module_files(file) {
            let text = without_test_modules(&code(&f));
            deps.extend(path_heads(&text, "crate::"));
            if &f == file {
                deps.extend(path_heads(&text, "super::"));
            }
        }
        deps.retain(|d| names.contains(d) && d != name);
        graph.insert(name.clone(), deps);
    }
    graph
}

#[test]
fn no_crate_of_the_workspace_has_a_module_cycle() {
    let root = workspace();
    let mut checked = 0;
    let mut cycles = vec![];
    for member in members() {
        for r in crate_roots(&member) {
            let graph = root_graph(&r);
            checked += graph.len();
            if let Some(cycle) = find_cycle(&graph) {
                cycles.push(format!(
                    "{}: {}",
                    r.strip_prefix(&root).unwrap().display(),
                    cycle.join(" → ")
                ));
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} modules found: is the scan reading the workspace?"
    );
    assert!(cycles.is_empty(), "modules form a cycle:\n  {}", cycles.join("\n  "));
}

#[test]
fn the_workspace_scan_reads_imports() {
    assert_eq!(
        path_heads(
            "use crate::{a::X, b::{Y, Z}, c};\nuse crate::d::E; let f = $crate::g;",
            "crate::"
        ),
        ["a", "b", "c", "d", "g"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        without_test_modules("fn a() {}\n#[cfg(test)]\nmod tests {\n    use crate::x;\n}\nfn b() {}"),
        "fn a() {}\nfn b() {}"
    );
    // clip-core's lib.rs declares its top-level modules; stage 4's main.rs its own.
    let core = root_graph(&workspace().join("crates/clip-core/src/lib.rs"));
    assert!(core["fit"].contains("run_dir"), "{core:?}");
    let stage4 = root_graph(&workspace().join("crates/stage4-train/src/main.rs"));
    assert!(
        stage4.contains_key("judge") && stage4.contains_key("setup"),
        "{stage4:?}"
    );
}

/// Files of this many lines or more are to be split (tests and xtask aside).
const FILE_LINES: usize = 800;
/// Functions of this many lines or more, from `fn` to the closing brace, are to be split; in the
/// stage programs, which read as their step, from `STAGE_FN_LINES`.
const FN_LINES: usize = 80;
const STAGE_FN_LINES: usize = 60;

/// Files allowed past `FILE_LINES` (none since issue #34): a new long one fails the test, and so
/// does one listed here that has been split (take it off the list).
const LONG_FILES: &[&str] = &[];

/// Functions allowed past their limit, as `file: name` (none since issue #34); as above, a new
/// long one fails the test, and so does one listed here that has been split.
const LONG_FUNCTIONS: &[&str] = &[];

/// The functions of `text` (rustfmt's layout: the closing brace at the `fn` line's indent) with
/// their lengths in lines, the signature and both braces included.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![];
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let mut rest = body;
        for word in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
            "extern \"C\" ",
        ] {
            rest = rest.strip_prefix(word).unwrap_or(rest);
        }
        let Some(after) = rest.strip_prefix("fn ") else {
            continue;
        };
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // A body on one line, or a declaration without one (its signature ends in `;`).
        if body.ends_with('}') {
            continue;
        }
        let Some(open) = (i..lines.len()).find(|&j| lines[j].ends_with('{') || lines[j].ends_with(';')) else {
            continue;
        };
        if lines[open].ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = (open..lines.len()).find(|&j| lines[j] == close) {
            out.push((name, end - i + 1));
        }
    }
    out
}

/// Every `.rs` file of the workspace's crates outside tests and xtask, relative to the root.
fn checked_sources() -> Vec<PathBuf> {
    let root = workspace();
    let mut files = vec![];
    for member in members() {
        if member.ends_with("xtask") || member.ends_with("tests") {
            continue;
        }
        for r in crate_roots(&member) {
            files.push(r.clone());
            for (_, m) in declared_modules(&r, true) {
                files.extend(module_files(&m));
            }
        }
    }
    let mut files: Vec<PathBuf> = files
        .into_iter()
        .map(|f| f.strip_prefix(&root).unwrap().to_path_buf())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// What is past its limit against what the list names: (new offenders, listed ones now fine).
fn compare(found: BTreeSet<String>, listed: &[&str]) -> (Vec<String>, Vec<String>) {
    let listed: BTreeSet<String> = listed.iter().map(|s| s.to_string()).collect();
    (
        found.difference(&listed).cloned().collect(),
        listed.difference(&found).cloned().collect(),
    )
}

#[test]
fn files_and_functions_stay_short() {
    let root = workspace();
    let files = checked_sources();
    assert!(files.len() > 80, "only {} files found", files.len());
    let mut long_files = BTreeSet::new();
    let mut long_functions = BTreeSet::new();
    for f in &files {
        let lines = std::fs::read_to_string(root.join(f)).unwrap().lines().count();
        if lines >= FILE_LINES {
            long_files.insert(f.display().to_string());
        }
        let limit = if f.starts_with("crates")
            && f.iter()
                .nth(1)
                .is_some_and(|c| c.to_string_lossy().starts_with("stage"))
        {
            STAGE_FN_LINES
        } else {
            FN_LINES
        };
        for (name, n) in function_lengths(&without_test_modules(&code(&root.join(f)))) {
            if n >= limit {
                long_functions.insert(format!("{}: {name}", f.display()));
            }
        }
    }
    let (new, split) = compare(long_files, LONG_FILES);
    assert!(
        new.is_empty(),
        "files of {FILE_LINES} lines or more (split them): {new:?}"
    );
    assert!(split.is_empty(), "no longer long, take them off LONG_FILES: {split:?}");
    let (new, split) = compare(long_functions, LONG_FUNCTIONS);
    assert!(
        new.is_empty(),
        "functions of {FN_LINES} lines or more ({STAGE_FN_LINES} in the stages; split them): {new:?}"
    );
    assert!(
        split.is_empty(),
        "no longer long, take them off LONG_FUNCTIONS: {split:?}"
    );
}

#[test]
fn function_lengths_count_from_fn_to_its_brace() {
    let text = "pub fn a() {\n    1;\n}\n\nfn b(\n    x: u8,\n) -> u8 {\n    x\n}\nfn c() {}\ntrait T {\n    fn d(&self);\n    fn e(&self) {\n        f();\n    }\n}";
    assert_eq!(
        function_lengths(text),
        vec![("a".to_string(), 3), ("b".to_string(), 5), ("e".to_string(), 3)]
    );
}
