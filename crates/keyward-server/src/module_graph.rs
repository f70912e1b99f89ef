//! Holds the crate's modules to a direction: no module imports a module that imports it back, through
//! any number of steps. Cycles are how "the state needs the limits, which need the state" starts; a
//! settings type both sides need belongs in `settings`, which imports nothing of the crate.
//!
//! The graph is read from the sources as they are when the test runs: each file under `src/` is a
//! module; its paths that start with `crate::` or `super::` (and paths into the modules it declares)
//! are its imports, wherever they appear, leaving out comments and its `#[cfg(test)] mod tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`""` for the crate root, `routes::keys`) → the modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `.rs` file under `dir`, as (module path, source).
fn modules(dir: &Path, prefix: &[String], out: &mut Vec<(Vec<String>, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            let mut inner = prefix.to_vec();
            inner.push(name);
            modules(&path, &inner, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut module = prefix.to_vec();
            if !matches!(name.as_str(), "lib" | "main" | "mod") {
                module.push(name);
            }
            out.push((module, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The code of a file without its comments and its tests module.
fn code(source: &str) -> String {
    let source = source.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default();
    source.lines().map(|line| line.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The path that starts at byte `start`: identifiers and `::`, with `{...}` groups, spaces removed.
fn path_at(code: &str, start: usize) -> String {
    let mut depth = 0;
    let mut path = String::new();
    for c in code[start..].chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            c if c.is_whitespace() => continue,
            c if depth == 0 && !(is_ident(c) || c == ':') => break,
            _ => {}
        }
        path.push(c);
    }
    path
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else { return vec![path.to_owned()] };
    let (head, group) = (&path[..open], &path[open + 1..]);
    let mut parts = Vec::new();
    let (mut depth, mut part) = (0, String::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut part));
                continue;
            }
            _ => {}
        }
        part.push(c);
    }
    parts.push(part);
    parts.iter().filter(|p| !p.is_empty()).flat_map(|p| expand(&format!("{head}{p}"))).collect()
}

/// The longest prefix of `segments`, read from `base`, that names a module.
fn resolve(base: &[String], segments: &[&str], known: &BTreeSet<String>) -> String {
    let mut path = base.to_vec();
    let mut best = path.join("::");
    for segment in segments {
        path.push((*segment).to_owned());
        let candidate = path.join("::");
        if known.contains(&candidate) {
            best = candidate;
        }
    }
    best
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    modules(src, &[], &mut files);
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.join("::")).collect();
    let mut graph = Graph::new();
    for (module, source) in &files {
        let name = module.join("::");
        let code = code(source);
        let children: Vec<&str> = known
            .iter()
            .filter_map(|k| k.strip_prefix(&name).map(|rest| rest.trim_start_matches("::")))
            .filter(|rest| !rest.is_empty() && !rest.contains("::"))
            .collect();
        let imports = graph.entry(name.clone()).or_default();
        for (at, _) in code.match_indices("::") {
            // The path's first segment ends here; find where it starts.
            let start = code[..at].rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
            let before = code[..start].chars().next_back();
            if matches!(before, Some(c) if c == ':' || c == '$') {
                continue;
            }
            for path in expand(&path_at(&code, start)) {
                let segments: Vec<&str> = path.split("::").collect();
                let target = match segments[0] {
                    "crate" => resolve(&[], &segments[1..], &known),
                    "super" => {
                        let ups = segments.iter().take_while(|s| **s == "super").count();
                        let base = &module[..module.len().saturating_sub(ups)];
                        resolve(base, &segments[ups..], &known)
                    }
                    first if children.contains(&first) => resolve(module, &segments, &known),
                    _ => continue,
                };
                if target != name {
                    imports.insert(target);
                }
            }
        }
    }
    graph
}

/// A cycle through `node`, if there is one reachable from it.
fn cycle_from(graph: &Graph, node: &str, stack: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
    if let Some(at) = stack.iter().position(|n| n == node) {
        let mut cycle = stack[at..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    stack.push(node.to_owned());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(cycle) = cycle_from(graph, next, stack, done) {
            return Some(cycle);
        }
    }
    stack.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn modules_import_no_cycle() {
    let graph = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The reading works: imports known to exist are seen.
    for (from, to) in [("state", "settings"), ("routes::keys", "auth"), ("service::import", "service"), ("", "routes")]
    {
        assert!(graph[from].contains(to), "{from:?} should import {to:?}: {:?}", graph[from]);
    }
    assert!(graph["settings"].is_empty(), "settings imports nothing of the crate: {:?}", graph["settings"]);
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, node, &mut Vec::new(), &mut done) {
            let names: Vec<&str> = cycle.iter().map(|m| if m.is_empty() { "crate" } else { m.as_str() }).collect();
            panic!("modules import each other: {}", names.join(" -> "));
        }
    }
}

#[test]
fn paths_are_read_with_their_groups() {
    assert_eq!(expand("crate::a::{b,c::{d,e}}"), ["crate::a::b", "crate::a::c::d", "crate::a::c::e"]);
    let line = "use crate::{error::{ApiError, ErrorCode}, state};\nlet x = super::y::z(1);";
    assert_eq!(path_at(line, 4), "crate::{error::{ApiError,ErrorCode},state}");
    assert_eq!(code("a // crate::b\n/// crate::c\nd"), "a \n\nd");
}
