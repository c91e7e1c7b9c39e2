//! The layout's contract, checked from the code's own paths: no import circles between files,
//! and every top-level module importing only the layers below it (the table in `lib.rs`).
//!
//! Run alone with `cargo test --test integration architecture -- --nocapture` to print the
//! file graph's size and every edge between modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each top-level module may import (itself aside). Order is the layering, lowest first.
const ALLOWED: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("model", &["domain"]),
    ("synth", &["domain", "model"]),
    ("telemetry", &["domain"]),
    ("io", &["domain", "model", "telemetry"]),
    ("pipeline", &["domain", "model", "io", "telemetry", "synth"]),
    ("control", &["domain", "model", "io", "telemetry", "synth"]),
    (
        "audience",
        &["domain", "model", "io", "telemetry", "pipeline"],
    ),
    ("batch", &["domain", "model", "io", "telemetry", "audience"]),
    (
        "api",
        &[
            "domain",
            "model",
            "io",
            "telemetry",
            "pipeline",
            "control",
            "audience",
        ],
    ),
    (
        "config",
        &[
            "domain",
            "model",
            "io",
            "telemetry",
            "pipeline",
            "control",
            "audience",
            "api",
            "batch",
        ],
    ),
    ("shutdown", &["domain", "model", "io", "telemetry"]),
    (
        "daemon",
        &[
            "domain",
            "model",
            "io",
            "telemetry",
            "pipeline",
            "control",
            "audience",
            "api",
            "batch",
            "config",
            "shutdown",
        ],
    ),
    (
        "tools",
        &[
            "domain",
            "model",
            "io",
            "telemetry",
            "pipeline",
            "control",
            "audience",
            "api",
            "batch",
            "config",
            "shutdown",
            "daemon",
            "synth",
        ],
    ),
    (
        "cli",
        &[
            "domain",
            "model",
            "io",
            "telemetry",
            "pipeline",
            "control",
            "audience",
            "api",
            "batch",
            "config",
            "shutdown",
            "daemon",
            "synth",
            "tools",
        ],
    ),
];

/// Modules that may name `Config`: config itself and what sits above it.
const CONFIG_USERS: &[&str] = &["config", "daemon", "tools", "cli"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src`, as its module path (`pipeline::consume`, `lib`, ...).
fn files() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&src(), &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            (parts.join("::"), p)
        })
        .collect()
}

/// The paths a file names (`crate::a::b::C`, `super::x`, and `use crate::a::{b, c::D}`),
/// resolved to absolute module paths, each as its segments.
fn paths(module: &str, text: &str) -> Vec<Vec<String>> {
    // What `super` means at a file's top level: the parent module. (Inside an inline
    // `mod tests`, `super` is the file itself; resolving it to the parent only adds an edge to
    // a `mod.rs`, which names its children without importing them.)
    let mut base: Vec<String> = module.split("::").map(str::to_owned).collect();
    base.pop();
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let (prefix, root): (&str, Vec<String>) = if rest.starts_with(b"crate::") {
            ("crate::", Vec::new())
        } else if rest.starts_with(b"super::") && (i == 0 || !is_ident(bytes[i - 1])) {
            ("super::", base.clone())
        } else {
            i += 1;
            continue;
        };
        if i > 0 && (is_ident(bytes[i - 1]) || bytes[i - 1] == b':') {
            i += prefix.len();
            continue;
        }
        let mut j = i + prefix.len();
        let mut segments = root.clone();
        loop {
            let start = j;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            if start == j {
                break;
            }
            segments.push(text[start..j].to_owned());
            if bytes[j..].starts_with(b"::") {
                j += 2;
                if bytes[j..].starts_with(b"{") {
                    // One level of braces: each item is a path below `segments`.
                    let end = bytes[j..]
                        .iter()
                        .position(|&b| b == b'}')
                        .map_or(bytes.len(), |e| j + e);
                    for item in text[j + 1..end].split(',') {
                        let item: Vec<String> = item
                            .trim()
                            .split("::")
                            .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
                            .filter(|s| !s.is_empty() && s != "self")
                            .collect();
                        let mut full = segments.clone();
                        full.extend(item);
                        out.push(full);
                    }
                    j = end;
                    break;
                }
            } else {
                break;
            }
        }
        out.push(segments);
        i = j.max(i + 1);
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The longest prefix of `segments` that is a file's module.
fn resolve(segments: &[String], modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// Edges between files: (from, to) → the first name that ties them.
fn graph() -> BTreeMap<(String, String), String> {
    let modules = files();
    let mut edges = BTreeMap::new();
    for (module, path) in &modules {
        let text = std::fs::read_to_string(path).unwrap();
        // Doc comments name paths without importing them.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for segments in paths(module, &code) {
            if let Some(target) = resolve(&segments, &modules) {
                if &target != module && target != "lib" {
                    edges
                        .entry((module.clone(), target))
                        .or_insert_with(|| segments.join("::"));
                }
            }
        }
    }
    edges
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let edges = graph();
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().insert(to);
    }
    // Tarjan's strongly connected components: any with more than one file is a circle.
    struct State<'a> {
        next: &'a BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        circles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in s.next.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.circles.push(component);
            }
        }
    }
    let mut state = State {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        circles: Vec::new(),
    };
    let nodes: Vec<&str> = next.keys().copied().collect();
    for v in nodes {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    let report: Vec<String> = state
        .circles
        .iter()
        .map(|c| {
            let ties: Vec<String> = edges
                .iter()
                .filter(|((a, b), _)| c.contains(&a.as_str()) && c.contains(&b.as_str()))
                .map(|((a, b), name)| format!("  {a} -> {b} ({name})"))
                .collect();
            format!("circle of {} files:\n{}", c.len(), ties.join("\n"))
        })
        .collect();
    assert!(report.is_empty(), "{}", report.join("\n"));
    eprintln!("{} files, {} edges, no circles", files().len(), edges.len());
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let mut wrong = Vec::new();
    let mut between: BTreeSet<(String, String)> = BTreeSet::new();
    for ((from, to), name) in graph() {
        let (a, b) = (top(&from), top(&to));
        if a == b || a == "main" || a == "lib" {
            continue;
        }
        between.insert((a.to_owned(), b.to_owned()));
        let ok = allowed.get(a).is_some_and(|deps| deps.contains(b));
        if !ok {
            wrong.push(format!("{from} -> {to} ({name})"));
        }
        if name.ends_with("config::Config") && !CONFIG_USERS.contains(&a) {
            wrong.push(format!(
                "{from} imports Config: take the section instead ({name})"
            ));
        }
    }
    for (a, b) in &between {
        eprintln!("{a} -> {b}");
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}
