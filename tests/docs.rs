//! The documentation stays in step with the binaries. Every flag that
//! `--help` lists is in the binary's man page (under OPTIONS) and on its
//! reference page in `docs/`; every long flag that a man page or a reference
//! page's flag table names exists in `--help`; and every relative link in
//! README.md and docs/*.md leads to a file, and heading, that exist.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::with_time_limit;

const LIMIT: Duration = Duration::from_secs(60);

/// A binary and where its documentation lives, relative to the repository.
struct Documented {
    name: &'static str,
    path: &'static str,
    man_page: &'static str,
    reference: &'static str,
}

const SERVER: Documented = Documented {
    name: "echo-server",
    path: env!("CARGO_BIN_EXE_echo-server"),
    man_page: "man/echo-server.1",
    reference: "docs/server.md",
};

const CLIENT: Documented = Documented {
    name: "echo-client",
    path: env!("CARGO_BIN_EXE_echo-client"),
    man_page: "man/echo-client.1",
    reference: "docs/client.md",
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// The flags in the Options section of `binary --help`: each option line's
/// names before its description (`-v, --verbose`, `--help, help`), long and
/// short forms alike.
fn help_flags(binary: &Documented) -> BTreeSet<String> {
    let output = Command::new(binary.path)
        .arg("--help")
        .output()
        .unwrap_or_else(|err| panic!("cannot run {} --help: {err}", binary.path));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} --help exited with {}\nstdout:\n{help}\nstderr:\n{}",
        binary.name,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let options = help
        .lines()
        .skip_while(|line| line.trim_end() != "Options:")
        .skip(1)
        .take_while(|line| line.starts_with(' '));
    let mut flags = BTreeSet::new();
    for line in options {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue; // the wrapped tail of a description
        }
        // The names are the first word and each word after one that ends
        // in a comma; a long name may fill the column and leave only one
        // space before its description.
        for word in line.split_whitespace() {
            let name = word.trim_end_matches(',');
            if name.starts_with('-') {
                flags.insert(name.to_owned());
            }
            if !word.ends_with(',') {
                break;
            }
        }
    }
    assert!(
        flags.contains("--help") && flags.len() > 5,
        "found too few flags in the Options section of {} --help: {flags:?}\n{help}",
        binary.name
    );
    flags
}

/// Roff source as plain text: font changes dropped, `\-` as `-`.
fn unroff(source: &str) -> String {
    let mut text = source.replace("\\-", "-");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        text = text.replace(font, "");
    }
    text
}

/// The lines of a man page's `.SH NAME` section, up to the next `.SH`.
fn man_section<'a>(man: &'a str, name: &str) -> &'a str {
    let heading = format!(".SH {name}\n");
    let start = man
        .find(&heading)
        .unwrap_or_else(|| panic!("the man page has no {heading:?}"))
        + heading.len();
    let end = man[start..]
        .find("\n.SH ")
        .map_or(man.len(), |at| start + at);
    &man[start..end]
}

fn is_flag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Whether `text` names `flag` as a whole word: `-v` is not found in
/// `--verbose`, nor `--port` in `--port-range`.
fn mentions(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + flag.len()..].chars().next();
        !before.is_some_and(is_flag_char) && !after.is_some_and(is_flag_char)
    })
}

/// Every long flag (`--name`) that `text` names.
fn long_flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (at, _) in text.match_indices("--") {
        if text[..at].chars().next_back().is_some_and(is_flag_char) {
            continue;
        }
        let name: String = text[at + 2..]
            .chars()
            .take_while(|&c| is_flag_char(c))
            .collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{name}"));
        }
    }
    flags
}

/// The first cells of the rows of the Markdown tables whose header starts
/// with `| flag |`.
fn flag_table_cells(page: &str) -> Vec<&str> {
    let mut cells = Vec::new();
    let mut in_table = false;
    for line in page.lines() {
        if line.starts_with("| flag |") {
            in_table = true;
        } else if in_table && line.starts_with('|') {
            cells.extend(line.split('|').nth(1));
        } else {
            in_table = false;
        }
    }
    cells
}

fn help_flags_are_documented(binary: &Documented) {
    let flags = help_flags(binary);
    let man = unroff(&read(binary.man_page));
    let options = man_section(&man, "OPTIONS");
    let reference = read(binary.reference);
    let missing_from_man: Vec<_> = flags.iter().filter(|f| !mentions(options, f)).collect();
    let missing_from_docs: Vec<_> = flags.iter().filter(|f| !mentions(&reference, f)).collect();
    assert!(
        missing_from_man.is_empty() && missing_from_docs.is_empty(),
        "{} --help lists {flags:?}\nmissing from OPTIONS in {}: {missing_from_man:?}\n\
         missing from {}: {missing_from_docs:?}",
        binary.name,
        binary.man_page,
        binary.reference
    );
}

fn documented_flags_exist(binary: &Documented) {
    let flags = help_flags(binary);
    let man = unroff(&read(binary.man_page));
    let reference = read(binary.reference);
    let mut named = Vec::new();
    for section in ["SYNOPSIS", "OPTIONS"] {
        let where_ = format!("{} {section}", binary.man_page);
        named.extend(
            long_flags_in(man_section(&man, section))
                .into_iter()
                .map(|f| (f, where_.clone())),
        );
    }
    for cell in flag_table_cells(&reference) {
        let where_ = format!("the flag table of {}", binary.reference);
        named.extend(long_flags_in(cell).into_iter().map(|f| (f, where_.clone())));
    }
    assert!(
        !named.is_empty(),
        "found no flags in {} or {}",
        binary.man_page,
        binary.reference
    );
    let unknown: Vec<_> = named
        .iter()
        .filter(|(flag, _)| !flags.contains(flag))
        .collect();
    assert!(
        unknown.is_empty(),
        "named in the docs but not in {} --help ({flags:?}): {unknown:?}",
        binary.name
    );
}

#[test]
fn every_server_flag_in_help_is_in_the_man_page_and_docs_server_md() {
    with_time_limit(LIMIT, || help_flags_are_documented(&SERVER));
}

#[test]
fn every_client_flag_in_help_is_in_the_man_page_and_docs_client_md() {
    with_time_limit(LIMIT, || help_flags_are_documented(&CLIENT));
}

#[test]
fn every_server_flag_the_man_page_and_flag_table_name_exists() {
    with_time_limit(LIMIT, || documented_flags_exist(&SERVER));
}

#[test]
fn every_client_flag_the_man_page_and_flag_table_name_exists() {
    with_time_limit(LIMIT, || documented_flags_exist(&CLIENT));
}

#[test]
fn man_pages_name_the_crate_version() {
    with_time_limit(LIMIT, || {
        let version = format!("\"echo-chamber {}\"", env!("CARGO_PKG_VERSION"));
        for binary in [SERVER, CLIENT] {
            let man = read(binary.man_page);
            let title = man
                .lines()
                .find(|line| line.starts_with(".TH "))
                .unwrap_or("");
            assert!(
                title.contains(&version),
                "{}: expected {version} in its .TH line, found {title:?}",
                binary.man_page
            );
        }
    });
}

/// The anchors GitHub gives a page's headings: lowercase, punctuation
/// dropped, spaces as hyphens, `-1`, `-2` … on repeats.
fn heading_anchors(page: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in page.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|&c| c.is_alphanumeric() || c == '-' || c == '_' || c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut repeat = 0;
        while anchors.contains(&anchor) {
            repeat += 1;
            anchor = format!("{slug}-{repeat}");
        }
        anchors.insert(anchor);
    }
    anchors
}

/// The relative link targets of a Markdown page, outside code blocks.
fn relative_links(page: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut in_code = false;
    for line in page.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        for (at, _) in line.match_indices("](") {
            let rest = &line[at + 2..];
            let target = &rest[..rest.find(')').unwrap_or(rest.len())];
            if !target.contains("://") && !target.starts_with("mailto:") {
                links.push(target.to_owned());
            }
        }
    }
    links
}

fn markdown_pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    let docs = repo().join("docs");
    let entries =
        fs::read_dir(&docs).unwrap_or_else(|err| panic!("cannot list {}: {err}", docs.display()));
    for entry in entries {
        let path = entry.expect("a directory entry of docs/ reads").path();
        if path.extension().is_some_and(|ext| ext == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    pages
}

#[test]
fn every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading() {
    with_time_limit(LIMIT, || {
        let mut broken = Vec::new();
        let mut checked = 0;
        for page in markdown_pages() {
            let text = fs::read_to_string(&page).expect("a Markdown page reads");
            let dir = page.parent().unwrap_or(Path::new("."));
            for link in relative_links(&text) {
                checked += 1;
                let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
                let target = if file.is_empty() {
                    page.clone()
                } else {
                    dir.join(file)
                };
                let shown = page
                    .strip_prefix(repo())
                    .unwrap_or(&page)
                    .display()
                    .to_string();
                if !target.exists() {
                    broken.push(format!("{shown}: ({link}): no file {}", target.display()));
                    continue;
                }
                if anchor.is_empty() || target.extension().is_none_or(|ext| ext != "md") {
                    continue;
                }
                let anchors =
                    heading_anchors(&fs::read_to_string(&target).expect("a linked page reads"));
                if !anchors.contains(anchor) {
                    broken.push(format!(
                        "{shown}: ({link}): no heading #{anchor}; there are {anchors:?}"
                    ));
                }
            }
        }
        assert!(
            checked > 20,
            "found only {checked} relative links; is the link pattern still right?"
        );
        assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    });
}
