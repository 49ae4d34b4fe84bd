//! The crate's dependency direction, checked: every module is declared in
//! one of four layers, and no module refers to a module of a higher layer,
//! nor do modules of one layer refer to each other in a cycle. See
//! `docs/mesh-client-modules.md` for the drawing and the reasons.
//!
//! The scan reads `src/` as text: comments and literals are dropped, then
//! every path through `crate::`, `super::` or a child module a file declares
//! (in `use` trees and inline) is resolved to the module it names. The crate
//! root's re-exports (`crate::MeshError`) resolve to the module they come
//! from; items defined in the root itself (`BoxError`) are vocabulary.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The four layers, lowest first: a module may use its own layer (without
/// cycles) and those below it, never one above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// Error, config and its live handle, method/path types, authorization
    /// policy data, identity types, the metrics handle.
    Vocabulary,
    /// Resolvers, endpoints, deadlines, response bodies, TLS I/O, the admin
    /// port.
    Mechanism,
    /// The layers of a call: balance, retry, telemetry, authorization.
    Middleware,
    /// What builds the stacks: `Mesh`/`MeshChannel` and `MeshServer`.
    Assembly,
}

use Layer::*;

/// Every module, by path below the crate root; a module not listed belongs
/// to its closest listed ancestor. "" is the crate root's own items.
const MODULES: &[(&str, Layer)] = &[
    ("", Vocabulary),
    ("error", Vocabulary),
    ("config", Vocabulary),
    ("config::text", Vocabulary),
    ("methods", Vocabulary),
    ("headers", Vocabulary),
    ("authz", Vocabulary),
    ("fault", Vocabulary),
    ("mirror", Vocabulary),
    ("tls::identity", Vocabulary),
    ("telemetry::metrics", Vocabulary),
    ("resolve", Mechanism),
    ("endpoint", Mechanism),
    ("deadline", Mechanism),
    ("body", Mechanism),
    ("tls", Mechanism),
    ("telemetry::admin", Mechanism),
    ("balance", Middleware),
    ("retry", Middleware),
    ("route", Middleware),
    ("telemetry", Middleware),
    ("authz::layer", Middleware),
    ("fault::layer", Middleware),
    ("fault::server", Middleware),
    ("mirror::layer", Middleware),
    ("optional", Middleware),
    ("channel", Assembly),
    ("server", Assembly),
];

/// The declared module that `path` (segments below the crate root) falls in.
fn component(path: &[String]) -> Option<&'static str> {
    let joined = path.join("::");
    MODULES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            name.is_empty() || joined == *name || joined.starts_with(&format!("{name}::"))
        })
        .max_by_key(|name| name.len())
}

fn layer_of(component: &str) -> Layer {
    MODULES
        .iter()
        .find(|(name, _)| *name == component)
        .map(|(_, layer)| *layer)
        .expect("a declared component")
}

/// `text` without comments, string and char literals (each replaced by a
/// space), so only code is scanned.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match chars.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    _ => j += 1,
                }
            }
            i = j;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' {
            // A char literal ('x', '\n'), or a lifetime ('a), left alone.
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(' ');
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push(' ');
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A token stream good enough for paths: identifiers, `::`, braces,
/// commas, `*`, and everything else as a separator.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else if "{},*;".contains(c) {
            out.push(c.to_string());
            i += 1;
        } else {
            if !c.is_whitespace() {
                out.push(" ".into());
            }
            i += 1;
        }
    }
    out
}

/// Parses the path (tree) starting at `tokens[*at]`, appending every full
/// path it names to `out` (a `{a, b::c}` group gives several).
fn parse_tree(tokens: &[String], at: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match tokens.get(*at).map(String::as_str) {
            Some("{") => {
                *at += 1;
                loop {
                    match tokens.get(*at).map(String::as_str) {
                        None => return,
                        Some("}") => {
                            *at += 1;
                            return;
                        }
                        Some(",") => *at += 1,
                        Some("self") => {
                            out.push(path.clone());
                            *at += 1;
                        }
                        Some(_) => parse_tree(tokens, at, path.clone(), out),
                    }
                }
            }
            Some("*") => {
                *at += 1;
                out.push(path);
                return;
            }
            Some(t) if t.chars().all(is_ident) && t != "as" => {
                path.push(t.to_owned());
                *at += 1;
                if tokens.get(*at).map(String::as_str) == Some("::") {
                    *at += 1;
                    continue;
                }
                if tokens.get(*at).map(String::as_str) == Some("as") {
                    *at += 2;
                }
                out.push(path);
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// What one file refers to: full paths below the crate root.
struct Scanned {
    module: Vec<String>,
    paths: Vec<Vec<String>>,
}

/// The module a file under `src/` is (`a/b.rs` and `a/b/mod.rs` are `a::b`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

fn scan(module: Vec<String>, text: &str) -> Scanned {
    let tokens = tokens(&strip(text));
    // Child modules this file declares: `use child::...` means module::child.
    let children: BTreeSet<&str> = tokens
        .windows(3)
        .filter(|w| w[0] == "mod" && w[2] == ";")
        .map(|w| w[1].as_str())
        .collect();
    let mut paths = Vec::new();
    // Inline modules (`mod tests { .. }`) open at a brace depth; `super`
    // inside one is the file's module.
    let mut depth = 0usize;
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        if t == "mod" && tokens.get(i + 2).map(String::as_str) == Some("{") {
            inline.push((tokens[i + 1].clone(), depth + 1));
        }
        if t == "{" {
            depth += 1;
        } else if t == "}" {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        }
        let mut module = module.clone();
        module.extend(inline.iter().map(|(name, _)| name.clone()));
        let after_sep = i == 0 || tokens[i - 1] != "::";
        let prefix = match t {
            "crate" if after_sep => Some(Vec::new()),
            "super" if after_sep => {
                let mut up = module.clone();
                up.pop();
                Some(up)
            }
            "self" if after_sep && tokens.get(i + 1).map(String::as_str) == Some("::") => {
                Some(module.clone())
            }
            _ if after_sep
                && children.contains(t)
                && i > 0
                && (tokens[i - 1] == "use" || tokens[i - 1] == "{" || tokens[i - 1] == ",")
                && tokens.get(i + 1).map(String::as_str) == Some("::") =>
            {
                let mut down = module.clone();
                down.push(t.to_owned());
                i += 2;
                let mut at = i;
                parse_tree(&tokens, &mut at, down, &mut paths);
                i = at;
                continue;
            }
            _ => None,
        };
        match prefix {
            Some(mut prefix) if tokens.get(i + 1).map(String::as_str) == Some("::") => {
                let mut at = i + 2;
                // `super::super::x`
                while tokens.get(at).map(String::as_str) == Some("super")
                    && tokens.get(at + 1).map(String::as_str) == Some("::")
                {
                    prefix.pop();
                    at += 2;
                }
                parse_tree(&tokens, &mut at, prefix, &mut paths);
                i = at;
            }
            _ => i += 1,
        }
    }
    Scanned { module, paths }
}

/// The crate root's modules and what its re-exports point at.
struct Root {
    modules: BTreeSet<String>,
    reexports: BTreeMap<String, Vec<String>>,
}

fn root(lib: &str) -> Root {
    let tokens = tokens(&strip(lib));
    let modules = tokens
        .windows(3)
        .filter(|w| w[0] == "mod" && w[2] == ";")
        .map(|w| w[1].clone())
        .collect();
    let mut reexports = BTreeMap::new();
    let mut i = 0;
    while i + 1 < tokens.len() {
        if tokens[i] == "use" && tokens[i + 1] != "std" {
            let mut at = i + 1;
            let mut paths = Vec::new();
            parse_tree(&tokens, &mut at, Vec::new(), &mut paths);
            for path in paths {
                if let Some(name) = path.last() {
                    reexports.insert(name.clone(), path.clone());
                }
            }
            i = at;
        } else {
            i += 1;
        }
    }
    Root { modules, reexports }
}

/// Where a path below the crate root really leads.
fn resolve(root: &Root, path: &[String]) -> Vec<String> {
    match path.first() {
        None => Vec::new(),
        Some(first) if root.modules.contains(first) => path.to_vec(),
        Some(first) => match root.reexports.get(first) {
            Some(target) => target.clone(),
            // Defined in the root itself (`BoxError`).
            None => Vec::new(),
        },
    }
}

/// Every violation in `files` (module path, text): upward references, and
/// cycles between modules.
fn violations(lib: &str, files: &[(Vec<String>, String)]) -> Vec<String> {
    let root = root(lib);
    let mut problems = Vec::new();
    let mut edges: BTreeMap<&'static str, BTreeSet<&'static str>> = BTreeMap::new();
    for (module, text) in files {
        let scanned = scan(module.clone(), text);
        let Some(from) = component(&scanned.module).filter(|c| !c.is_empty()) else {
            problems.push(format!(
                "module {} is in no declared layer",
                scanned.module.join("::")
            ));
            continue;
        };
        for path in &scanned.paths {
            let target = resolve(&root, path);
            let Some(to) = component(&target) else {
                continue;
            };
            if to == from {
                continue;
            }
            let (lf, lt) = (layer_of(from), layer_of(to));
            if lt > lf {
                problems.push(format!(
                    "{} ({lf:?}) uses {} ({lt:?}): upward, via `{}`",
                    scanned.module.join("::"),
                    to,
                    path.join("::")
                ));
            }
            // A submodule using its parent, or a parent its own submodule,
            // is one module's inside; only other modules make edges.
            if !to.is_empty()
                && !from.starts_with(&format!("{to}::"))
                && !to.starts_with(&format!("{from}::"))
            {
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    problems.extend(cycles(&edges));
    problems
}

/// Each cycle found in `edges`, as one line.
fn cycles(edges: &BTreeMap<&'static str, BTreeSet<&'static str>>) -> Vec<String> {
    fn visit(
        node: &'static str,
        edges: &BTreeMap<&'static str, BTreeSet<&'static str>>,
        stack: &mut Vec<&'static str>,
        done: &mut BTreeSet<&'static str>,
        found: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<_> = stack[at..].to_vec();
            cycle.push(node);
            found.push(format!("import cycle: {}", cycle.join(" -> ")));
            return;
        }
        if !done.insert(node) {
            return;
        }
        stack.push(node);
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, stack, done, found);
        }
        stack.pop();
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        visit(node, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn sources(dir: &Path, base: &Path, out: &mut Vec<(Vec<String>, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(base).expect("under src/");
            if relative == Path::new("lib.rs") || relative == Path::new("layering.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            out.push((module_of(relative), text));
        }
    }
}

#[test]
fn no_module_uses_a_higher_layer_and_no_modules_form_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    assert!(files.len() > 20, "scanned only {} files", files.len());
    let problems = violations(&lib, &files);
    assert!(
        problems.is_empty(),
        "the module graph breaks its layers (docs/mesh-client-modules.md):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_scan_sees_upward_uses_in_every_form_and_cycles() {
    let lib = "mod config; mod channel; mod balance; mod retry; mod error;\n\
               pub use channel::{Mesh, MeshChannel};\npub use error::MeshError;";
    let file = |module: &str, text: &str| {
        (
            module.split("::").map(str::to_owned).collect::<Vec<_>>(),
            text.to_owned(),
        )
    };
    // Each of these reaches from vocabulary up to the assembly.
    for text in [
        "use crate::channel::Mesh;",
        "use crate::{error::MeshError, channel::{self, Mesh}};",
        "fn f() { let _ = crate::channel::build(); }",
        "use crate::Mesh;",
        "fn f(m: &crate::MeshChannel) {}",
    ] {
        let found = violations(lib, &[file("config", text)]);
        assert!(
            found.iter().any(|p| p.contains("upward")),
            "{text:?} not caught: {found:?}"
        );
    }
    // Comments, strings and downward uses are fine.
    let fine = "// use crate::channel::Mesh;\n/* crate::channel */\n\
                const S: &str = \"crate::channel::Mesh\";\nuse crate::error::MeshError;\n\
                fn f<'a>(c: char) -> bool { c == '{' }";
    assert_eq!(
        violations(lib, &[file("config", fine)]),
        Vec::<String>::new()
    );
    // `super::` from a submodule, and a module of no layer.
    let found = violations(
        lib,
        &[file("config::inner", "use super::super::channel::Mesh;")],
    );
    assert!(found.iter().any(|p| p.contains("upward")), "{found:?}");
    let found = violations(lib, &[file("newthing", "")]);
    assert!(
        found.iter().any(|p| p.contains("no declared layer")),
        "{found:?}"
    );
    // Two modules of one layer using each other.
    let found = violations(
        lib,
        &[
            file("retry", "use crate::balance::Balancer;"),
            file("balance", "use crate::retry::Retry;"),
        ],
    );
    assert!(found.iter().any(|p| p.contains("cycle")), "{found:?}");
}
