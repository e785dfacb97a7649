//! The layering in ARCHITECTURE.md holds in the code.
//!
//! ARCHITECTURE.md has one fenced block per crate with the info string `layers <dir>`
//! (`src`, later `firmware-sim/src`): its layers, top first, one per line; a line holds
//! one or more module paths ("units"); blank lines and text after `#` are ignored. Every
//! `.rs` file under `<dir>` belongs to the longest listed unit that prefixes its module
//! path (the crate roots `main.rs`/`lib.rs` are exempt unless listed as `main`/`lib`).
//! Every reference to another module of the crate (`crate::…`, `super::…`, `self::…`, a
//! child module declared with `mod`, in `use` trees or inline in code) must point into
//! the file's own unit or into a unit on a strictly lower layer: nothing imports upwards
//! and peers on the same line do not import each other.
//!
//! std only: a small lexer drops comments and string/char literals, then paths are read
//! from the token stream.

#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// ARCHITECTURE.md: the `layers <dir>` blocks
// ---------------------------------------------------------------------------------------

/// One `layers <dir>` block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    /// The source directory, relative to the workspace root.
    dir: String,
    /// Layers, top first; each a list of units (module paths such as `api::state`).
    layers: Vec<Vec<String>>,
}

/// An opening or closing code fence: its character and length, and the info string.
fn fence(line: &str) -> Option<(char, usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let t = &line[indent..];
    let c = t.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = t.len() - t.trim_start_matches(c).len();
    (n >= 3).then(|| (c, n, t[n..].trim()))
}

/// Every fenced block whose info string is `layers <dir>`, in document order.
fn parse_blocks(md: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut lines = md.lines().enumerate();
    while let Some((at, line)) = lines.next() {
        let Some((c, n, info)) = fence(line) else {
            continue;
        };
        let mut body = Vec::new();
        for (_, l) in lines.by_ref() {
            if fence(l).is_some_and(|(c2, n2, rest)| c2 == c && n2 >= n && rest.is_empty()) {
                break;
            }
            body.push(l);
        }
        let mut words = info.split_whitespace();
        if words.next() != Some("layers") {
            continue;
        }
        let (Some(dir), None) = (words.next(), words.next()) else {
            return Err(format!(
                "ARCHITECTURE.md line {}: expected ```layers <dir>, found ```{info}",
                at + 1
            ));
        };
        let layers: Vec<Vec<String>> = body
            .iter()
            .map(|l| l.split('#').next().unwrap_or(""))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|units| !units.is_empty())
            .collect();
        blocks.push(Block {
            dir: dir.trim_end_matches('/').to_owned(),
            layers,
        });
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------
// Lexing: identifiers, `::` and punctuation; comments and literals are dropped
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The index after a `"…"` literal whose opening quote is at `i`.
fn skip_string(s: &[char], mut i: usize) -> usize {
    i += 1;
    while i < s.len() {
        match s[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// If a raw string (`r"…"`, `r#"…"#`, …) starts at `i` (at the `r`), the index after it.
fn skip_raw_string(s: &[char], i: usize) -> Option<usize> {
    let mut j = i + 1;
    let mut hashes = 0;
    while s.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    if s.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < s.len() {
        if s[j] == '"' && (1..=hashes).all(|k| s.get(j + k) == Some(&'#')) {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(j)
}

/// Tokens of Rust source without comments, string, char and byte literals, lifetimes.
fn lex(src: &str) -> Vec<Tok> {
    let s: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&s, i);
        } else if c == '\'' {
            if next == Some('\\') {
                // An escaped char literal: '\n', '\'', '\u{..}'.
                i += 3;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if s.get(i + 2) == Some(&'\'') {
                i += 3; // 'x'
            } else {
                // A lifetime or label: drop it with its name.
                i += 1;
                while i < s.len() && is_ident_char(s[i]) {
                    i += 1;
                }
            }
        } else if is_ident_char(c) {
            // Literal prefixes first: r"", r#""#, b"", br"", c"", cr"", b''.
            if c == 'r'
                && let Some(end) = skip_raw_string(&s, i)
            {
                i = end;
                continue;
            }
            if (c == 'b' || c == 'c')
                && next == Some('r')
                && let Some(end) = skip_raw_string(&s, i + 1)
            {
                i = end;
                continue;
            }
            if (c == 'b' || c == 'c') && next == Some('"') {
                i = skip_string(&s, i + 1);
                continue;
            }
            if c == 'b' && next == Some('\'') {
                // Re-enter at the quote: a byte literal lexes like a char literal.
                i += 1;
                continue;
            }
            if c == 'r' && next == Some('#') && s.get(i + 2).is_some_and(|&c| is_ident_char(c)) {
                i += 2; // raw identifier r#name
                continue;
            }
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(s[start..i].iter().collect()));
        } else if c == ':' && next == Some(':') {
            toks.push(Tok::Sep);
            i += 2;
        } else {
            toks.push(Tok::Punct(c));
            i += 1;
        }
    }
    toks
}

// ---------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------

fn is_ident(t: Option<&Tok>, name: &str) -> bool {
    matches!(t, Some(Tok::Ident(s)) if s == name)
}

fn is_punct(t: Option<&Tok>, c: char) -> bool {
    t == Some(&Tok::Punct(c))
}

/// Parse a path or use tree starting at `i` (its first segment) below `prefix`; push
/// every complete path (as written: `crate`/`super`/`self` segments unresolved) to
/// `out`. Returns the index after it.
fn parse_tree(toks: &[Tok], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut segs = prefix.to_vec();
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                // `{self, …}` names the prefix itself.
                if !(s == "self" && segs.len() == prefix.len() && !prefix.is_empty()) {
                    segs.push(s.clone());
                }
                i += 1;
                if toks.get(i) == Some(&Tok::Sep) {
                    i += 1;
                    continue;
                }
                out.push(segs);
                return i;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        None => return i,
                        Some(Tok::Punct('}')) => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        Some(Tok::Ident(_) | Tok::Punct('{' | '*')) => {
                            i = parse_tree(toks, i, &segs, out);
                            // Skip what may follow a tree: `as alias`.
                            while let Some(t) = toks.get(i) {
                                if matches!(t, Tok::Punct(',' | '}')) {
                                    break;
                                }
                                i += 1;
                            }
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            // A glob, a turbofish (`f::<T>`) or anything else ends the path.
            Some(Tok::Punct('*')) => {
                out.push(segs);
                return i + 1;
            }
            _ => {
                out.push(segs);
                return i;
            }
        }
    }
}

/// Resolve a path as written in module `module` to segments from the crate root.
/// `None` when `super` climbs above the crate root.
fn resolve(raw: &[String], module: &[String]) -> Option<Vec<String>> {
    let first = raw.first()?;
    match first.as_str() {
        "crate" => Some(raw[1..].to_vec()),
        "self" => Some([module, &raw[1..]].concat()),
        "super" => {
            let mut m = module.to_vec();
            let mut k = 0;
            while raw.get(k).is_some_and(|s| s == "super") {
                m.pop()?;
                k += 1;
            }
            Some([&m[..], &raw[k..]].concat())
        }
        // A child module declared in this module.
        _ => Some([module, raw].concat()),
    }
}

/// Modules declared in each module of a file (`mod x;` or `mod x { … }`).
type Children = BTreeMap<Vec<String>, BTreeSet<String>>;

/// The module each token is in (following inline `mod name { … }` bodies), and the
/// modules declared in each module.
fn modules(toks: &[Tok], file_module: &[String]) -> (Vec<Vec<String>>, Children) {
    let mut at = Vec::with_capacity(toks.len());
    let mut children = Children::new();
    let mut module = file_module.to_vec();
    // Brace depth at which each open inline module's body started.
    let mut open: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate() {
        at.push(module.clone());
        match t {
            Tok::Ident(m) if m == "mod" => {
                if let Some(Tok::Ident(name)) = toks.get(i + 1) {
                    children
                        .entry(module.clone())
                        .or_default()
                        .insert(name.clone());
                }
            }
            Tok::Punct('{') => {
                depth += 1;
                if i >= 2
                    && is_ident(toks.get(i - 2), "mod")
                    && let Some(Tok::Ident(name)) = toks.get(i - 1)
                {
                    module.push(name.clone());
                    open.push(depth);
                }
            }
            Tok::Punct('}') => {
                if open.last() == Some(&depth) {
                    open.pop();
                    module.pop();
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    (at, children)
}

/// Every reference of `src` (the file of module `file_module`) to a module of its crate,
/// resolved to segments from the crate root. Unresolvable ones (`super` above the root)
/// are returned as written, in `Err`.
fn references(src: &str, file_module: &[String]) -> Vec<Result<Vec<String>, String>> {
    let toks = lex(src);
    let (at, children) = modules(&toks, file_module);
    let mut refs = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let module = &at[i];
        let start = i;
        i += 1;
        let Some(Tok::Ident(first)) = toks.get(start) else {
            continue;
        };
        if toks.get(start + 1) != Some(&Tok::Sep) {
            continue;
        }
        let prev = start.checked_sub(1).and_then(|p| toks.get(p));
        // Inside a path already (`a::crate`), a method (`x.f::<T>`), or a visibility
        // (`pub(in crate::a)`): not the start of a reference.
        if prev == Some(&Tok::Sep)
            || is_punct(prev, '.')
            || (is_ident(prev, "in") && start >= 2 && is_punct(toks.get(start - 2), '('))
        {
            continue;
        }
        let local = children
            .get(module)
            .is_some_and(|c| c.contains(first.as_str()));
        if !matches!(first.as_str(), "crate" | "super" | "self") && !local {
            continue;
        }
        let mut raw = Vec::new();
        i = parse_tree(&toks, start, &[], &mut raw);
        for r in raw {
            refs.push(resolve(&r, module).ok_or_else(|| r.join("::")));
        }
    }
    refs
}

// ---------------------------------------------------------------------------------------
// The rule
// ---------------------------------------------------------------------------------------

/// The longest unit that is a `::`-boundary prefix of `path`.
fn unit_of<'a>(units: &'a BTreeMap<String, usize>, path: &[String]) -> Option<&'a str> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find_map(|p| units.get_key_value(&p).map(|(k, _)| k.as_str()))
}

/// What a check found.
#[derive(Debug, Default)]
struct Report {
    files: usize,
    references: usize,
    violations: Vec<String>,
    errors: Vec<String>,
}

/// A source file to check: how to name it, its module path, its text.
struct SourceFile {
    display: String,
    module: Vec<String>,
    text: String,
}

/// Check `files` against `layers` (top first). Layers are numbered from 1 at the top.
fn check(layers: &[Vec<String>], files: &[SourceFile]) -> Report {
    let mut report = Report::default();
    let mut units: BTreeMap<String, usize> = BTreeMap::new();
    for (n, line) in layers.iter().enumerate() {
        for u in line {
            if units.insert(u.clone(), n + 1).is_some() {
                report.errors.push(format!("unit `{u}` is listed twice"));
            }
        }
    }
    let mut used: BTreeSet<&str> = BTreeSet::new();
    for f in files {
        let Some(unit) = unit_of(&units, &f.module) else {
            report.errors.push(format!(
                "{}: module `{}` belongs to no listed unit",
                f.display,
                f.module.join("::")
            ));
            continue;
        };
        used.insert(unit);
        report.files += 1;
        let layer = units[unit];
        let mut seen = BTreeSet::new();
        for r in references(&f.text, &f.module) {
            report.references += 1;
            let path = match r {
                Ok(p) => p,
                Err(raw) => {
                    report.errors.push(format!(
                        "{}: `{raw}` climbs above the crate root",
                        f.display
                    ));
                    continue;
                }
            };
            let shown = format!("crate::{}", path.join("::"));
            if !seen.insert(shown.clone()) {
                continue;
            }
            let Some(target) = unit_of(&units, &path) else {
                report.errors.push(format!(
                    "{}: `{shown}` belongs to no listed unit",
                    f.display
                ));
                continue;
            };
            let target_layer = units[target];
            if target != unit && target_layer <= layer {
                report.violations.push(format!(
                    "{}: unit `{unit}` (layer {layer}) imports `{shown}` (unit `{target}`, layer {target_layer})",
                    f.display
                ));
            }
        }
    }
    for u in units.keys() {
        if !used.contains(u.as_str()) {
            report
                .errors
                .push(format!("unit `{u}` is listed but no file belongs to it"));
        }
    }
    report
}

// ---------------------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------------------

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rs_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `a/b.rs` -> `a::b`, `a/mod.rs` -> `a`, `a.rs` -> `a` (relative to the source root).
fn module_path(rel: &Path) -> Vec<String> {
    let mut segs: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

/// The files of a block's directory (crate roots exempt unless listed).
fn load_files(root: &Path, block: &Block) -> Result<Vec<SourceFile>, String> {
    let dir = root.join(&block.dir);
    let mut paths = Vec::new();
    rs_files(&dir, &mut paths).map_err(|e| format!("{}: {e}", dir.display()))?;
    paths.sort();
    let listed: BTreeSet<&str> = block.layers.iter().flatten().map(String::as_str).collect();
    let mut files = Vec::new();
    for path in paths {
        let rel = path.strip_prefix(&dir).unwrap_or(&path);
        let module = module_path(rel);
        let root_file = module.len() == 1 && matches!(module[0].as_str(), "main" | "lib");
        if root_file && !listed.contains(module[0].as_str()) {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(SourceFile {
            display: path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string(),
            module,
            text,
        });
    }
    Ok(files)
}

#[test]
fn layers_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let md = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let blocks = parse_blocks(&md).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        blocks.iter().any(|b| b.dir == "src"),
        "ARCHITECTURE.md has no ```layers src block"
    );
    let mut failed = false;
    for block in &blocks {
        let files = load_files(root, block).unwrap_or_else(|e| panic!("{e}"));
        let report = check(&block.layers, &files);
        for e in &report.errors {
            println!("error: {e}");
        }
        for v in &report.violations {
            println!("{v}");
        }
        println!(
            "layers {}: {} files, {} references checked; {} violations, {} errors \
             (layers numbered from 1 at the top)",
            block.dir,
            report.files,
            report.references,
            report.violations.len(),
            report.errors.len()
        );
        if block.dir == "src" {
            assert!(
                report.files >= 20 && report.references >= 100,
                "layers src: checked only {} files and {} references",
                report.files,
                report.references
            );
        }
        failed |= !report.violations.is_empty() || !report.errors.is_empty();
    }
    assert!(
        !failed,
        "the layering in ARCHITECTURE.md does not hold (see above)"
    );
}

// ---------------------------------------------------------------------------------------
// Tests of the parser and the rule
// ---------------------------------------------------------------------------------------

fn module(s: &str) -> Vec<String> {
    s.split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn refs(src: &str, file_module: &str) -> Vec<String> {
    references(src, &module(file_module))
        .into_iter()
        .map(|r| match r {
            Ok(p) => p.join("::"),
            Err(raw) => format!("ERR {raw}"),
        })
        .collect()
}

#[test]
fn simple_and_pub_use() {
    let src = "use crate::a::b::C;\npub use crate::d::E;\npub(crate) use crate::f;\nuse std::fmt;";
    assert_eq!(refs(src, "x"), ["a::b::C", "d::E", "f"]);
}

#[test]
fn grouped_nested_multiline_use() {
    let src =
        "use crate::{\n    a::B,\n    c::{d, e::F},\n    g::{self, h::*},\n    i::J as K,\n};";
    assert_eq!(
        refs(src, "x"),
        ["a::B", "c::d", "c::e::F", "g", "g::h", "i::J"]
    );
}

#[test]
fn inline_paths() {
    let src = "fn f() -> crate::a::R<u8> {\n    let v = crate::b::g(1, crate::c::K);\n    \
               crate::d::h::<u8>();\n    x.crate_thing::<u8>();\n    v\n}";
    assert_eq!(refs(src, "x"), ["a::R", "b::g", "c::K", "d::h"]);
}

#[test]
fn super_is_relative_to_the_file() {
    // src/a/b.rs
    assert_eq!(
        refs("use super::c::X;\nfn f() { super::d::g(); }", "a::b"),
        ["a::c::X", "a::d::g"]
    );
    // src/a/mod.rs: super is the crate root
    assert_eq!(refs("use super::z::Y;", "a"), ["z::Y"]);
    assert_eq!(refs("use super::super::q::R;", "a::b::c"), ["a::q::R"]);
    assert_eq!(refs("use super::{c, d::E};", "a::b"), ["a::c", "a::d::E"]);
    assert_eq!(refs("use super::X;", ""), ["ERR super::X"]);
}

#[test]
fn inline_modules_and_child_modules() {
    let src = "mod child;\npub mod other;\nuse child::X;\nuse self::other::Y;\n\
               #[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::q::R;\n    \
               mod deeper { use super::W; }\n}\nfn f() { tests::g(); }";
    assert_eq!(
        refs(src, "a::b"),
        [
            "a::b::child::X",
            "a::b::other::Y",
            "a::b",
            "a::q::R",
            "a::b::tests::W",
            "a::b::tests::g"
        ]
    );
}

#[test]
fn comments_and_literals_are_ignored() {
    let src = r####"
// crate::no::One
/// crate::no::Two
//! crate::no::Three
/* crate::no::Four /* nested crate::no::Five */ crate::no::Six */
fn f<'a>(x: &'a str) -> char {
    let s = "crate::no::Seven \" crate::no::Eight";
    let r = r#"crate::no::Nine " still"#;
    let b = b"crate::no::Ten";
    let q = '"';
    let e = '\'';
    let by = b'"';
    'outer: loop { break 'outer; }
    crate::yes::Eleven
}
"####;
    assert_eq!(refs(src, "x"), ["yes::Eleven"]);
}

#[test]
fn visibility_paths_and_other_crates_are_not_references() {
    let src = "pub(in crate::a) fn f() {}\npub(super) fn g() {}\nuse std::collections::HashMap;\n\
               use ::serde::Serialize;\nfn h() { config::x(); }";
    assert!(refs(src, "x").is_empty());
}

#[test]
fn blocks_are_parsed() {
    let md = "# T\n\n```rust\nlet x = 1;\n```\n\n```layers src\napp   # the wiring\n\n\
              api::state api::error\n# a comment line\nmodel\n```\n\n````layers firmware-sim/src/\n\
              main\nrun bench\n````\n";
    let blocks = parse_blocks(md).expect("parses");
    assert_eq!(
        blocks,
        [
            Block {
                dir: "src".into(),
                layers: vec![
                    vec!["app".into()],
                    vec!["api::state".into(), "api::error".into()],
                    vec!["model".into()],
                ],
            },
            Block {
                dir: "firmware-sim/src".into(),
                layers: vec![vec!["main".into()], vec!["run".into(), "bench".into()]],
            },
        ]
    );
    // No block at all is not an error of the parser (the test requires `src`).
    assert!(
        parse_blocks("```text\nlayers src\n```\n")
            .expect("parses")
            .is_empty()
    );
    assert!(parse_blocks("```layers\napp\n```\n").is_err());
}

#[test]
fn units_match_on_segment_boundaries() {
    let units: BTreeMap<String, usize> = [("live", 1), ("live::sse", 2)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(unit_of(&units, &module("live::sse::X")), Some("live::sse"));
    assert_eq!(unit_of(&units, &module("live::ssex")), Some("live"));
    assert_eq!(unit_of(&units, &module("live")), Some("live"));
    assert_eq!(unit_of(&units, &module("livex::a")), None);
    assert_eq!(module_path(Path::new("a/b.rs")), ["a", "b"]);
    assert_eq!(module_path(Path::new("a/mod.rs")), ["a"]);
    assert_eq!(module_path(Path::new("a.rs")), ["a"]);
}

#[test]
fn the_rule() {
    let layers = vec![
        vec!["app".to_owned()],
        vec!["api".to_owned(), "web".to_owned()],
        vec!["model".to_owned()],
    ];
    let file = |display: &str, m: &str, text: &str| SourceFile {
        display: display.to_owned(),
        module: module(m),
        text: text.to_owned(),
    };
    let files = [
        file(
            "src/app.rs",
            "app",
            "use crate::api::X; use crate::model::Y;",
        ),
        file(
            "src/api/mod.rs",
            "api",
            "use crate::model::Y; use crate::api::Z;",
        ),
        file("src/api/a.rs", "api::a", "use super::Z; use crate::web::W;"),
        file("src/web/mod.rs", "web", "fn f() { crate::app::start(); }"),
        file("src/model.rs", "model", "use crate::nowhere::Q;"),
        file("src/extra.rs", "extra", ""),
    ];
    let report = check(&layers, &files);
    assert_eq!(
        report.violations,
        [
            "src/api/a.rs: unit `api` (layer 2) imports `crate::web::W` (unit `web`, layer 2)",
            "src/web/mod.rs: unit `web` (layer 2) imports `crate::app::start` (unit `app`, layer 1)",
        ]
    );
    assert_eq!(
        report.errors,
        [
            "src/model.rs: `crate::nowhere::Q` belongs to no listed unit",
            "src/extra.rs: module `extra` belongs to no listed unit",
        ]
    );
    assert_eq!((report.files, report.references), (5, 8));
}
